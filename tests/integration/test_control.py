"""Cancellation (API, cancel_on, bulk), timeouts, idempotency keys, future ts, replay, trigger if_."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until


def onboarding_app(started: asyncio.Event | None = None, release: asyncio.Event | None = None) -> Any:
    app = meshflow.App("onboard")
    ran: Counter[str] = Counter()

    async def slow_step() -> str:
        ran["slow"] += 1
        if started is not None and release is not None:
            started.set()
            await release.wait()
        return "done"

    @app.function(
        "drip",
        trigger="user/signup",
        cancel_on=[meshflow.Cancel(event="user/deleted", match="data.user")],
    )
    async def drip(ctx: meshflow.Context) -> str:
        await ctx.step.run("welcome", lambda: ran.update(["welcome"]))
        if ctx.event.data.get("mode") == "sleep":
            await ctx.step.sleep("wait-a-day", "1d")
        elif ctx.event.data.get("mode") == "wait":
            await ctx.step.wait_for_event(
                "activated", event="user/activated", match="data.user", timeout="7d"
            )
        else:
            await ctx.step.run("slow", slow_step)
        await ctx.step.run("follow-up", lambda: ran.update(["follow-up"]))
        return "finished"

    return app, drip, ran


async def test_a_read_only_client_has_a_worker_cancel_and_replay_and_says_when_none_runs(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, drip, _ = onboarding_app()
    event = meshflow.Event(name="user/signup", data={"user": "u-ro", "mode": "sleep"})
    run_id = drip.run_id_for(event)
    async with meshflow.connect(nats_server.url, namespace=namespace, read_only=True) as viewer:
        async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
            await client.send(event)
            await client.wait_for_run(run_id, until=meshflow.RunStatus.SLEEPING)
            assert await viewer.cancel(run_id, reason="seen enough") is True
            run = await client.wait_for_run(run_id)
            again = await viewer.replay(run_id)
            await client.wait_for_run(again, until=meshflow.RunStatus.SLEEPING)
        with pytest.raises(meshflow.NatsError, match="no worker is running"):
            await viewer.cancel(again)
    assert (run.status, run.error and run.error.message) == (meshflow.RunStatus.CANCELLED, "seen enough")
    assert (await client.get_run(again)).replay_of == run_id


async def test_cancel_by_api_while_sleeping_and_while_waiting(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, drip, ran = onboarding_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        for mode, status in (("sleep", meshflow.RunStatus.SLEEPING), ("wait", meshflow.RunStatus.WAITING)):
            event = meshflow.Event(name="user/signup", data={"user": f"u-{mode}", "mode": mode})
            await client.send(event)
            run_id = drip.run_id_for(event)
            await client.wait_for_run(run_id, until=status)
            assert await client.cancel(run_id) is True
            run = await client.wait_for_run(run_id)
            assert run.status is meshflow.RunStatus.CANCELLED
            assert run.error is not None
            assert run.error.message == "cancelled by the API"
            assert run.pending == []
            assert await client.cancel(run_id) is False  # already ended
    assert ran["follow-up"] == 0
    assert ran["welcome"] == 2


async def test_cancel_while_a_step_runs_keeps_the_step_and_stops_before_the_next(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    app, drip, ran = onboarding_app(started, release)
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="user/signup", data={"user": "u1"})
        await client.send(event)
        await asyncio.wait_for(started.wait(), 10)
        assert await client.cancel(drip.run_id_for(event)) is True
        release.set()
        run = await client.wait_for_run(drip.run_id_for(event))
    assert run.status is meshflow.RunStatus.CANCELLED
    assert {s.id: s.status for s in run.steps} == {"welcome": "completed", "slow": "completed"}
    assert ran == {"welcome": 1, "slow": 1}


async def test_cancel_on_event_stops_only_the_matching_run_and_is_announced(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, drip, _ = onboarding_app()
    seen: list[dict[str, Any]] = []

    @app.function("audit", trigger="meshflow/function.cancelled")
    async def audit(ctx: meshflow.Context) -> None:
        seen.append(ctx.event.data)

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        mine = meshflow.Event(name="user/signup", data={"user": "ann", "mode": "sleep"})
        other = meshflow.Event(name="user/signup", data={"user": "bob", "mode": "sleep"})
        await client.send([mine, other])
        await client.wait_for_run(drip.run_id_for(mine), until=meshflow.RunStatus.SLEEPING)
        await client.send(meshflow.Event(name="user/deleted", data={"user": "ann"}))
        run = await client.wait_for_run(drip.run_id_for(mine))
        await wait_until(lambda: len(seen) == 1, timeout=10)
        still = await client.get_run(drip.run_id_for(other))
    assert run.status is meshflow.RunStatus.CANCELLED
    assert run.error is not None
    assert "user/deleted" in run.error.message
    assert still.status is meshflow.RunStatus.SLEEPING
    assert seen[0]["run_id"] == run.id
    assert seen[0]["event"]["data"] == {"user": "ann", "mode": "sleep"}


async def test_a_cancel_event_sent_right_after_the_trigger_still_cancels(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, drip, _ = onboarding_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        signup = meshflow.Event(name="user/signup", data={"user": "cy", "mode": "sleep"})
        await client.send([signup, meshflow.Event(name="user/deleted", data={"user": "cy"})])
        run = await client.wait_for_run(drip.run_id_for(signup))
    assert run.status is meshflow.RunStatus.CANCELLED


async def test_bulk_cancel_by_function_and_time_range(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, drip, _ = onboarding_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        events = [
            meshflow.Event(name="user/signup", data={"user": f"b{i}", "mode": "sleep"}) for i in range(5)
        ]
        await client.send(events)
        for e in events:
            await client.wait_for_run(drip.run_id_for(e), until=meshflow.RunStatus.SLEEPING)
        ids = await client.cancel_runs(drip.full_id)
        runs = [await client.wait_for_run(drip.run_id_for(e)) for e in events]
    assert sorted(ids) == sorted(r.id for r in runs)
    assert {r.status for r in runs} == {meshflow.RunStatus.CANCELLED}


async def test_a_run_not_finished_in_time_is_cancelled(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("slow")

    @app.function("report", trigger="report/requested", timeouts=meshflow.Timeouts(finish="1s"))
    async def report(ctx: meshflow.Context) -> str:
        await ctx.step.sleep("think", "1h")
        return "never"

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="report/requested")
        await client.send(event)
        run = await client.wait_for_run(report.run_id_for(event), timeout=20)
    assert run.status is meshflow.RunStatus.CANCELLED
    assert run.error is not None
    assert run.error.message == "timed out: not finished within 1s"


async def test_a_future_ts_delays_the_start_and_a_start_timeout_cancels_a_late_start(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("later")
    started_at: dict[str, float] = {}

    @app.function("remind", trigger="reminder/due")
    async def remind(ctx: meshflow.Context) -> None:
        started_at.setdefault(ctx.run_id, time.time() * 1000)

    @app.function("strict", trigger="reminder/due", timeouts=meshflow.Timeouts(start="500ms"))
    async def strict(ctx: meshflow.Context) -> None:
        return None

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        due = int(time.time() * 1000) + 1500
        event = meshflow.Event(name="reminder/due", ts=due)
        await client.send(event)
        queued = await client.wait_for_run(remind.run_id_for(event), until=meshflow.RunStatus.QUEUED)
        assert queued.status is meshflow.RunStatus.QUEUED
        run = await client.wait_for_run(remind.run_id_for(event), timeout=20)
        late = await client.wait_for_run(strict.run_id_for(event), timeout=20)
    assert run.status is meshflow.RunStatus.COMPLETED
    assert started_at[run.id] >= due
    assert late.status is meshflow.RunStatus.CANCELLED
    assert late.error is not None
    assert "not started within" in late.error.message


async def test_an_idempotency_key_allows_one_run_per_key(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("idem")
    runs: Counter[str] = Counter()

    @app.function("welcome", trigger="user/signup", idempotency="event.data.user")
    async def welcome(ctx: meshflow.Context) -> None:
        runs[ctx.event.data["user"]] += 1

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        events = [meshflow.Event(name="user/signup", data={"user": u}) for u in ("a", "a", "b", "a")]
        for e in events:
            await client.send(e)
        await client.wait_for_run(welcome.run_id_for(events[0]))
        await client.wait_for_run(welcome.run_id_for(events[2]))
        marker = meshflow.Event(name="user/signup", data={"user": "c"})
        await client.send(marker)  # sent last: when its run is done, the others were seen
        await client.wait_for_run(welcome.run_id_for(marker))
        skipped = await client.runs_for_event(events[1].id)
    assert runs == {"a": 1, "b": 1, "c": 1}
    assert skipped == []


async def test_replay_runs_the_function_again_from_the_same_event(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("again")
    calls: list[str] = []

    @app.function("bill", trigger="bill/due")
    async def bill(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("charge", lambda: calls.append(ctx.event.data["who"]) or "ok"))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="bill/due", data={"who": "ann"})
        await client.send(event)
        first = await client.wait_for_run(bill.run_id_for(event))
        replay_id = await client.replay(first.id)
        again = await client.wait_for_run(replay_id)
    assert again.status is meshflow.RunStatus.COMPLETED
    assert again.replay_of == first.id
    assert again.events == first.events
    assert calls == ["ann", "ann"]


async def test_a_trigger_if_filters_which_events_start_runs(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("big")
    seen: list[int] = []

    @app.function(
        "vip", trigger=meshflow.TriggerEvent("order/created", if_="event.data.total > 100"), retries=0
    )
    async def vip(ctx: meshflow.Context) -> None:
        seen.append(ctx.event.data["total"])

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        events = [meshflow.Event(name="order/created", data={"total": t}) for t in (50, 150, 100, 101)]
        events.append(meshflow.Event(name="order/created", data={}))  # no total: not a match
        await client.send(events)
        await client.wait_for_run(vip.run_id_for(events[3]))
        await client.wait_for_run(vip.run_id_for(events[1]))
        assert await client.runs_for_event(events[0].id) == []
    assert sorted(seen) == [101, 150]
