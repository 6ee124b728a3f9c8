"""Steps run once, sleeps never wake early, suspended runs hold nothing."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from structlog.testing import capture_logs

import meshflow
from meshflow.bus import Delivery
from meshflow.ids import step_hash
from meshflow.runs import RunRecord, RunStatus
from meshflow.server import EmbeddedServer
from meshflow.settle import Wake
from meshflow.testing import wait_until

FAST = meshflow.Retry(retries=3, backoff=("300ms", "600ms"), jitter=0.0)


async def test_a_committed_step_never_runs_again_when_a_later_step_retries(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("ledger")
    ledger: Counter[str] = Counter()

    def charge() -> dict[str, int]:
        ledger["charge"] += 1
        return {"charged": 100}

    def ship() -> str:
        ledger["ship"] += 1
        if ledger["ship"] < 3:
            raise RuntimeError("carrier API is down")
        return "shipped"

    @app.function("order", trigger="order/paid", retries=FAST)
    async def order(ctx: meshflow.Context) -> dict[str, object]:
        receipt = await ctx.step.run("charge", charge)
        shipped = await ctx.step.run("ship", ship)
        return {"receipt": receipt, "shipped": shipped}

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="order/paid")
        await client.send(event)
        run = await client.wait_for_run(order.run_id_for(event))

    assert run.status is meshflow.RunStatus.COMPLETED
    assert run.output == {"receipt": {"charged": 100}, "shipped": "shipped"}
    assert ledger == {"charge": 1, "ship": 3}
    steps = {s.id: s for s in run.steps}
    assert steps["charge"].attempts == 1
    assert steps["ship"].attempts == 3


async def test_a_second_wake_of_a_run_while_this_worker_takes_its_lease_waits_for_the_pass(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry's local timer and its schedule's message both wake the run in one worker. The
    second reads the lease the first just wrote, a lease of this worker's: it must wait for that
    pass, not take the run over (which ran the step twice and lost an attempt's failure)."""
    app = meshflow.App("twins")
    ledger: Counter[str] = Counter()

    def ship() -> str:
        ledger["ship"] += 1
        if ledger["ship"] < 2:
            raise RuntimeError("carrier API is down")
        return "shipped"

    @app.function("order", trigger="twins/paid", retries=FAST)
    async def order(ctx: meshflow.Context) -> str:
        return await ctx.step.run("ship", ship)  # type: ignore[no-any-return]

    second: list[str] = []
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace) as worker:
        store, passes = worker.store, worker.passes
        update_run = store.update_run

        async def and_a_twin_wakes(record: RunRecord, revision: int, **kw: Any) -> int:
            rev = await update_run(record, revision, **kw)
            if kw.get("was") is RunStatus.RETRYING and not second:  # the retry's lease, just written
                second.append("woken")

                async def to_stream() -> None:
                    second.append("left to the stream")

                delivery = Delivery.local(client.names.run_subject("twins", "order"), to_stream)
                await passes.resume(order, delivery, Wake("timer", step_hash("ship")), record.id)
            return rev

        monkeypatch.setattr(store, "update_run", and_a_twin_wakes)
        event = meshflow.Event(name="twins/paid")
        await client.send(event)
        run = await client.wait_for_run(order.run_id_for(event))
    assert second == ["woken", "left to the stream"]
    assert run.status is meshflow.RunStatus.COMPLETED
    assert ledger["ship"] == 2
    [step] = run.steps
    assert step.attempts == 2


async def test_sleep_never_wakes_early(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("sleepy")
    before: dict[str, float] = {}
    after: dict[str, float] = {}

    @app.function("nap", trigger="nap/start")
    async def nap(ctx: meshflow.Context) -> None:
        before.setdefault(ctx.run_id, time.time())
        await ctx.step.sleep("two-seconds", "2s")
        after.setdefault(ctx.run_id, time.time())

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        events = [meshflow.Event(name="nap/start") for _ in range(5)]
        await client.send(events)
        runs = [await client.wait_for_run(nap.run_id_for(e)) for e in events]

    for run in runs:
        assert run.status is meshflow.RunStatus.COMPLETED
        assert after[run.id] - before[run.id] >= 2.0
        (sleep,) = run.steps
        assert sleep.kind == "sleep"
        assert sleep.ended_at is not None
        assert sleep.started_at is not None
        assert sleep.ended_at - sleep.started_at >= 2000


async def test_a_long_sleep_is_visible_and_holds_no_ack_pending_slot(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("hibernate")

    @app.function("long-nap", trigger="nap/long")
    async def long_nap(ctx: meshflow.Context) -> None:
        await ctx.step.run("before", lambda: "ok")
        await ctx.step.sleep("an-hour", "1h")

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace) as worker:
        event = meshflow.Event(name="nap/long")
        sent_at = time.time() * 1000
        await client.send(event)
        run_id = long_nap.run_id_for(event)

        async def sleeping() -> meshflow.Run | None:
            try:
                run = await client.get_run(run_id)
            except meshflow.RunNotFoundError:
                return None
            return run if run.status is meshflow.RunStatus.SLEEPING else None

        run = await wait_until(sleeping, message="run is sleeping")
        (pending,) = run.pending
        assert pending.kind == "sleep"
        assert sent_at + 3_600_000 <= pending.until <= time.time() * 1000 + 3_600_000
        assert [s.status for s in run.steps] == ["completed", "sleeping"]
        assert run.steps[1].until == pending.until
        names = client.names
        info = await worker.bus.js.consumer_info(
            names.runs_stream, names.run_consumer("hibernate", "long-nap")
        )
        assert info.num_ack_pending == 0
        assert not worker.inflight.tasks  # no coroutine is kept for the sleeping run


async def test_a_step_longer_than_the_ack_wait_is_not_handed_to_another_worker(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """In-progress acks and lease renewal keep a live worker's long step its own."""
    app = meshflow.App("slow")
    executions: Counter[str] = Counter()

    def slow_step() -> str:
        executions["slow"] += 1
        time.sleep(3.5)  # the step's own work: over three times the ack wait
        return "done"

    @app.function("slow", trigger="slow/go")
    async def slow(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("slow-step", slow_step))

    async with (
        meshflow.Worker(app, nats=nats_server.url, namespace=namespace, ack_wait=1.0),
        meshflow.Worker(app, nats=nats_server.url, namespace=namespace, ack_wait=1.0),
    ):
        event = meshflow.Event(name="slow/go")
        await client.send(event)
        run = await client.wait_for_run(slow.run_id_for(event))

    assert run.output == "done"
    assert executions["slow"] == 1


async def test_parallel_sleeps_waking_together_run_the_next_step_once(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """Each sleep has a local timer and a durable schedule: four wake messages, one pass at a time."""
    app = meshflow.App("twins")
    after: Counter[str] = Counter()

    def slow_after(run_id: str) -> str:
        after[run_id] += 1
        # held until a twin wake of this run has arrived and been told the run is busy
        deadline = time.monotonic() + 20
        while not any(
            e["event"] == "run busy; looked at again shortly" and e["run_id"] == run_id for e in logs
        ):
            assert time.monotonic() < deadline, f"no twin wake of run {run_id} came"
            time.sleep(0.01)
        return "after"

    @app.function("twins", trigger="twins/go")
    async def twins(ctx: meshflow.Context) -> str:
        await asyncio.gather(ctx.step.sleep("left", "1s"), ctx.step.sleep("right", "1s"))
        return str(await ctx.step.run("after", slow_after, ctx.run_id))

    with capture_logs() as logs:
        async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
            events = [meshflow.Event(name="twins/go") for _ in range(10)]
            await client.send(events)
            runs = [await client.wait_for_run(twins.run_id_for(e)) for e in events]

    assert [r.output for r in runs] == ["after"] * 10
    assert all(after[r.id] == 1 for r in runs), after


async def test_a_run_with_more_steps_than_one_batched_read_returns_still_resumes(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """Over 1,024 memos the server refuses a single batched read; the resume must still load all."""
    app = meshflow.App("long")
    executions: Counter[int] = Counter()

    def square(i: int) -> int:
        executions[i] += 1
        return i * i

    @app.function("many-steps", trigger="long/go")
    async def many(ctx: meshflow.Context) -> int:
        total = 0
        for i in range(1100):
            total += int(await ctx.step.run("square", square, i))
        await ctx.step.sleep("breathe", "1s")  # the wake replays from stored memos
        return total

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="long/go")
        await client.send(event)
        run = await client.wait_for_run(many.run_id_for(event), timeout=60, steps=False)

    assert run.status is meshflow.RunStatus.COMPLETED
    assert run.output == sum(i * i for i in range(1100))
    assert set(executions.values()) == {1}
