"""The sweeper: runs that outlived the messages that were to wake them are driven on again.

A suspended run is woken by a message its timer's schedule publishes, a queued run by its start
message, a run whose worker died by its message's redelivery. Those can be gone: an "advance run"
message expires after 7 days unconsumed (a function with no worker for a week), and a bad restore
of the server loses what it loses. Such a run waits forever, costing nothing and doing nothing.

One worker of the namespace at a time is the sweeper: it holds a lease in the flow bucket
(``sweeper``, taken and renewed by compare-and-set with a TTL, so another worker takes over when
it dies). Every `INTERVAL` seconds it reads the run records and, for every run that should have
moved on by now and has not (a pending item overdue by more than `GRACE_MS`, a queued run past its
start, a running run whose lease ran out that long ago), publishes the message that wakes it, with
an id per run, item and deadline, so two sweeps never wake a run twice. The pass that follows does
what the lost message would have done; a run that moved on meanwhile finds nothing to do.

The read is a scan of the runs bucket, a page of 1,024 records at a time: about a second per
100,000 runs, every five minutes, on one worker. The same sweep keeps the runs index whole
(`RunsIndex.repair`: it reads the index too, about as long again); a deployment whose index
does not yet hold every run is swept at once when its sweeper starts, not five minutes later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog

from .bus import Bus, RunMessage
from .durations import now_ms
from .errors import MeshflowError
from .names import sweep_wake_id
from .runs import NEVER, RunRecord, RunStatus
from .store import Store

log = structlog.get_logger("meshflow.sweeper")

INTERVAL = 300.0
#: How long past its deadline a run must be before it counts as stuck (its message had every
#: chance: the server's scheduler, a redelivery, a worker's restart).
GRACE_MS = 120_000
_LEASE_KEY = "sweeper"


class Sweeper:
    """Finds and wakes the stuck runs of one namespace, when this worker holds the sweeper lease."""

    def __init__(self, store: Store, bus: Bus, worker_id: str, *, interval: float = INTERVAL) -> None:
        self.store = store
        self.bus = bus
        self.worker_id = worker_id
        self.interval = interval
        self.woken = 0  # runs this sweeper woke, all told

    async def loop(self, stopping: asyncio.Event) -> None:
        """Sweep every ``interval`` seconds while this worker leads, until ``stopping`` is set."""
        at_once = self.store.index.enabled and not await self.store.index.ready()  # fill it in
        while not stopping.is_set():
            if not at_once:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.interval)
            at_once = False
            if stopping.is_set():
                return
            try:
                if await self.lead():
                    await self.sweep()
            except MeshflowError as exc:
                log.warning("the sweep failed; the next one tries again", error=str(exc))

    async def lead(self) -> bool:
        """Take or renew the sweeper lease (it outlives two intervals); whether this worker holds it."""
        ttl = int(self.interval * 2) + 60
        got = await self.store.get_flow(_LEASE_KEY)
        holder = got[0].decode() if got and got[0] else None
        if holder not in (None, self.worker_id):
            return False
        return await self.store.put_flow(_LEASE_KEY, self.worker_id.encode(), got[1] if got else 0, ttl)

    async def sweep(self, *, grace_ms: int = GRACE_MS) -> int:
        """Wake every run stuck for longer than ``grace_ms``; how many were woken."""
        now = now_ms()
        woken = 0

        async def records() -> AsyncIterator[RunRecord]:
            nonlocal woken
            async for record in self.store.iter_runs():
                yield record  # to the index's repair
                wake = stuck(record, now, grace_ms)
                if wake is None:
                    continue
                key, deadline = wake
                message = RunMessage(run_id=record.id, reason="sweep" if key else "start", key=key)
                await self.bus.publish_run(
                    record.app, record.fn, message, msg_id=sweep_wake_id(record.id, key, deadline)
                )
                overdue = now - deadline
                log.info("a stuck run was woken", run_id=record.id, item=key or None, overdue_ms=overdue)
                woken += 1

        written, removed = await self.store.index.repair(records())
        if written or removed:
            log.info("the runs index was put right", entries_written=written, entries_removed=removed)
        self.woken += woken
        return woken


def stuck(record: RunRecord, now: int, grace_ms: int) -> tuple[str, int] | None:
    """Whether ``record`` should have moved on more than ``grace_ms`` ago: the pending item (its
    key, "" for none) and the deadline it missed; None if it is where it should be."""
    if record.status.terminal:
        return None
    if record.status.suspended:
        overdue = [p for p in record.pending if p.until < NEVER and p.until + grace_ms < now]
        if overdue:
            item = min(overdue, key=lambda p: p.until)
            return item.key, item.until
        return None
    if record.status is RunStatus.QUEUED:
        due = record.not_before or record.created_at
        return ("", due) if due + grace_ms < now else None
    lease = record.lease  # running: its pass died, and its message with it?
    if lease is not None and lease.until + grace_ms < now:
        return "", lease.until
    return None
