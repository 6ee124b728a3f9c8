"""Flow control across workers: rate limit, throttle, singleton, debounce, batch."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from contextlib import AsyncExitStack

import nats

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until


async def workers(stack: AsyncExitStack, app: meshflow.App, url: str, namespace: str, n: int = 2) -> None:
    for i in range(n):
        await stack.enter_async_context(
            meshflow.Worker(app, nats=url, namespace=namespace, worker_id=f"w{i}")
        )


async def test_a_rate_limit_runs_exactly_the_allowed_number_and_records_the_rest_skipped(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("rl")
    ran: Counter[str] = Counter()

    @app.function(
        "sync",
        trigger="crm/changed",
        rate_limit=meshflow.RateLimit(limit=2, period="1h", key="event.data.account"),
    )
    async def sync(ctx: meshflow.Context) -> None:
        ran[ctx.event.data["account"]] += 1

    async with AsyncExitStack() as stack:
        await workers(stack, app, nats_server.url, namespace)
        events = [meshflow.Event(name="crm/changed", data={"account": a}) for a in ["a"] * 5 + ["b"] * 3]
        await client.send(events)
        runs = [await client.wait_for_run(sync.run_id_for(e)) for e in events]
    statuses = Counter((r.events[0].data["account"], r.status) for r in runs)
    assert statuses == {
        ("a", meshflow.RunStatus.COMPLETED): 2,
        ("a", meshflow.RunStatus.SKIPPED): 3,
        ("b", meshflow.RunStatus.COMPLETED): 2,
        ("b", meshflow.RunStatus.SKIPPED): 1,
    }
    assert ran == {"a": 2, "b": 2}
    skipped = next(r for r in runs if r.status is meshflow.RunStatus.SKIPPED)
    assert skipped.error is not None
    assert "rate limit" in skipped.error.message
    finished, _ = await client.list_events(name="meshflow/function.finished")
    # a run that never ran emits no finished event; the four that ran each emitted one
    assert sorted(e.data["status"] for _, e in finished) == ["completed"] * 4


async def test_a_throttle_spaces_run_starts_and_drops_none(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("th")
    started: dict[str, float] = {}

    @app.function("call", trigger="api/call", throttle=meshflow.Throttle(limit=4, period="1s"))
    async def call(ctx: meshflow.Context) -> None:
        started.setdefault(ctx.run_id, time.time() * 1000)

    async with AsyncExitStack() as stack:
        await workers(stack, app, nats_server.url, namespace)
        events = [meshflow.Event(name="api/call", data={"i": i}) for i in range(8)]
        sent = time.time() * 1000
        await client.send(events)
        runs = [await client.wait_for_run(call.run_id_for(e), timeout=20) for e in events]
    assert {r.status for r in runs} == {meshflow.RunStatus.COMPLETED}
    starts = sorted(started[r.id] for r in runs)
    # GCRA at 4/s: the i-th start is reserved 250 ms after the one before, and never runs early
    assert all(start >= sent + i * 250 - 5 for i, start in enumerate(starts)), [s - sent for s in starts]
    assert starts[-1] - sent < 7 * 250 + 3000  # and not much later (timers are at most ~250 ms late)


async def test_singleton_skip_and_cancel(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("one")

    @app.function(
        "report", trigger="report/go", singleton=meshflow.Singleton(key="event.data.team", mode="skip")
    )
    async def report(ctx: meshflow.Context) -> None:
        await ctx.step.sleep("work", "1h")

    @app.function("deploy", trigger="deploy/go", singleton=meshflow.Singleton(mode="cancel"))
    async def deploy(ctx: meshflow.Context) -> None:
        await ctx.step.sleep("roll-out", "1h")

    async with AsyncExitStack() as stack:
        await workers(stack, app, nats_server.url, namespace)
        first = meshflow.Event(name="report/go", data={"team": "x"})
        await client.send(first)
        await client.wait_for_run(report.run_id_for(first), until=meshflow.RunStatus.SLEEPING)
        second = meshflow.Event(name="report/go", data={"team": "x"})
        other_team = meshflow.Event(name="report/go", data={"team": "y"})
        await client.send([second, other_team])
        skipped = await client.wait_for_run(report.run_id_for(second))
        other = await client.wait_for_run(report.run_id_for(other_team), until=meshflow.RunStatus.SLEEPING)

        old = meshflow.Event(name="deploy/go")
        await client.send(old)
        await client.wait_for_run(deploy.run_id_for(old), until=meshflow.RunStatus.SLEEPING)
        new = meshflow.Event(name="deploy/go")
        await client.send(new)
        replaced = await client.wait_for_run(deploy.run_id_for(old))
        current = await client.wait_for_run(deploy.run_id_for(new), until=meshflow.RunStatus.SLEEPING)
        for run_id in (report.run_id_for(first), other.id, current.id):
            await client.cancel(run_id)
    assert skipped.status is meshflow.RunStatus.SKIPPED
    assert other.status is meshflow.RunStatus.SLEEPING
    assert replaced.status is meshflow.RunStatus.CANCELLED
    assert replaced.error is not None
    assert "singleton" in replaced.error.message
    assert current.status is meshflow.RunStatus.SLEEPING


async def finished_runs(client: meshflow.Client, function_id: str, count: int) -> list[meshflow.Run]:
    """Poll (with a deadline) until ``count`` runs of the function have ended; return them."""

    async def done() -> list[meshflow.Run] | None:
        runs, _ = await client.list_runs(function_id=function_id, limit=500)
        ended = [r for r in runs if r.finished]
        return ended if len(ended) >= count else None

    return await wait_until(done, timeout=30, interval=0.1)


async def test_debounce_gives_one_run_per_burst_and_key_with_the_last_event(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("db")

    @app.function("save", trigger="doc/edited", debounce=meshflow.Debounce(period="2s", key="event.data.doc"))
    async def save(ctx: meshflow.Context) -> list[int]:
        return [e.data["n"] for e in ctx.events]

    async with AsyncExitStack() as stack:
        await workers(stack, app, nats_server.url, namespace)
        for n in range(5):  # one burst per document, interleaved
            await client.send(
                [meshflow.Event(name="doc/edited", data={"doc": d, "n": n}) for d in ("a", "b")]
            )
        runs = await finished_runs(client, save.full_id, 2)

        async def all_events_handled() -> bool:
            return (await client.backlog(save.full_id))["events"] == (0, 0)

        await wait_until(all_events_handled, timeout=10)
        every, _ = await client.list_runs(function_id=save.full_id)  # queued windows included
    assert sorted(r.output for r in runs) == [[4], [4]]
    assert sorted(r.events[0].data["doc"] for r in runs) == ["a", "b"]
    assert len(every) == 2


async def test_debounce_timeout_forces_a_run_during_a_continuous_stream(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("dbt")

    @app.function(
        "save",
        trigger="doc/typed",
        debounce=meshflow.Debounce(period="500ms", timeout="1s", all_events=True),
    )
    async def save(ctx: meshflow.Context) -> list[int]:
        return [e.data["n"] for e in ctx.events]

    async with AsyncExitStack() as stack:
        await workers(stack, app, nats_server.url, namespace)
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 2.5:  # an event every 100 ms: the period never passes
            await client.send(meshflow.Event(name="doc/typed", data={"n": n}))
            n += 1
            await asyncio.sleep(0.1)
        runs = await finished_runs(client, save.full_id, 3)
    outputs = sorted((r.output for r in runs), key=lambda o: o[0])
    assert len(outputs) >= 2  # the timeout started runs while events kept coming
    assert [x for o in outputs for x in o] == list(range(n))  # every event, in order, once


async def test_batches_of_at_most_100_the_last_on_timeout(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("bt")

    @app.function("ingest", trigger="row/added", batch=meshflow.Batch(max_size=100, timeout="1s"))
    async def ingest(ctx: meshflow.Context) -> int:
        return len(ctx.events)

    async with AsyncExitStack() as stack:
        await workers(stack, app, nats_server.url, namespace)
        events = [meshflow.Event(name="row/added", data={"i": i}) for i in range(250)]
        await client.send(events)
        runs = await finished_runs(client, ingest.full_id, 3)
        full = [r for r in runs if r.output == 100]
        assert len(full) == 2
        last = next(r for r in runs if r.output == 50)
    assert sorted(e.data["i"] for r in runs for e in r.events) == list(range(250))
    assert last.started_at is not None
    assert last.started_at - last.created_at >= 1000  # it waited for the timeout
    assert all((r.started_at or 0) - r.created_at < 1000 for r in full)  # full ones started at once


async def test_priority_reorders_runs_waiting_for_a_concurrency_slot(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("prio")
    gate = asyncio.Event()
    order: list[str] = []

    async def work(name: str) -> None:
        order.append(name)
        if name == "blocker":
            await gate.wait()

    @app.function(
        "job",
        trigger="job/go",
        concurrency=meshflow.Concurrency(limit=1),
        priority=meshflow.Priority(run="event.data.plan == 'enterprise' ? 120 : 0"),
    )
    async def job(ctx: meshflow.Context) -> None:
        await ctx.step.run("work", work, ctx.event.data["name"])

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        blocker = meshflow.Event(name="job/go", data={"name": "blocker", "plan": "free"})
        await client.send(blocker)
        await wait_until(lambda: order == ["blocker"], timeout=10)
        queued = [meshflow.Event(name="job/go", data={"name": f"free-{i}", "plan": "free"}) for i in range(4)]
        vip = meshflow.Event(name="job/go", data={"name": "vip", "plan": "enterprise"})
        for e in [*queued, vip]:
            await client.send(e)

        nc = await nats.connect(nats_server.url)
        try:
            slots = await nc.jetstream().key_value(client.names.flow_bucket)

            async def all_waiting() -> bool:  # every run has asked for the slot and queued
                entry = await slots.get(f"cc.{job.full_id}._")
                return len(json.loads(entry.value or b"{}").get("waiting", {})) == 5

            await wait_until(all_waiting, timeout=10)
        finally:
            await nc.close()
        gate.set()
        for e in [blocker, *queued, vip]:
            await client.wait_for_run(job.run_id_for(e), timeout=30)
    assert order[:2] == ["blocker", "vip"]  # 120 s of priority: ahead of runs that waited seconds
    assert sorted(order[2:]) == [f"free-{i}" for i in range(4)]
