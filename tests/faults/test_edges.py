"""Input at the server's payload limit, and events without an id: each ends in a clear error or a
finished run, never in a loop of redeliveries, a run nobody can see, or a dead connection."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import msgspec
import nats
import pytest

import meshflow
from meshflow.events import RECORD_ROOM, stream_event_id
from meshflow.names import Names
from meshflow.server import EmbeddedServer
from meshflow.testing import registered, wait_until

from .apps import stall
from .procs import Ledger, Worker

MAX_PAYLOAD = 1_048_576  # the server's default
# Sizes where the run record (the event plus its fields), or a KV write's payload plus its
# headers, lands just over max_payload: seen to loop or to close the worker's connection.
EDGE_SIZES = [MAX_PAYLOAD - 20, 1_048_300, 1_047_916, 1_048_196]
PAST = 1_700_000_000_000


def big_event(name: str, size: int, **fields: object) -> bytes:
    """An event's JSON (as another language's publisher would write it) of exactly ``size`` bytes."""
    base = msgspec.json.encode({"name": name, "data": {"pad": ""}, **fields})
    return msgspec.json.encode({"name": name, "data": {"pad": "x" * (size - len(base))}, **fields})


def edge_app() -> tuple[meshflow.App, meshflow.Function, Counter[str]]:
    app = meshflow.App("edge")
    executed: Counter[str] = Counter()

    def count(what: str) -> int:
        executed[what] += 1
        return executed[what]

    @app.function("take", trigger="edge/big", retries=meshflow.Retry(retries=2, backoff=("50ms",)))
    async def take(ctx: meshflow.Context) -> int:
        return int(await ctx.step.run("count", count, "take"))

    return app, take, executed


async def test_the_client_refuses_an_event_just_under_max_payload_at_once_and_stays_usable(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, take, _ = edge_app()
    started = time.monotonic()
    with pytest.raises(meshflow.EventError, match=rf"at most {MAX_PAYLOAD - RECORD_ROOM} bytes"):
        await client.send(meshflow.Event(name="edge/big", data={"pad": "x" * (MAX_PAYLOAD - 100)}))
    assert time.monotonic() - started < 1  # refused here, not after the server dropped us
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="edge/big", data={"pad": "ok"})
        await client.send(event)  # the same client goes on working
        run = await client.wait_for_run(take.run_id_for(event), timeout=30)
    assert run.status is meshflow.RunStatus.COMPLETED


@pytest.mark.parametrize("size", EDGE_SIZES)
async def test_a_raw_event_too_large_to_run_fails_its_run_once_visibly_and_the_worker_goes_on(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, size: int
) -> None:
    app, take, executed = edge_app()
    raw = big_event("edge/big", size, id=f"big-{size}", ts=PAST)
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace) as worker:
        nc = await nats.connect(nats_server.url)
        try:
            ack = await nc.jetstream().publish(Names(namespace).event_subject("edge/big"), raw)
        finally:
            await nc.close()
        assert ack.seq > 0
        run = await client.wait_for_run(
            take.run_id_for(meshflow.Event(name="edge/big", id=f"big-{size}", ts=PAST)),
            timeout=30,
        )
        assert run.status is meshflow.RunStatus.FAILED
        assert run.error is not None
        assert "bytes" in run.error.message
        assert set(run.events[0].data) == {"_omitted"}  # left out of the record, kept in the stream
        assert executed["take"] == 0
        normal = meshflow.Event(name="edge/big", data={"pad": "small"})  # the worker still serves
        await client.send(normal)
        assert (await client.wait_for_run(take.run_id_for(normal), timeout=30)).output == 1
        assert worker.bus.connected


async def test_a_raw_event_just_over_what_the_client_sends_still_runs_when_its_record_fits(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, take, _ = edge_app()
    raw = big_event("edge/big", MAX_PAYLOAD - RECORD_ROOM + 100, id="big-but-fits", ts=PAST)
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().publish(Names(namespace).event_subject("edge/big"), raw)
        finally:
            await nc.close()
        run = await client.wait_for_run(take.run_id_for("big-but-fits"), timeout=30)
    assert (run.status, run.output) == (meshflow.RunStatus.COMPLETED, 1)


async def test_a_step_result_too_large_to_store_fails_the_step_at_once_without_running_it_again(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("huge")
    calls: Counter[str] = Counter()

    def huge() -> str:
        calls["huge"] += 1
        return "x" * (MAX_PAYLOAD + 10)

    @app.function("huge", trigger="huge/go", retries=3)
    async def make(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("huge", huge))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="huge/go")
        await client.send(event)
        run = await client.wait_for_run(make.run_id_for(event), timeout=30)
    assert run.status is meshflow.RunStatus.FAILED
    [step] = run.steps
    assert (step.status, step.attempts) == ("failed", 1)
    assert step.error is not None
    assert step.error.type == "SerializationError"
    assert "more than one stored value may hold" in step.error.message
    assert calls["huge"] == 1


async def test_an_output_that_does_not_fit_beside_its_event_fails_the_run_saying_so(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("fat")

    @app.function("fat", trigger="fat/go", retries=0)
    async def fat(ctx: meshflow.Context) -> str:
        return "y" * (MAX_PAYLOAD // 2)  # beside an event of half a megabyte: over the record

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="fat/go", data={"pad": "x" * (MAX_PAYLOAD // 2)})
        await client.send(event)
        run = await client.wait_for_run(fat.run_id_for(event), timeout=30)
    assert run.status is meshflow.RunStatus.FAILED
    assert run.error is not None
    assert "the run's record would be" in run.error.message


async def test_a_worker_whose_connection_closes_for_good_stops_and_says_so(
    nats_server: EmbeddedServer, namespace: str
) -> None:
    app, _, _ = edge_app()
    worker = meshflow.Worker(app, nats=nats_server.url, namespace=namespace)
    serving = asyncio.ensure_future(worker.serve())
    await wait_until(lambda: worker._started_at > 0, timeout=30)  # started: serving, not provisioning
    # a message over max_payload counting its headers: nats-py sends it, the server closes the
    # connection for good (meshflow's own writes are checked first and never get this far)
    nc = worker.bus.nc
    await nc.publish("edge.x", b"x" * (nc.max_payload - 5), headers={"X-Pad": "yyyyyyyyyy"})
    with pytest.raises(meshflow.NatsError, match="closed for good"):
        await asyncio.wait_for(serving, timeout=30)


@pytest.mark.slow
async def test_an_event_without_an_id_starts_one_run_even_when_its_worker_dies_mid_step(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, tmp_path: Path
) -> None:
    ledger, gate = Ledger(tmp_path / "ledger"), tmp_path / "gate"
    first = Worker(nats_server.url, namespace, ledger.path, gate, tmp_path / "first.log", ack_wait=2)
    second: Worker | None = None
    try:
        await registered(client, stall)
        names = Names(namespace)
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            ack = await js.publish(
                names.event_subject("faults/stall"), b'{"name": "faults/stall", "data": {}}'
            )
            stored = await js.get_msg(names.events_stream, ack.seq)
        finally:
            await nc.close()
        assert stored.headers is None or "Nats-Msg-Id" not in stored.headers  # no id anywhere

        def inside() -> bool:
            return any(e.step == "b2" and e.what == "start" for e in ledger.lines())

        await wait_until(inside, timeout=60, message="the run is inside b2")
        first.kill()
        second = Worker(nats_server.url, namespace, ledger.path, gate, tmp_path / "second.log", ack_wait=2)
        gate.touch()
        await wait_until(
            lambda: any(e.step == "body" for e in ledger.lines()), timeout=60, message="a run finished"
        )
        runs = {e.run for e in ledger.lines()}
        assert len(runs) == 1  # the redelivered event mapped to the run it had started
        [run_id] = runs
        run = await client.wait_for_run(run_id, timeout=30)
        assert run.status is meshflow.RunStatus.COMPLETED
        assert run.events[0].id == stream_event_id(names.events_stream, ack.seq, run.events[0].ts)
    finally:
        first.stop()
        if second is not None:
            second.stop()
