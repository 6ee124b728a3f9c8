"""The README's first snippet works as written: its function, served by a worker, and its client
code, against a real nats-server (the step handlers it leaves to the reader are stubs here)."""

from __future__ import annotations

import re
import textwrap
from typing import Any

import meshflow
from meshflow.server import EmbeddedServer

from .devstack import ROOT


def _first_snippet() -> tuple[str, str]:
    """The README's first Python block, split into the function and the service's client code."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", readme, re.S)
    assert match is not None, "the README has no Python snippet"
    function, found, service = match.group(1).partition("# in any service:\n")
    assert found, "the snippet's client code is marked '# in any service:'"
    return function, service


def _stubs() -> dict[str, Any]:
    """The step handlers the snippet calls, as a reader would write them."""

    def create_account(email: str) -> dict[str, str]:
        return {"id": "acct_1", "email": email}

    def send_welcome(account: dict[str, str]) -> None:
        return None

    def send_onboarding(account: dict[str, str]) -> None:
        return None

    return {
        "create_account": create_account,
        "send_welcome": send_welcome,
        "send_onboarding": send_onboarding,
    }


async def test_the_readmes_first_snippet_runs_as_written(nats_server: EmbeddedServer, namespace: str) -> None:
    function, service = _first_snippet()
    scope: dict[str, Any] = _stubs()
    exec(function, scope)  # noqa: S102 - our own README, the point of the test
    default = 'meshflow.connect("nats://127.0.0.1:4222")'
    assert default in service, "the client code connects to the dev stack's server"
    service = service.replace(default, f"meshflow.connect({nats_server.url!r}, namespace={namespace!r})")
    printed: list[tuple[Any, ...]] = []
    scope["print"] = lambda *args: printed.append(args)
    exec("async def service():\n" + textwrap.indent(service, "    "), scope)  # noqa: S102
    async with meshflow.Worker(scope["app"], nats=nats_server.url, namespace=namespace):
        await scope["service"]()
    [(status, steps)] = printed
    assert status is meshflow.RunStatus.SLEEPING
    assert steps == [
        ("create-account", "completed", 1),
        ("send-welcome", "completed", 1),
        ("wait-for-onboarding", "sleeping", 0),  # a sleep is no attempt
    ]
