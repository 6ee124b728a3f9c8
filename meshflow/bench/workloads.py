"""The workloads W1-W4 and W7 of WORKLOADS.md: one body each, run by ``harness.with_worker``.

- W1 throughput: warm-up runs, then N events sent in one batch to a 3-step function; wall time
  from the first send to the last output seen.
- W2 latency: sequential runs of a 1-step function, send → output via ``client.wait_for_run``.
- W3 timers: runs that sleep 2 s; lateness ``t_wake - t_call - 2 s`` as recorded by the function.
- W4 fan-out: events matched by 5 functions each, one after another; send → all 5 outputs.
- W7 burst ingest: events matching no function, sent with ``client.send`` in batches of 1000
  (each batch pipelined by the client); events/s acknowledged by the server.
"""

from __future__ import annotations

import asyncio
import sys
import time

import msgspec

from meshflow.errors import RunTimeoutError
from meshflow.events import Event
from meshflow.runs import RunStatus

from . import apps
from .harness import Ctx, Measured, wait_outputs
from .stats import latency_figures, percentile

#: Long enough for any single run; the workload's deadline is what really bounds the wait.
_RUN_TIMEOUT = 3600.0
W7_BATCH = 1000


def _events(trigger: str, n: int) -> list[Event]:
    return [Event(name=trigger, data={"i": i}) for i in range(n)]


async def w1(ctx: Ctx) -> Measured:
    fn = apps.three_steps
    warmup = _events(apps.TRIGGER_W1, ctx.n(100, minimum=1))
    if not await ctx.send(warmup):
        return Measured({"warmup_completed": 0}, incomplete=True)
    warmed = await wait_outputs(ctx, [fn.run_id_for(e) for e in warmup])
    if len(warmed) < len(warmup):
        return Measured({"warmup_completed": len(warmed)}, incomplete=True)

    events = _events(apps.TRIGGER_W1, ctx.n(2000))
    ctx.begin()
    started = time.monotonic()
    if not await ctx.send(events):
        return Measured({"completed": 0}, incomplete=True)
    finished = await wait_outputs(ctx, [fn.run_id_for(e) for e in events])
    completed = sum(1 for _, r in finished.values() if r.status is RunStatus.COMPLETED)
    last = max((t for t, _ in finished.values()), default=time.monotonic())
    wall = last - started
    return Measured(
        {
            "runs_per_s": completed / wall,
            "steps_per_s": 3 * completed / wall,
            "wall_s": wall,
            "completed": completed,
        },
        incomplete=completed < len(events),
    )


async def w2(ctx: Ctx) -> Measured:
    fn = apps.one_step
    n = ctx.n(300)
    latencies: list[float] = []
    incomplete = False
    for i in range(n):
        event = Event(name=apps.TRIGGER_W2, data={"i": i})
        started = time.perf_counter()
        try:
            await asyncio.wait_for(ctx.client.send(event), ctx.remaining())
            run = await ctx.client.wait_for_run(
                fn.run_id_for(event), timeout=max(0.0, ctx.remaining()), steps=False
            )
        except (TimeoutError, RunTimeoutError):
            incomplete = True
            break
        latencies.append((time.perf_counter() - started) * 1000)
        if run.status is not RunStatus.COMPLETED:
            incomplete = True
            break
    figures = latency_figures(latencies)
    figures["completed"] = len(latencies)
    return Measured(figures, incomplete=incomplete or len(latencies) < n)


async def w3(ctx: Ctx) -> Measured:
    fn = apps.sleeper
    events = _events(apps.TRIGGER_W3, ctx.n(500))
    ctx.begin()
    started = time.monotonic()
    if not await ctx.send(events):
        return Measured({"completed": 0}, incomplete=True)
    # No run can finish before its sleep ends (never early), so polling starts only then.
    await asyncio.sleep(min(apps.SLEEP_S, max(0.0, ctx.remaining())))
    finished = await wait_outputs(ctx, [fn.run_id_for(e) for e in events])
    lateness: list[float] = []
    for _, record in finished.values():
        if record.status is RunStatus.COMPLETED:
            out = msgspec.json.decode(record.output)
            lateness.append((out["t_wake"] - out["t_call"] - apps.SLEEP_S) * 1000)
    last = max((t for t, _ in finished.values()), default=time.monotonic())
    figures: dict[str, float] = {}
    if lateness:
        figures["lateness_p50_ms"] = percentile(lateness, 50)
        figures["lateness_p99_ms"] = percentile(lateness, 99)
    figures["early_wakes"] = sum(1 for ms in lateness if ms < 0)
    figures["wall_s"] = last - started
    figures["completed"] = len(lateness)
    return Measured(figures, incomplete=len(lateness) < len(events))


async def w4(ctx: Ctx) -> Measured:
    n = ctx.n(100)
    latencies: list[float] = []
    first = time.perf_counter()
    for i in range(n):
        event = Event(name=apps.TRIGGER_W4, data={"i": i})
        started = time.perf_counter()
        waits = (
            ctx.client.wait_for_run(fn.run_id_for(event), timeout=_RUN_TIMEOUT, steps=False)
            for fn in apps.FANOUT
        )
        try:
            await asyncio.wait_for(ctx.client.send(event), ctx.remaining())
            runs = await asyncio.wait_for(asyncio.gather(*waits), ctx.remaining())
        except TimeoutError:
            break
        latencies.append((time.perf_counter() - started) * 1000)
        failed = [run for run in runs if run.status is not RunStatus.COMPLETED]
        if failed:  # say why on stderr: an incomplete line must be explainable
            print(f"W4: run {failed[0].id} ended {failed[0].status}: {failed[0].error}", file=sys.stderr)
            break
    wall = time.perf_counter() - first
    figures = latency_figures(latencies)
    figures["runs_per_s"] = len(apps.FANOUT) * len(latencies) / wall
    figures["completed"] = len(latencies)
    return Measured(figures, incomplete=len(latencies) < n)


async def w7(ctx: Ctx) -> Measured:
    events = _events(apps.TRIGGER_W7, ctx.n(100_000))
    ctx.begin()
    sent = 0
    started = time.perf_counter()
    for at in range(0, len(events), W7_BATCH):
        batch = events[at : at + W7_BATCH]
        if not await ctx.send(batch):
            break
        sent += len(batch)
    wall = time.perf_counter() - started
    figures = {"events_per_s": sent / wall, "wall_s": wall, "sent": sent}
    return Measured(figures, incomplete=sent < len(events))
