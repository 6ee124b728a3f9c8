"""The pure modules (replay, ids, runs, durations, retries, expressions, waits, cron) must not
import NATS or do network I/O.

They are checked by reading their source with `ast`, not by importing them, so a forbidden import
is caught even when it sits inside a function or an `if TYPE_CHECKING:` block.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PURE_MODULES = [
    "meshflow.replay",
    "meshflow.ids",
    "meshflow.runs",
    "meshflow.durations",
    "meshflow.retries",
    "meshflow.expressions",
    "meshflow.waits",
    "meshflow.cron",
]
MUST_EXIST = ["meshflow.ids", "meshflow.durations", "meshflow.retries"]

# Top-level packages whose import means network or process I/O.
FORBIDDEN = frozenset({"nats", "socket", "subprocess", "http", "urllib", "requests", "httpx"})
# Submodules of otherwise allowed packages that do process I/O.
FORBIDDEN_SUBMODULES = frozenset({"asyncio.subprocess"})

REPO = Path(__file__).resolve().parents[2]


def module_path(module: str) -> Path | None:
    """The source file of `module` in this repo (a plain module or a package), or None."""
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def forbidden_imports(source: str) -> list[str]:
    """Every import in `source` that names a forbidden module, as written, with its line number."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            found += [f"line {node.lineno}: import {name}" for name in names if _is_forbidden(name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from asyncio import subprocess` reaches the same module as `import asyncio.subprocess`.
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if any(_is_forbidden(target) for target in targets):
                imported = ", ".join(alias.name for alias in node.names)
                found.append(f"line {node.lineno}: from {node.module} import {imported}")
    return found


def _is_forbidden(name: str) -> bool:
    return name.split(".")[0] in FORBIDDEN or any(
        name == sub or name.startswith(sub + ".") for sub in FORBIDDEN_SUBMODULES
    )


EXISTING = [m for m in PURE_MODULES if module_path(m) is not None]


def test_the_core_pure_modules_exist() -> None:
    missing = [m for m in MUST_EXIST if module_path(m) is None]
    assert not missing, f"pure modules missing from {REPO / 'meshflow'}: {missing}"


@pytest.mark.parametrize("module", EXISTING)
def test_pure_module_imports_no_nats_and_no_network_or_process_io(module: str) -> None:
    path = module_path(module)
    assert path is not None
    bad = forbidden_imports(path.read_text(encoding="utf-8"))
    assert not bad, f"{module} ({path.relative_to(REPO)}) must stay pure but imports: " + "; ".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        "import nats",
        "import nats.js.api",
        "from nats.js import JetStreamContext",
        "from nats import connect",
        "import socket",
        "import urllib.request",
        "from http import client",
        "import asyncio.subprocess",
        "from asyncio import subprocess",
        "from asyncio.subprocess import PIPE",
        "def f():\n    import httpx\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import nats\n",
    ],
)
def test_purity_check_catches_forbidden_imports(source: str) -> None:
    assert forbidden_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "from asyncio import sleep",
        "import hashlib, os, secrets",
        "import msgspec",
        "from . import nats",
        "import natsort",
        "import http_utils",
    ],
)
def test_purity_check_allows_stdlib_and_lookalike_names(source: str) -> None:
    assert forbidden_imports(source) == []
