"""Events fan out to every matching function, once per (function, event id)."""

from __future__ import annotations

from collections import Counter

import meshflow
from meshflow.events import encode_event
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until


async def test_one_event_starts_one_run_in_each_matching_function(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("fan")
    executions: Counter[str] = Counter()

    @app.function("exact", trigger="order/created")
    async def exact(ctx: meshflow.Context) -> str:
        executions["exact", ctx.event.id] += 1
        return "exact"

    @app.function("wildcard", trigger="order/*")
    async def wildcard(ctx: meshflow.Context) -> str:
        executions["wildcard", ctx.event.id] += 1
        return "wildcard"

    @app.function("two-triggers", trigger=["invoice/paid", "order/created"])
    async def two(ctx: meshflow.Context) -> str:
        executions["two", ctx.event.id] += 1
        return "two"

    @app.function("unrelated", trigger="user/signup")
    async def unrelated(ctx: meshflow.Context) -> str:
        executions["unrelated", ctx.event.id] += 1
        return "unrelated"

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="order/created", data={"total": 12})
        assert await client.send(event) == [event.id]
        await client.send(event)  # the same id again: deduplicated by the stream
        runs = [await client.wait_for_run(fn.run_id_for(event)) for fn in (exact, wildcard, two)]
        assert [r.status for r in runs] == [meshflow.RunStatus.COMPLETED] * 3
        assert [r.output for r in runs] == ["exact", "wildcard", "two"]

        # A later event's runs finishing proves the worker has seen everything before it.
        later = meshflow.Event(name="order/created")
        await client.send(later)
        for fn in (exact, wildcard, two):
            await client.wait_for_run(fn.run_id_for(later))

    assert executions[("exact", event.id)] == 1
    assert executions[("wildcard", event.id)] == 1
    assert executions[("two", event.id)] == 1
    assert ("unrelated", event.id) not in executions
    found = {r.function_id for r in await client.runs_for_event(event.id)}
    assert found == {"fan-exact", "fan-wildcard", "fan-two-triggers"}


async def test_an_event_stored_twice_past_the_dedupe_window_still_makes_one_run(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """The run claim (a KV create keyed by function and event id) dedupes beyond the stream window."""
    app = meshflow.App("dedupe")
    executions: list[str] = []

    @app.function("once", trigger="thing/happened")
    async def once(ctx: meshflow.Context) -> None:
        executions.append(ctx.event.id)

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="thing/happened")
        await client.send(event)
        await client.wait_for_run(once.run_id_for(event))
        # Store the same event again without a Nats-Msg-Id, as a resend after the window would.
        js = client._bus.js
        await js.publish(client.names.event_subject(event.name), encode_event(event))
        marker = meshflow.Event(name="thing/happened")
        await client.send(marker)
        await client.wait_for_run(once.run_id_for(marker))
        await wait_until(lambda: marker.id in executions)

    assert executions.count(event.id) == 1


async def test_in_normal_operation_each_event_is_delivered_to_its_function_once(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """No event comes back for redelivery when nothing fails: a worker that errors on its way
    to starting a run (and so leaves the event to be redelivered) shows up here."""
    app = meshflow.App("once")

    @app.function("plain", trigger="once/go")
    async def plain(ctx: meshflow.Context) -> int:
        return int(await ctx.step.run("one", lambda: 1))

    # Flow control's path to a start, with limits the test never reaches: a run that finds every
    # slot taken waits by having its event redelivered later, which is by design, not a failure
    # (on a loaded machine, 20 runs spaced 10 ms apart overlap more than 5 at a time).
    @app.function(
        "limited",
        trigger="once/go",
        concurrency=meshflow.Concurrency(limit=50),
        throttle=meshflow.Throttle(limit=100, period="1s"),
    )
    async def limited(ctx: meshflow.Context) -> int:
        return int(await ctx.step.run("one", lambda: 1))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        events = [meshflow.Event(name="once/go", data={"i": i}) for i in range(20)]
        await client.send(events)
        for fn in (plain, limited):
            for e in events:
                await client.wait_for_run(fn.run_id_for(e), steps=False)

        async def acked() -> bool:
            counts = [await client.events_handled(f.full_id) for f in (plain, limited)]
            return all(n >= 20 for n in counts)

        await wait_until(acked, timeout=10)
        handled = {f.full_id: await client.events_handled(f.full_id) for f in (plain, limited)}
    assert handled == {plain.full_id: 20, limited.full_id: 20}
