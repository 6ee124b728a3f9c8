"""The embedded nats-server: loopback only, never outlives the process that started it, and never
shares its store with another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import meshflow
from meshflow.server import EmbeddedServer, ServerError
from meshflow.testing import wait_until

STARTER = """
import sys, time
from meshflow.server import EmbeddedServer
server = EmbeddedServer(sys.argv[1]).start()
print(server.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def test_the_server_dies_with_a_parent_killed_by_sigkill(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path / "nats")], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert alive(server_pid)
        parent.kill()
        parent.wait(10)
    await wait_until(lambda: not alive(server_pid), timeout=10, message="the orphaned server exited")


def test_the_server_listens_on_loopback_only(nats_server: EmbeddedServer) -> None:
    assert nats_server.url.startswith("nats://127.0.0.1:")
    conf = (nats_server.store_dir / "nats-server.conf").read_text()
    assert "host: 127.0.0.1" in conf
    assert os.path.exists(nats_server.store_dir / "jetstream")


async def test_a_second_server_on_a_store_in_use_is_refused_before_it_touches_the_store(
    tmp_path: Path,
) -> None:
    first = EmbeddedServer(tmp_path / "store").start()
    try:
        before = sorted(p.name for p in (tmp_path / "store").iterdir())
        with pytest.raises(ServerError, match=rf"in use by process {os.getpid()}.*--data"):
            EmbeddedServer(tmp_path / "store").start()
        assert sorted(p.name for p in (tmp_path / "store").iterdir()) == before
        async with meshflow.connect(first.url, namespace="still") as client:  # the first still serves
            assert await client.send(meshflow.Event(name="a/b"))
    finally:
        first.stop()
    EmbeddedServer(tmp_path / "store").start().stop()  # free again once the first stopped
