"""Where runs come from: an event a function's trigger matches, or a cron tick.

A worker (``meshflow.worker.Worker``) hands it each event: it checks the trigger's
``if_``, claims an idempotency key, asks the start-time flow controls (rate limit, singleton,
throttle) whether and when the run starts, then creates the run record under an id derived from
the function and the event (or the cron tick), so a redelivered event or a second worker finds the
claim and never starts a second run. A run that may start now is advanced at once, by the worker
that created it (`Passes.advance`); one that starts later is queued with a timer.
"""

from __future__ import annotations

import contextlib
import hashlib

import msgspec
import structlog

from . import tracing
from .bus import Bus, Delivery, RunMessage
from .control import request_cancel
from .cron import Cron
from .durations import from_ms, now_ms, rfc3339
from .errors import RunNotFoundError
from .events import Event, decode_stored_event
from .flow.starts import Admission, Starts
from .flow.windows import Windows
from .functions import Function
from .ids import run_id_for
from .lifecycle import Lifecycle
from .names import EVENT_CRON, cron_event_id
from .passes import Passes
from .runs import ErrorInfo, RunStatus, new_lease, new_run, record_limit, record_size, too_large_to_run
from .settle import TRIGGER
from .store import Store

log = structlog.get_logger("meshflow.worker")

_NOW = Admission()


class Triggers:
    """Turns the events a worker's functions are triggered by, and their cron ticks, into runs."""

    def __init__(
        self,
        *,
        worker_id: str,
        lease_ms: int,
        store: Store,
        bus: Bus,
        life: Lifecycle,
        starts: Starts,
        windows: Windows,
        passes: Passes,
    ) -> None:
        self.id = worker_id
        self.lease_ms = lease_ms
        self.store = store
        self.bus = bus
        self.life = life
        self.starts = starts
        self.windows = windows
        self.passes = passes

    async def on_event(self, fn: Function, delivery: Delivery) -> None:
        """Claim the event's run and advance it here at once (the claim is also the lease).

        The event is acked only after the run's first pass is written, so a worker dying on the
        way leaves the event to be redelivered; the redelivery finds the claim and resumes it.
        """
        try:
            event = decode_stored_event(
                delivery.data,
                stream=self.bus.names.events_stream,
                seq=delivery.seq,
                stored_ms=delivery.stored_ms,
            )
        except msgspec.DecodeError as exc:
            log.error(
                "undecodable event dropped", function=fn.full_id, subject=delivery.subject, error=str(exc)
            )
            await delivery.term()
            return
        if not fn.matches(event):
            await delivery.ack()
            return
        run_id = fn.run_id_for(event)
        if fn.idempotency is not None and not await self.life.claim_key(fn, event, run_id):
            await delivery.ack()
            return
        seq = delivery.seq
        admission = Admission()
        if fn.flow.gated:
            existing = await self.store.get_run(run_id)
            if existing is not None:  # a redelivered event: its run was decided already
                await self.passes.resume(fn, delivery, TRIGGER, run_id, existing)
                return
            admission = await self.starts.admit(fn, event, run_id)
            if admission.skip is None and (fn.flow.debounce or fn.flow.batch):
                opened = await self.windows.gather(fn, event, run_id, seq, tracing.carried(delivery.headers))
                if opened is not None:  # this event opened a window: its run waits for its start
                    await self.life.arm(fn, opened)
                await delivery.ack()
                return
        await self._start_run(fn, delivery, event, run_id, seq=seq, admission=admission)

    async def _start_run(
        self,
        fn: Function,
        delivery: Delivery,
        event: Event,
        run_id: str,
        *,
        seq: int,
        admission: Admission = _NOW,
    ) -> None:
        """Create a run and advance it here at once; or queue it (a future ``ts``, a throttle),
        or record it skipped (a rate limit, a singleton)."""
        now = now_ms()
        not_before = max(event.ts, admission.start_at)
        queued = not_before > now
        record = new_run(
            run_id,
            app=fn.app_id,
            fn=fn.id,
            events=[event],
            now=now,
            status=RunStatus.QUEUED if queued else RunStatus.RUNNING,
            started_at=None if queued else now,
            lease=None if queued else new_lease(self.id, now, self.lease_ms),
            failure_of=event.data.get("run_id") if fn.failure_of else None,
            seq=seq,
            not_before=not_before if queued else 0,
            armed=True,
            # every pass joins the trace of the event's sender (a cron tick's run: one of its own)
            trace=tracing.for_new_run(fn.full_id, run_id, tracing.carried(delivery.headers)),
        )
        if fn.flow.concurrency and not queued and admission.skip is None:
            # it starts when a slot is free: created without a lease, then taken like any run
            record = msgspec.structs.replace(record, status=RunStatus.QUEUED, lease=None, started_at=None)
        if admission.skip is not None:
            record = msgspec.structs.replace(
                record,
                status=RunStatus.SKIPPED,
                lease=None,
                started_at=None,
                ended_at=now,
                not_before=0,
                error=ErrorInfo(type="Skipped", message=admission.skip, retriable=False),
            )
        limit = record_limit(self.bus.max_payload)
        too_large = record_size(record) > limit  # published raw, too large to run: it fails, visibly
        if too_large:
            record = too_large_to_run(record, limit, now)
        rev = await self.store.create_run(record)
        if rev is None:  # claimed before: a resent or redelivered event
            await self.passes.resume(fn, delivery, TRIGGER, run_id)
            return
        if too_large:
            log.error("run failed at once", run_id=run_id, function=fn.full_id, error=record.error)
            await self.passes.emit_ended(fn, record)
            self.passes.ended(record)
            await delivery.ack()
            return
        if admission.skip is not None:
            log.info("run skipped", run_id=run_id, function=fn.full_id, reason=admission.skip)
            self.passes.ended(record)
            await delivery.ack()
            return
        if admission.replaces is not None:
            with contextlib.suppress(RunNotFoundError):
                reason = f"replaced by run {run_id} (singleton)"
                await request_cancel(self.store, self.bus, admission.replaces, reason)
        cancelled = await self.life.arm(fn, record)
        if queued or cancelled:
            await delivery.ack()
            return
        if record.status is RunStatus.QUEUED:  # waits for a concurrency slot
            await self.passes.resume(fn, delivery, TRIGGER, run_id, (record, rev))
            return
        await self.passes.started(fn, record)
        own = self.passes.own(record, rev)
        await self.passes.advance(fn, delivery, TRIGGER, own, memos={}, before=record)

    async def on_cron(self, fn: Function, delivery: Delivery, rmsg: RunMessage) -> None:
        """A cron tick fired: arm the next one, then start the tick's run (one per tick: its id
        derives from the tick, so a second message or a second worker finds it claimed)."""
        ckey, _, tick_text = rmsg.key.partition(":")
        cron = next((c for c in fn.crons if cron_key(c) == ckey), None)
        if cron is None or not tick_text.isdigit():  # a cron the function no longer has
            await delivery.ack()
            return
        tick = int(tick_text)
        await self.bus.schedule_cron(fn, ckey, cron.next_after(max(tick, now_ms())))
        data = {"cron": cron.source, "tick": rfc3339(from_ms(tick))}
        event = Event(name=EVENT_CRON, id=cron_event_id(fn.full_id, ckey, tick), data=data, ts=tick)
        await self._start_run(fn, delivery, event, run_id_for(fn.full_id, event.id, tick), seq=0)


def cron_key(cron: Cron) -> str:
    """A short stable id of a cron trigger: names its schedule, and keys its ticks' runs."""
    return hashlib.sha1(cron.source.encode(), usedforsecurity=False).hexdigest()[:12]
