"""W6, the scale of sleepers: N runs that each sleep for 1 h, and what holding them costs.

Timing runs from the first send until every run is sleeping. That moment is found cheaply
first: the function's trigger consumer and run consumer have nothing pending and nothing
unacknowledged (a worker acks a run message only after writing the run's record). One sweep of
the runs bucket then confirms that all N records say ``sleeping``; if not, sweeps repeat and the
confirming sweep's time counts.

Reported besides: worker RSS while idle before the load and after it, server RSS, bytes stored
in the namespace's streams, and the run consumer's ack-pending count (about 0: a sleeping run
holds no message).
"""

from __future__ import annotations

import asyncio
import time

from meshflow.events import Event

from . import apps
from .harness import Ctx, Measured
from .procs import rss_mb

BATCH = 1000
_POLL = 0.1


async def w6(ctx: Ctx) -> Measured:
    fn = apps.long_sleeper
    n = ctx.n(100_000)
    events = [Event(name=apps.TRIGGER_W6, data={"i": i}) for i in range(n)]
    admin, names = ctx.target.admin, ctx.names
    worker_before = rss_mb(ctx.worker.pid)
    ctx.begin()
    started = time.monotonic()
    sent = 0
    for at in range(0, n, BATCH):
        if not await ctx.send(events[at : at + BATCH]):
            break
        sent += len(events[at : at + BATCH])

    sleeping = 0
    done_at: float | None = None
    while sent == n and ctx.remaining() > 0:
        if await admin.drained(names, fn):
            seen = time.monotonic()
            counts = await admin.run_statuses(names, within=max(1.0, ctx.remaining()))
            sleeping = counts["sleeping"]
            if sleeping >= n:
                done_at = seen
                break
        await asyncio.sleep(_POLL)
    if done_at is None:
        done_at = time.monotonic()
        sleeping = (await admin.run_statuses(names, within=30.0))["sleeping"]

    figures: dict[str, float] = {
        "create_s": done_at - started,
        "runs_per_s": sleeping / (done_at - started),
        "sleeping": sleeping,
    }
    memory = {
        "worker_rss_idle_before_mb": worker_before,
        "worker_rss_after_mb": rss_mb(ctx.worker.pid),
        "server_rss_mb": rss_mb(ctx.target.server_pid),
    }
    figures.update({k: v for k, v in memory.items() if v is not None})
    figures["store_bytes"] = await admin.store_bytes(names)
    figures["run_ack_pending"] = await admin.run_ack_pending(names, fn)
    return Measured(figures, incomplete=sleeping < n)
