"""Poison and hostile input at every edge: each gets a clear error on that item alone, and the worker
keeps serving. Whatever is published raw here, another language's client could publish."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from structlog.testing import capture_logs

import meshflow
from meshflow.ids import step_hash
from meshflow.names import Names, kv_subject
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until

app = meshflow.App("poison")


@app.function("echo", trigger="poison/*", retries=0)
async def echo(ctx: meshflow.Context) -> Any:
    await ctx.step.run("touch", lambda: "ok")
    return ctx.event.data


@app.function("napper", trigger="nap/go", retries=0)
async def napper(ctx: meshflow.Context) -> str:
    await ctx.step.run("before", lambda: "x")
    await ctx.step.sleep("nap", "1h")
    return "woke"


@pytest.fixture
async def raw(nats_server: EmbeddedServer) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def still_serves(client: meshflow.Client) -> None:
    event = meshflow.Event(name="poison/check", data={"still": "serving"})
    await client.send(event)
    run = await client.wait_for_run(echo.run_id_for(event), timeout=30)
    assert run.output == {"still": "serving"}


@pytest.mark.parametrize(
    "payload",
    [
        b"not json at all",
        b'{"data": {"no": "name"}}',
        b'{"name": "poison/x", "data": [1, 2]}',
        b'{"name": 42}',
        b"[" * 5000 + b"]" * 5000,
        msgspec.json.encode({"name": "poison/x", "data": {"deep": _deep}})
        if (_deep := {}) is not None
        else b"",
    ],
    ids=["garbage", "no-name", "data-not-object", "name-not-string", "deep-array", "empty-nesting"],
)
async def test_an_event_that_is_not_one_is_dropped_alone(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, raw: NatsClient, payload: bytes
) -> None:
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await raw.jetstream().publish(Names(namespace).event_subject("poison/x"), payload)
        await still_serves(client)


async def test_deeply_nested_event_data_runs_or_is_refused_clearly_never_wedging_the_worker(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, raw: NatsClient
) -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(400):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(meshflow.EventError, match="recursion"):
        await client.send(meshflow.Event(name="poison/deep", data={"d": _nested(5000)}))
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="poison/deep", data=deep)
        await client.send(event)
        assert (
            await client.wait_for_run(echo.run_id_for(event), timeout=30)
        ).status is meshflow.RunStatus.COMPLETED
        too_deep = b'{"name": "poison/deeper", "data": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001
        await raw.jetstream().publish(Names(namespace).event_subject("poison/deeper"), too_deep)
        await still_serves(client)


def _nested(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    inner = out
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    return out


@pytest.mark.parametrize(
    "data",
    [{"rtl": "\u200f\u202eevil"}, {"nul": "a\u0000b"}, {"combining": "e\u0301"}, {"emoji": "🛒" * 100}],
)
async def test_odd_unicode_in_names_and_data_round_trips(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, data: dict[str, str]
) -> None:
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="poison/🛒.paid", data=data)
        await client.send(event)
        run = await client.wait_for_run(echo.run_id_for(event), timeout=30)
    assert run.output == data


async def test_data_python_cannot_encode_as_json_is_refused_before_sending(client: meshflow.Client) -> None:
    with pytest.raises(meshflow.EventError, match="surrogates"):
        await client.send(meshflow.Event(name="poison/x", data={"s": "\ud800"}))


async def test_forged_headers_on_an_event_change_nothing_meshflow_does(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, raw: NatsClient
) -> None:
    # (the server itself refuses schedule and TTL headers on the events stream)
    headers = {"KV-Operation": "DEL", "Nats-Rollup-Not": "all", "Meshflow-Run": "forged", "X-": "?"}
    body = msgspec.json.encode({"name": "poison/forged", "id": "forged-1", "data": {"a": 1}})
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await raw.jetstream().publish(Names(namespace).event_subject("poison/forged"), body, headers=headers)
        run = await client.wait_for_run(echo.run_id_for("forged-1"), timeout=30)
    assert run.output == {"a": 1}


async def test_run_messages_and_timers_for_runs_that_do_not_exist_are_dropped(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, raw: NatsClient
) -> None:
    names = Names(namespace)
    js = raw.jetstream()
    with capture_logs() as logs:
        async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
            subject = names.run_subject("poison", "echo")
            for body in (
                {"run_id": "01J0000000000000000000NONE", "reason": "start"},
                {"run_id": "01J0000000000000000000NONE", "reason": "timer", "key": "abc"},
                {"run_id": "../../etc", "reason": "start"},
                {"run_id": "", "reason": "cron", "key": "nope:123"},
            ):
                await js.publish(subject, msgspec.json.encode(body))
            await js.publish(subject, b"{not a run message")
            await still_serves(client)
            await wait_until(lambda: sum("unknown run" in e["event"] for e in logs) >= 3, timeout=10)
    assert any("undecodable run message" in e["event"] for e in logs)


async def test_a_run_record_edited_into_garbage_fails_clearly_and_alone(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, raw: NatsClient
) -> None:
    names = Names(namespace)
    with capture_logs() as logs:
        async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
            event = meshflow.Event(name="nap/go")
            await client.send(event)
            run_id = napper.run_id_for(event)
            await client.wait_for_run(run_id, timeout=30, until=meshflow.RunStatus.SLEEPING)
            await raw.jetstream().publish(kv_subject(names.runs_bucket, run_id), b'{"id": "edited by hand"}')
            with pytest.raises(meshflow.StateError, match="cannot be read"):
                await client.get_run(run_id)
            wake = {"run_id": run_id, "reason": "timer", "key": step_hash("nap")}
            await raw.jetstream().publish(names.run_subject("poison", "napper"), msgspec.json.encode(wake))
            await wait_until(lambda: any("cannot be read dropped" in e["event"] for e in logs), timeout=10)
            await still_serves(client)
    runs, _ = await client.list_runs()
    assert run_id not in {r.id for r in runs}  # left out of the list, which still works


async def test_a_step_result_edited_into_garbage_fails_its_run_saying_so(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, raw: NatsClient
) -> None:
    names = Names(namespace)
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="nap/go")
        await client.send(event)
        run_id = napper.run_id_for(event)
        await client.wait_for_run(run_id, timeout=30, until=meshflow.RunStatus.SLEEPING)
        memo = kv_subject(names.steps_bucket, names.step_key(run_id, step_hash("before")))
        await raw.jetstream().publish(memo, b"\x00\x01 not a memo")
        await client.cancel(run_id)  # wakes it: the pass loads the memos first
        run = await client.wait_for_run(run_id, timeout=30, steps=False)
        assert run.status is meshflow.RunStatus.FAILED
        assert run.error is not None
        assert run.error.type == "StateError"
        assert "cannot be read" in run.error.message
        await still_serves(client)
