"""Cron triggers: exactly one run per tick, however many workers run, and when none does."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from contextlib import AsyncExitStack

import meshflow
from meshflow.durations import epoch_ms, parse_when
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until


def ticking_app(ticks: Counter[str]) -> tuple[meshflow.App, meshflow.Function]:
    app = meshflow.App("clock")

    @app.function("tick", trigger=meshflow.TriggerCron("@every 1s"))
    async def tick(ctx: meshflow.Context) -> str:
        ticks[ctx.event.data["tick"]] += 1
        assert ctx.event.name == "meshflow/cron"
        return str(ctx.event.data["tick"])

    return app, tick


async def test_three_workers_make_one_run_per_tick(nats_server: EmbeddedServer, namespace: str) -> None:
    ticks: Counter[str] = Counter()
    app, _ = ticking_app(ticks)
    async with AsyncExitStack() as stack:
        for i in range(3):
            worker = meshflow.Worker(app, nats=nats_server.url, namespace=namespace, worker_id=f"w{i}")
            await stack.enter_async_context(worker)
        await wait_until(lambda: len(ticks) >= 4, timeout=20)
    assert set(ticks.values()) == {1}, ticks


async def test_a_tick_missed_while_no_worker_runs_fires_once_when_one_returns(
    nats_server: EmbeddedServer, namespace: str
) -> None:
    ticks: Counter[str] = Counter()
    app, _ = ticking_app(ticks)
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await wait_until(lambda: len(ticks) >= 1, timeout=20)
    stopped = time.time()
    await asyncio.sleep(3.2)  # the scenario itself: three ticks pass with no worker running
    returned = time.time()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await wait_until(lambda: any(_epoch(t) > returned for t in ticks), timeout=20)
    missed = [t for t in ticks if stopped < _epoch(t) <= returned]
    assert len(missed) == 1, sorted(ticks)
    assert set(ticks.values()) == {1}


def _epoch(tick: str) -> float:
    return epoch_ms(parse_when(tick)) / 1000


async def test_the_next_tick_is_readable(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("weekly")

    @app.function("digest", trigger=[meshflow.TriggerCron("TZ=Europe/Paris 0 9 * * MON"), "digest/now"])
    async def digest(ctx: meshflow.Context) -> None:
        return None

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        pass
    wednesday = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)
    assert await client.next_ticks(digest.full_id, after=wednesday) == [
        dt.datetime(2026, 11, 30, 8, tzinfo=dt.UTC)  # 09:00 in Paris, in winter
    ]
    [info] = [f for f in await client.functions() if f.full_id == digest.full_id]
    assert info.crons == ["TZ=Europe/Paris 0 9 * * MON"]
    assert info.triggers == ["digest/now"]
