"""The pure modules (the engine, the settlement, the model, time and policy, flow-control decisions)
must not import NATS or do network I/O, directly or through any meshflow module they import.

They are checked by reading their source with `ast`, not by importing them, so a forbidden import
is caught even when it sits inside a function or an `if TYPE_CHECKING:` block; relative imports
(``from .bus import ...``, ``from .. import store``) are followed, and so is every meshflow
module those import, transitively.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PURE_MODULES = [
    "meshflow.replay",
    "meshflow.activations",
    "meshflow.settle",
    "meshflow.steps",
    "meshflow.functions",
    "meshflow.events",
    "meshflow.invokes",
    "meshflow.ids",
    "meshflow.runs",
    "meshflow.durations",
    "meshflow.retries",
    "meshflow.expressions",
    "meshflow.waits",
    "meshflow.cron",
    "meshflow.flow.config",
    "meshflow.flow.concurrency",
    "meshflow.flow.throttle",
    "meshflow.flow.ratelimit",
    "meshflow.flow.debounce",
    "meshflow.flow.batching",
]
MUST_EXIST = ["meshflow.replay", "meshflow.settle", "meshflow.ids", "meshflow.durations", "meshflow.retries"]

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


def meshflow_imports(module: str, source: str) -> set[str]:
    """The meshflow modules `source` (the text of `module`) imports, relative or absolute."""
    path = module_path(module)
    package = module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.split(".")[0] == "meshflow":
                target = node.module
            else:
                continue
            # `from . import store` names a module; `from .store import Store` a name in one
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if module_path(sub) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "meshflow"}
    return {m for m in found if module_path(m)}


def reachable(module: str) -> list[str]:
    """`module` and every meshflow module it imports, transitively, in a stable order."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        path = module_path(current)
        assert path is not None, current
        todo.extend(meshflow_imports(current, path.read_text(encoding="utf-8")))
    return sorted(seen)


def _is_forbidden(name: str) -> bool:
    return name.split(".")[0] in FORBIDDEN or any(
        name == sub or name.startswith(sub + ".") for sub in FORBIDDEN_SUBMODULES
    )


EXISTING = [m for m in PURE_MODULES if module_path(m) is not None]


def test_the_core_pure_modules_exist() -> None:
    missing = [m for m in MUST_EXIST if module_path(m) is None]
    assert not missing, f"pure modules missing from {REPO / 'meshflow'}: {missing}"


@pytest.mark.parametrize("module", EXISTING)
def test_pure_module_imports_no_nats_and_no_network_or_process_io_even_indirectly(module: str) -> None:
    bad = []
    for dependency in reachable(module):
        path = module_path(dependency)
        assert path is not None
        found = forbidden_imports(path.read_text(encoding="utf-8"))
        via = "" if dependency == module else f" (imported through {dependency})"
        bad += [f"{path.relative_to(REPO)}{via}: {line}" for line in found]
    assert not bad, f"{module} must stay pure but reaches: " + "; ".join(bad)


def test_relative_and_absolute_meshflow_imports_are_followed() -> None:
    assert meshflow_imports("meshflow.worker", "from .bus import Bus\n") == {"meshflow.bus"}
    assert meshflow_imports("meshflow.worker", "from . import store\n") == {"meshflow.store"}
    assert meshflow_imports("meshflow.flow.slots", "from ..names import Names\n") == {"meshflow.names"}
    assert meshflow_imports("meshflow.flow.slots", "from . import concurrency\n") == {
        "meshflow.flow.concurrency"
    }
    assert meshflow_imports("meshflow.flow.slots", "from . import Nothing\n") == {"meshflow.flow"}
    assert meshflow_imports("meshflow.replay", "import meshflow.events\n") == {"meshflow.events"}


def test_a_module_that_reaches_nats_through_another_is_caught() -> None:
    """The pass executor imports no nats itself, but reaches it through `bus`: the check sees it."""
    passes = module_path("meshflow.passes")
    assert passes is not None
    assert forbidden_imports(passes.read_text()) == []
    impure = [m for m in reachable("meshflow.passes") if forbidden_imports(module_path(m).read_text())]  # type: ignore[union-attr]
    assert "meshflow.bus" in impure


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
