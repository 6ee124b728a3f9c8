"""A worker told to stop while a step blocks: it says what it waits for, a second signal stops it
at once, it exits when it says it stopped, and the interrupted step runs again on another
worker, counted as another attempt. Nothing is lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import registered, wait_until

from .apps import stall
from .procs import Ledger, Worker


async def start_blocked_run(client: meshflow.Client, first: Worker, ledger: Ledger) -> str:
    await registered(client, stall)
    event = meshflow.Event(name="faults/stall")
    await client.send(event)
    run_id = stall.run_id_for(event)
    await wait_until(
        lambda: ledger.count("start", pid=first.pid)[(run_id, "b2")] == 1, timeout=30, message="b2 blocks"
    )
    return run_id


async def finish_elsewhere(
    client: meshflow.Client, server: EmbeddedServer, namespace: str, tmp: Path, run_id: str
) -> meshflow.Run:
    ledger, gate = Ledger(tmp / "ledger"), tmp / "gate"
    second = Worker(server.url, namespace, ledger.path, gate, tmp / "second.log", ack_wait=2)
    try:
        gate.touch()
        return await client.wait_for_run(run_id, timeout=60)
    finally:
        second.stop()


@pytest.mark.slow
async def test_a_second_signal_stops_a_worker_at_once_and_its_step_runs_again_as_another_attempt(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, tmp_path: Path
) -> None:
    ledger, gate = Ledger(tmp_path / "ledger"), tmp_path / "gate"
    first = Worker(nats_server.url, namespace, ledger.path, gate, tmp_path / "first.log", ack_wait=2)
    try:
        run_id = await start_blocked_run(client, first, ledger)
        first.signal(signal.SIGTERM)
        await wait_until(
            lambda: first.logged("waiting up to"), timeout=10, message="it says what it waits for"
        )
        asked = time.monotonic()
        first.signal(signal.SIGINT)  # Ctrl-C again: stop now
        assert first.proc.wait(10) == 0
        assert time.monotonic() - asked < 5
        assert first.logged("stopping now") == 1
        assert first.logged("worker stopped") == 1
    finally:
        first.stop()

    run = await finish_elsewhere(client, nats_server, namespace, tmp_path, run_id)
    assert run.status is meshflow.RunStatus.COMPLETED
    b2 = next(s for s in run.steps if s.id == "b2")
    assert b2.attempts == 2  # the interrupted attempt counts
    cut, done = b2.history
    assert (cut.attempt, cut.ended_at, cut.error.type if cut.error else None) == (1, None, "Interrupted")
    assert (done.attempt, done.error) == (2, None)
    assert ledger.count("end")[(run_id, "b1")] == 1


@pytest.mark.slow
async def test_a_worker_whose_grace_ends_exits_when_it_says_it_stopped_though_a_step_still_blocks(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, tmp_path: Path
) -> None:
    ledger, gate = Ledger(tmp_path / "ledger"), tmp_path / "gate"
    first = Worker(nats_server.url, namespace, ledger.path, gate, tmp_path / "first.log", ack_wait=2, grace=1)
    try:
        run_id = await start_blocked_run(client, first, ledger)
        asked = time.monotonic()
        first.signal(signal.SIGTERM)
        assert first.proc.wait(15) == 0  # the blocked handler's thread does not keep it alive
        assert time.monotonic() - asked < 8
        assert first.logged("worker stopped") == 1
    finally:
        first.stop()

    run = await finish_elsewhere(client, nats_server, namespace, tmp_path, run_id)
    assert run.status is meshflow.RunStatus.COMPLETED
    assert next(s for s in run.steps if s.id == "b2").attempts == 2
