"""W5, waiting: N runs suspended in ``wait_for_event``, resumed by N matching events.

The function ``waiter`` waits for ``bench/paid`` matching its trigger's ``data.id``. "Settled"
below means: every consumer of the events stream (the function's trigger consumer and whatever
routes events to waiting runs) has nothing pending and nothing unacknowledged (routing acks an
event after routing it), and so has the function's run consumer (a worker acks a run message
after writing the run's record). One run of W5 has six phases:

1. Routing, no run waiting: K ``bench/paid`` events whose ids no run waits for, sent in batches of
   1,000; routed/s is K over the time from just before the first send until settled.
2. One run (id -1) reaches its wait: its record says ``waiting``, then settled. The waits
   bucket's message count then (its entry plus the markers of its event name and match field;
   history 1, so one message per key) is the baseline of phase 4.
3. Routing with that one waiter: phase 1 again with other ids. A waiter on ``bench/paid`` that
   matches on a field costs the router a lookup of the field's match key per event, whatever the
   number of waiters; comparing phase 5 with this phase, not only with phase 1, isolates what
   the number of waiters costs.
4. N runs reach their wait: settled with N more messages in the waits bucket. Worker RSS is read
   here, with N + 1 runs waiting.
5. Routing with N + 1 waiters: phase 1 again with other ids.
6. N matching events in batches of 1,000, each carrying the wall time taken just before its batch
   is sent (``t_send``); the function takes ``t_resume`` at its first instruction after the
   wait, as W3 takes ``t_wake``. Done when settled (the router publishes a run's wake-up before
   acking its event); one sweep of the runs bucket then reads every output.

Resume latency ``t_resume - t_send`` therefore includes the queue: all N events are sent within
a fraction of a second, so the last ones wait for the N before them.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import msgspec

from meshflow.errors import RunTimeoutError
from meshflow.events import Event
from meshflow.runs import RunStatus

from . import apps
from .harness import Ctx, Measured
from .procs import rss_mb
from .stats import percentile

BATCH = 1000
#: The id of the one run that waits alone in phase 2; no event ever matches it.
_LONE = -1
_POLL = 0.02
_SLOW_POLL = 0.1


async def _until(ctx: Ctx, done: Callable[[], Awaitable[bool]], interval: float) -> float | None:
    """Poll ``done`` until it is true (return the monotonic time it was) or the deadline passes."""
    while ctx.remaining() > 0:
        if await done():
            return time.monotonic()
        await asyncio.sleep(interval)
    return None


async def _send_batches(ctx: Ctx, build: Callable[[range], list[Event]], n: int) -> int:
    """Send ``n`` events built a batch at a time, just before each send; how many were sent."""
    sent = 0
    for at in range(0, n, BATCH):
        batch = build(range(at, min(n, at + BATCH)))
        if not await ctx.send(batch):
            break
        sent += len(batch)
    return sent


async def _settled(ctx: Ctx, interval: float, entries: int = 0) -> float | None:
    """Poll until every event is routed, ``waiter``'s consumers are drained and the waits bucket
    holds at least ``entries`` messages; the monotonic time it held (None: the deadline hit)."""
    admin, names = ctx.target.admin, ctx.names

    async def settled() -> bool:
        return (
            await admin.events_drained(names)
            and await admin.drained(names, apps.waiter)
            and await admin.waits_messages(names) >= entries
        )

    return await _until(ctx, settled, interval)


async def _route_unmatched(ctx: Ctx, first_id: int, k: int) -> float | None:
    """Send ``k`` awaited-name events whose ids nobody waits for; their routed/s."""
    started = time.monotonic()

    def build(ids: range) -> list[Event]:
        return [Event(name=apps.EVENT_W5_PAID, data={"id": first_id + i}) for i in ids]

    if await _send_batches(ctx, build, k) < k or await _settled(ctx, _POLL) is None:
        return None
    return k / (time.monotonic() - started)


async def _lone_waiter(ctx: Ctx) -> int | None:
    """Start the run that waits alone; the waits bucket's message count once it waits."""
    event = Event(name=apps.TRIGGER_W5, data={"id": _LONE})
    if not await ctx.send(event):
        return None
    try:
        run = await ctx.client.wait_for_run(
            apps.waiter.run_id_for(event),
            timeout=max(0.0, ctx.remaining()),
            steps=False,
            until=RunStatus.WAITING,
        )
    except RunTimeoutError:
        return None
    if run.status is not RunStatus.WAITING:
        print(f"W5: the lone waiter ended {run.status}: {run.error}", file=sys.stderr)
        return None
    if await _settled(ctx, _POLL) is None:
        return None
    return await ctx.target.admin.waits_messages(ctx.names)


def _stalled(phase: str) -> None:
    print(f"W5: {phase} did not finish before the deadline", file=sys.stderr)  # explains "incomplete"


async def w5(ctx: Ctx) -> Measured:
    n, k = ctx.n(10_000), ctx.n(5_000)
    figures: dict[str, float] = {}
    worker_before = rss_mb(ctx.worker.pid)
    ctx.begin()

    # 1-3. routing with no run waiting, then with one; ids from n on are nobody's
    none = await _route_unmatched(ctx, n, k)
    entries = await _lone_waiter(ctx) if none is not None else None
    one = await _route_unmatched(ctx, n + k, k) if entries is not None else None
    if none is None or one is None or entries is None:
        _stalled("routing with no or one waiter")
        return Measured(figures, incomplete=True)
    figures["routed_0_per_s"], figures["routed_1_per_s"] = none, one

    # 4. N more runs reach their wait: one more waits entry each (history 1: a message per key)
    started = time.monotonic()
    triggers = [Event(name=apps.TRIGGER_W5, data={"id": i}) for i in range(n)]
    sent = await _send_batches(ctx, lambda ids: [triggers[i] for i in ids], n)
    waiting_at = await _settled(ctx, _SLOW_POLL, entries + n) if sent == n else None
    if waiting_at is None:
        _stalled(f"{n} runs reaching their wait")
        return Measured(figures, incomplete=True)
    figures["wait_s"] = waiting_at - started
    memory = {
        "worker_rss_idle_before_mb": worker_before,
        "worker_rss_waiting_mb": rss_mb(ctx.worker.pid),
        "server_rss_mb": rss_mb(ctx.target.server_pid),
    }
    figures.update({name: mb for name, mb in memory.items() if mb is not None})

    # 5. routing with N + 1 waiting
    many = await _route_unmatched(ctx, n + 2 * k, k)
    if many is None:
        _stalled(f"routing with {n} waiters")
        return Measured(figures, incomplete=True)
    figures["routed_n_per_s"] = many
    figures["routed_n_vs_0"] = many / none
    figures["routed_n_vs_1"] = many / one

    # 6. the N matching events
    first_send = time.time()
    started = time.monotonic()

    def payments(ids: range) -> list[Event]:
        t_send = time.time()
        return [Event(name=apps.EVENT_W5_PAID, data={"id": i, "t_send": t_send}) for i in ids]

    sent = await _send_batches(ctx, payments, n)
    done_at = await _settled(ctx, _POLL) if sent == n else None
    if done_at is None:
        _stalled(f"resuming {n} runs")
    outcomes = await ctx.target.admin.run_outcomes(ctx.names, within=max(1.0, ctx.remaining()))
    latencies: list[float] = []
    last_resume = first_send
    for run in outcomes.values():
        out = msgspec.json.decode(run.output) if run.status == RunStatus.COMPLETED else None
        if out is not None:
            latencies.append((out["t_resume"] - out["t_send"]) * 1000)
            last_resume = max(last_resume, out["t_resume"])
    if latencies:
        figures["resume_p50_ms"] = percentile(latencies, 50)
        figures["resume_p99_ms"] = percentile(latencies, 99)
        figures["resumes_per_s"] = len(latencies) / (last_resume - first_send)
    figures["wall_s"] = (done_at or time.monotonic()) - started
    figures["completed"] = len(latencies)
    return Measured(figures, incomplete=done_at is None or len(latencies) < n)
