"""wait_for_event and wait_for_any: matching, timeouts, the window of events a wait sees."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest

import meshflow
from meshflow.ids import step_hash
from meshflow.names import Names
from meshflow.runs import RunRecord, decode_run
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until


def approval_app() -> tuple[meshflow.App, meshflow.Function]:
    app = meshflow.App("approvals")

    @app.function("approve", trigger="expense/submitted")
    async def approve(ctx: meshflow.Context) -> dict[str, Any]:
        decision = await ctx.step.wait_for_event(
            "decision", event="expense/decided", match="data.expense_id", timeout="3s"
        )
        if decision is None:
            return {"status": "expired"}
        status = await ctx.step.run("apply", lambda: "approved" if decision.data["ok"] else "rejected")
        return {"status": status, "by": decision.data.get("by")}

    return app, approve


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        ({"ok": True, "by": "ann"}, {"status": "approved", "by": "ann"}),
        ({"ok": False, "by": "bob"}, {"status": "rejected", "by": "bob"}),
        (None, {"status": "expired"}),
    ],
    ids=["approved", "rejected", "timed-out"],
)
async def test_an_approval_waits_for_its_own_decision_or_times_out(
    nats_server: EmbeddedServer,
    namespace: str,
    client: meshflow.Client,
    decision: dict[str, Any] | None,
    expected: dict[str, Any],
) -> None:
    app, approve = approval_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        mine = meshflow.Event(name="expense/submitted", data={"expense_id": "e-1"})
        other = meshflow.Event(name="expense/submitted", data={"expense_id": "e-2"})
        await client.send([mine, other])
        await client.wait_for_run(approve.run_id_for(mine), until=meshflow.RunStatus.WAITING)
        if decision is not None:
            # a decision for the other expense must not resume this run
            await client.send(meshflow.Event(name="expense/decided", data={"expense_id": "e-2", "ok": False}))
            await client.send(meshflow.Event(name="expense/decided", data={"expense_id": "e-1", **decision}))
        run = await client.wait_for_run(approve.run_id_for(mine), timeout=20)
    assert run.status is meshflow.RunStatus.COMPLETED
    assert run.output == expected
    assert not await timer_pending(nats_server, client.names, run.id, step_hash("decision"))


async def timer_pending(server: EmbeddedServer, names: Names, run_id: str, key: str) -> bool:
    """Whether the runs stream still holds a timer (schedule) of this run's step."""
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().get_last_msg(names.runs_stream, names.timer_subject(run_id, key))
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()
    return True


async def test_an_event_sent_right_after_the_trigger_is_not_missed(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """The decision arrives before the function has even reached its wait: it still counts."""
    app, approve = approval_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        runs = []
        for i in range(20):
            trigger = meshflow.Event(name="expense/submitted", data={"expense_id": f"e-{i}"})
            await client.send(trigger)
            await asyncio.sleep(0.001)
            await client.send(
                meshflow.Event(name="expense/decided", data={"expense_id": f"e-{i}", "ok": True})
            )
            runs.append(approve.run_id_for(trigger))
        results = [await client.wait_for_run(run_id, timeout=20) for run_id in runs]
    assert [r.output["status"] for r in results] == ["approved"] * 20


async def test_a_decision_sent_before_the_trigger_is_not_taken(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, approve = approval_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await client.send(meshflow.Event(name="expense/decided", data={"expense_id": "e-1", "ok": True}))
        trigger = meshflow.Event(name="expense/submitted", data={"expense_id": "e-1"})
        await client.send(trigger)
        run = await client.wait_for_run(approve.run_id_for(trigger), timeout=20)
    assert run.output == {"status": "expired"}


async def test_an_event_racing_the_timeout_resolves_the_wait_exactly_once(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """200 runs whose decision arrives right at the timeout: each ends once, one way or the other."""
    app = meshflow.App("race")
    applied: list[str] = []

    @app.function("race", trigger="race/start")
    async def race(ctx: meshflow.Context) -> str:
        got = await ctx.step.wait_for_event("answer", event="race/answer", match="data.n", timeout="1s")
        outcome = "event" if got is not None else "timeout"
        await ctx.step.run("record", lambda: applied.append(ctx.run_id))
        return outcome

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        starts = [meshflow.Event(name="race/start", data={"n": i}) for i in range(200)]
        await client.send(starts)
        await asyncio.sleep(0.95)  # the race itself: answers land around the 1 s timeouts
        await client.send([meshflow.Event(name="race/answer", data={"n": i}) for i in range(200)])
        runs = [await client.wait_for_run(race.run_id_for(e), timeout=30) for e in starts]
    assert all(r.status is meshflow.RunStatus.COMPLETED for r in runs)
    assert sorted(applied) == sorted(r.id for r in runs)  # every run went on exactly once
    for r in runs:
        answer = next(s for s in r.steps if s.id == "answer")
        assert (answer.output is None) == (r.output == "timeout")


async def test_if_conditions_compare_the_candidate_with_the_trigger(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("bids")

    @app.function("auction", trigger="auction/opened")
    async def auction(ctx: meshflow.Context) -> Any:
        bid = await ctx.step.wait_for_event(
            "bid",
            event="auction/bid",
            if_="async.data.item == event.data.item && async.data.amount > event.data.reserve",
            timeout="10s",
        )
        return bid.data["amount"] if bid else None

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        opened = meshflow.Event(name="auction/opened", data={"item": "vase", "reserve": 100})
        await client.send(opened)
        await client.send(
            [
                meshflow.Event(name="auction/bid", data={"item": "vase", "amount": 90}),
                meshflow.Event(name="auction/bid", data={"item": "lamp", "amount": 500}),
                meshflow.Event(name="auction/bid", data={"amount": 700}),  # no item: not a match
                meshflow.Event(name="auction/bid", data={"item": "vase", "amount": 120}),
            ]
        )
        run = await client.wait_for_run(auction.run_id_for(opened), timeout=20)
    assert run.output == 120


async def test_a_second_wait_for_the_same_event_takes_the_next_one(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("two")

    @app.function("two", trigger="pair/start")
    async def two(ctx: meshflow.Context) -> list[int]:
        first = await ctx.step.wait_for_event("a", event="pair/tick", match="data.k", timeout="10s")
        second = await ctx.step.wait_for_event("b", event="pair/tick", match="data.k", timeout="10s")
        return [e.data["n"] if e else -1 for e in (first, second)]

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        start = meshflow.Event(name="pair/start", data={"k": 1})
        await client.send(start)
        await client.send([meshflow.Event(name="pair/tick", data={"k": 1, "n": n}) for n in (1, 2)])
        run = await client.wait_for_run(two.run_id_for(start), timeout=20)
    assert run.output == [1, 2]


async def test_wait_for_any_takes_the_first_event_and_drops_the_rest(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("any")

    @app.function("ship", trigger="order/placed")
    async def ship(ctx: meshflow.Context) -> str | None:
        got = await ctx.step.wait_for_any(
            "outcome",
            [
                meshflow.WaitFor("order/paid", match="data.order"),
                meshflow.WaitFor("order/cancelled", match="data.order"),
            ],
            timeout="10s",
        )
        return got.name if got else None

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        order = meshflow.Event(name="order/placed", data={"order": 7})
        await client.send(order)
        await client.wait_for_run(ship.run_id_for(order), until=meshflow.RunStatus.WAITING)
        await client.send(meshflow.Event(name="order/cancelled", data={"order": 7}))
        await client.send(meshflow.Event(name="order/paid", data={"order": 7}))
        run = await client.wait_for_run(ship.run_id_for(order), timeout=20)
    assert run.output == "order/cancelled"


async def test_since_wait_ignores_events_sent_before_the_wait_began(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("strict")

    @app.function("strict", trigger="strict/start")
    async def strict(ctx: meshflow.Context) -> Any:
        await ctx.step.sleep("later", "300ms")
        got = await ctx.step.wait_for_event("ping", event="strict/ping", since="wait", timeout="1s")
        return got.data["n"] if got else None

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        start = meshflow.Event(name="strict/start")
        await client.send(start)
        await client.send(meshflow.Event(name="strict/ping", data={"n": 1}))  # before the wait
        run = await client.wait_for_run(strict.run_id_for(start), timeout=20)
    assert run.output is None


async def test_a_bad_wait_fails_the_run_with_a_clear_error(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("bad")

    @app.function("bad", trigger="bad/start")
    async def bad(ctx: meshflow.Context) -> Any:
        return await ctx.step.wait_for_event("w", event="x/y", if_="event.data.", timeout="1s")

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        start = meshflow.Event(name="bad/start")
        await client.send(start)
        run = await client.wait_for_run(bad.run_id_for(start), timeout=20)
    assert run.status is meshflow.RunStatus.FAILED
    assert run.error is not None
    assert run.error.type == "ConfigError"
    assert "step 'w' if_" in run.error.message


async def test_ten_thousand_waiting_runs_each_resume_once_by_their_own_event(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """10,000 runs wait on one event name, matched by id; 10,000 matching events (and 2,000 that
    match nobody) resume each run once, with its own event."""
    n = 10_000
    app = meshflow.App("many")

    @app.function("pay", trigger="invoice/sent")
    async def pay(ctx: meshflow.Context) -> Any:
        paid = await ctx.step.wait_for_event("paid", event="invoice/paid", match="data.id", timeout="10m")
        return paid.data if paid else None

    starts = [meshflow.Event(name="invoice/sent", data={"id": i}) for i in range(n)]
    payments = [meshflow.Event(name="invoice/paid", data={"id": i, "by": f"p{i}"}) for i in range(n)]
    for i in range(0, n, 5):  # payments for nobody's invoice among them
        payments.insert(i, meshflow.Event(name="invoice/paid", data={"id": n + i, "by": "nobody"}))
    # One subscription to every write of the runs bucket sees the runs end; 10,000 wait_for_run
    # watchers would each poll their record and load this one process more than the worker does.
    ended: dict[str, RunRecord] = {}

    async def on_write(msg: Any) -> None:
        if msg.data and not (msg.headers and msg.headers.get("KV-Operation")):
            record = decode_run(msg.data)
            if record.status.terminal:
                ended[record.id] = record

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace, concurrency=128):
        nc = await nats.connect(nats_server.url)
        try:
            await nc.subscribe(f"$KV.{client.names.runs_bucket}.>", cb=on_write, pending_msgs_limit=-1)
            await client.send(starts)
            waits = f"KV_{client.names.waits_bucket}"

            async def all_waiting() -> bool:
                info = await nc.jetstream().stream_info(waits)
                return bool(info.state.messages >= n + 2)  # history 1: a message per key, + 2 markers

            await wait_until(all_waiting, timeout=60, interval=0.2)
            assert not ended, "runs ended before any payment was sent"
            await client.send(payments)

            async def all_ended() -> bool:
                return len(ended) >= n

            await wait_until(all_ended, timeout=90, interval=0.2, message="every run ended")
        finally:
            await nc.close()
    outputs = {run_id: msgspec.json.decode(record.output) for run_id, record in ended.items()}
    assert outputs == {pay.run_id_for(e): {"id": i, "by": f"p{i}"} for i, e in enumerate(starts)}
    assert {record.status for record in ended.values()} == {meshflow.RunStatus.COMPLETED}


async def test_a_worker_started_later_routes_the_events_runs_wait_for(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """The worker that suspended the run is gone; the next one finds the waited-for name and
    routes it. Event names nobody waits for get no route at all."""
    app, approve = approval_app()
    submitted = meshflow.Event(name="expense/submitted", data={"expense_id": "e-9"})
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await client.send(submitted)
        await client.wait_for_run(approve.run_id_for(submitted), until=meshflow.RunStatus.WAITING)
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await client.send(meshflow.Event(name="expense/decided", data={"expense_id": "e-9", "ok": True}))
        run = await client.wait_for_run(approve.run_id_for(submitted), timeout=20)
        nc = await nats.connect(nats_server.url)
        try:
            consumers = await nc.jetstream().consumers_info(client.names.events_stream)
        finally:
            await nc.close()
    assert run.output == {"status": "approved", "by": None}
    routes = sorted(c.config.filter_subject for c in consumers if c.name.startswith("route-"))
    assert routes == [client.names.event_subject("expense/decided")]
