"""A worker warns, once and clearly, when its server can lose acknowledged writes on a crash."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import meshflow
from meshflow.server import EmbeddedServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sync_always", [False, True])
async def test_the_worker_warns_when_the_server_does_not_sync_every_write(
    tmp_path: Path, sync_always: bool
) -> None:
    port = free_port()
    app = meshflow.App("durable")

    @app.function("noop", trigger="durable/noop")
    async def noop(ctx: meshflow.Context) -> None:
        return None

    with EmbeddedServer(tmp_path, sync_always=sync_always, extra_config=f"http: 127.0.0.1:{port}") as server:
        with capture_logs() as logs:
            async with meshflow.Worker(app, nats=server.url, monitor=f"http://127.0.0.1:{port}"):
                pass
    warnings = [e for e in logs if "does not sync every write" in e["event"]]
    assert len(warnings) == (0 if sync_always else 1)
    if warnings:
        assert "sync_interval: always" in warnings[0]["event"]
