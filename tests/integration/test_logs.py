"""A run's logs through the client and the CLI: kept per run with step, attempt, level and
fields; parallel steps kept apart; not logged again on replay; followed live; bounded."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until


async def test_logs_keep_step_attempt_level_and_fields_and_are_not_logged_again_on_replay(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("logs")
    calls = [0]

    @app.function("flaky", trigger="logs/flaky", retries=meshflow.Retry(retries=2, backoff=("100ms",)))
    async def flaky(ctx: meshflow.Context) -> str:
        ctx.logger.info("starting", order=7)

        async def charge() -> str:
            calls[0] += 1
            ctx.logger.warning("charging", attempt_seen=calls[0])
            if calls[0] == 1:
                raise ConnectionError("card service down")
            return "charged"

        result = await ctx.step.run("charge", charge)
        await ctx.step.sleep("pause", "50ms")  # a second pass replays "charge" silently
        ctx.logger.error("done: %s", result)
        return str(result)

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace, worker_id="w-logs"):
        event = meshflow.Event(name="logs/flaky")
        await client.send(event)
        run = await client.wait_for_run(flaky.run_id_for(event), timeout=30)
    assert run.output == "charged"

    records = await client.logs(run.id)
    in_steps = [(r.step_id, r.attempt, r.level, r.message, r.fields) for r in records if r.step_id]
    assert in_steps == [
        ("charge", 1, "warning", "charging", {"attempt_seen": 1}),
        ("charge", 2, "warning", "charging", {"attempt_seen": 2}),
    ]
    body = [(r.level, r.message) for r in records if r.step_id is None]
    # "starting" once per pass (the body runs again each pass, outside steps), "done" once:
    assert body.count(("error", "done: charged")) == 1
    assert ("info", "starting") in body
    assert all(r.worker == "w-logs" and r.run_id == run.id and r.marker is None for r in records)
    assert [r.ts for r in records] == sorted(r.ts for r in records)


async def test_logs_of_two_parallel_steps_are_kept_apart(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("logs")

    @app.function("fan", trigger="logs/fan")
    async def fan(ctx: meshflow.Context) -> list[str]:
        async def work(name: str) -> str:
            for i in range(5):
                ctx.logger.info(f"{name} line {i}")
                await asyncio.sleep(0)
            return name

        return list(await asyncio.gather(*(ctx.step.run(n, work, n) for n in ("left", "right"))))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="logs/fan")
        await client.send(event)
        run = await client.wait_for_run(fan.run_id_for(event), timeout=30)

    records = await client.logs(run.id)
    for name in ("left", "right"):
        mine = [r.message for r in records if r.step_id == name]
        assert mine == [f"{name} line {i}" for i in range(5)]


async def test_follow_logs_gives_the_past_then_live_lines_and_ends_with_the_run(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("logs")
    go_on = asyncio.Event()

    @app.function("live", trigger="logs/live")
    async def live(ctx: meshflow.Context) -> str:
        async def before() -> None:
            ctx.logger.info("before")

        async def after() -> None:
            await go_on.wait()
            ctx.logger.info("after")

        await ctx.step.run("before", before)
        await ctx.step.run("after", after)
        return "ok"

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="logs/live")
        await client.send(event)
        run_id = live.run_id_for(event)
        await wait_until(lambda: _has(client, run_id, "before"), timeout=20, message="the first line is kept")
        seen: list[str] = []

        async def follow() -> None:
            async for record in client.follow_logs(run_id, poll=0.2):
                seen.append(record.message)
                if record.message == "before":
                    go_on.set()  # the next line is logged only now: it can only arrive live

        await asyncio.wait_for(follow(), timeout=30)  # ends on its own when the run ends
    assert seen == ["before", "after"]


async def _has(client: meshflow.Client, run_id: str, message: str) -> bool:
    try:
        return any(r.message == message for r in await client.logs(run_id))
    except meshflow.RunNotFoundError:
        return False


async def test_a_log_flood_is_truncated_with_a_marker_and_the_step_is_unaffected(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("logs")

    class Unencodable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    @app.function("flood", trigger="logs/flood")
    async def flood(ctx: meshflow.Context) -> int:
        def noisy() -> int:
            ctx.logger.info("odd", value=Unencodable(), big="x" * 100_000)
            for i in range(100_000):
                ctx.logger.info("line", i=i)
            return 1

        return int(await ctx.step.run("noisy", noisy))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="logs/flood")
        await client.send(event)
        run = await client.wait_for_run(flood.run_id_for(event), timeout=60)
    assert run.output == 1

    records = await client.logs(run.id)
    assert len(records) == 1_001
    first, *_, last = records
    assert first.message == "odd"
    assert first.fields["value"] == "<Unencodable that cannot be shown: its repr() failed>"
    assert first.fields["big"].endswith("… [95904 more characters not kept]")
    assert last.marker == "truncated"
    assert "more than 1000 records" in last.message


async def test_stdlib_logging_is_kept_when_captured(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("logs")
    logger = logging.getLogger("shop.payments")

    @app.function("std", trigger="logs/std")
    async def std(ctx: meshflow.Context) -> None:
        def pay() -> None:  # in a thread: the run's context goes with it
            logger.warning("paid %d", 3)

        await ctx.step.run("pay", pay)

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace, capture_logging=True):
        event = meshflow.Event(name="logs/std")
        await client.send(event)
        run = await client.wait_for_run(std.run_id_for(event), timeout=30)
    logger.warning("outside any run")  # not kept anywhere
    [record] = await client.logs(run.id)
    assert (record.step_id, record.level, record.message) == ("pay", "warning", "paid 3")
    assert record.fields == {"logger": "shop.payments"}


async def test_logs_of_an_unknown_run_is_a_clear_error(client: meshflow.Client) -> None:
    with pytest.raises(meshflow.RunNotFoundError, match="no-such-run"):
        await client.logs("no-such-run")


async def test_the_cli_prints_a_runs_logs(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("logs")

    @app.function("cli", trigger="logs/cli")
    async def cli(ctx: meshflow.Context) -> None:
        await ctx.step.run("hello", lambda: ctx.logger.info("hello from a step", who="cli"))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="logs/cli")
        await client.send(event)
        run = await client.wait_for_run(cli.run_id_for(event), timeout=30)
    args = ["-m", "meshflow", "logs", run.id, "--nats", nats_server.url, "--namespace", namespace]
    out = await asyncio.to_thread(subprocess.run, [sys.executable, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "info" in out.stdout
    assert "hello#1 hello from a step who=cli" in out.stdout
