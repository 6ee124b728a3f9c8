"""Bad input gets a clear error on that event or run only; the worker keeps serving."""

from __future__ import annotations

import pytest

import meshflow
from meshflow.server import EmbeddedServer


async def test_an_invalid_event_name_is_refused_before_anything_is_sent(client: meshflow.Client) -> None:
    good = meshflow.Event(name="user/ok")
    with pytest.raises(meshflow.EventError, match="whitespace"):
        await client.send([good, meshflow.Event(name="user signed up")])
    info = await client._bus.js.stream_info(client.names.events_stream)
    assert info.state.messages == 0  # the valid event in the batch was not sent either


async def test_an_event_over_the_servers_max_payload_is_refused(client: meshflow.Client) -> None:
    big = meshflow.Event(name="blob/uploaded", data={"blob": "x" * (2 * 1024 * 1024)})
    with pytest.raises(meshflow.EventError, match="max_payload"):
        await client.send(big)


async def test_bad_runs_fail_alone_and_the_worker_keeps_serving(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("bad")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("str() is broken too")

    def unserializable() -> object:
        return object()

    def exits() -> None:
        raise SystemExit(3)

    def unprintable() -> None:
        raise Unprintable()

    handlers = {"unserializable": unserializable, "exits": exits, "unprintable": unprintable}

    @app.function("bad", trigger="bad/*", retries=meshflow.Retry(retries=1, backoff=("100ms",)))
    async def bad(ctx: meshflow.Context) -> str:
        kind = ctx.event.name.split("/")[1]
        if kind == "ok":
            return "fine"
        await ctx.step.run(kind, handlers[kind])
        return "unreachable"

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        events = {kind: meshflow.Event(name=f"bad/{kind}") for kind in [*handlers, "ok"]}
        await client.send(list(events.values()))
        runs = {kind: await client.wait_for_run(bad.run_id_for(e)) for kind, e in events.items()}

    assert runs["ok"].status is meshflow.RunStatus.COMPLETED
    for kind in handlers:
        assert runs[kind].status is meshflow.RunStatus.FAILED, kind
    step_errors = {kind: runs[kind].steps[0].error for kind in handlers}
    assert step_errors["unserializable"] is not None
    assert "step 'unserializable'" in step_errors["unserializable"].message
    assert "JSON" in step_errors["unserializable"].message
    assert step_errors["exits"] is not None
    assert step_errors["exits"].type == "SystemExit"
    assert step_errors["unprintable"] is not None
    assert "str() of Unprintable raised" in step_errors["unprintable"].message
    # Not retriable: each bad step ran its handler once.
    assert [runs[k].steps[0].attempts for k in ("unserializable", "exits")] == [1, 1], {
        k: runs[k] for k in handlers
    }
