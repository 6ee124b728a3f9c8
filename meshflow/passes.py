"""One pass of one run, whatever woke it: take the run, replay it, write what came of it, ack.

Every pass goes one way (``docs/architecture.md``, "the life of a pass"):

    resume ── triage ──┬── take: slots, then the lease (compare-and-set on the record)
                       │     └── advance: engine ⇄ open waits and children; heartbeat meanwhile
                       │           └── settle (pure) ── carry out ── ack
                       └── ack, nak, emit again or time out, without running anything

A run message, the event a trigger claimed a run for, and a local timer's wake all take it; a
local timer's delivery has no message, and its nak hands the wake to the stream instead.

Carrying out a settlement, in the order that makes a crash at any point safe:

- suspended: the new timers, then the record, then the tidying; a crash before the record only
  makes a sleep longer, never shorter (the redelivery arms everything again);
- ended: the record and the finished events at the same time (a crash between them leaves the
  message unacked, and its redelivery finds the ended record and emits again, deduplicated by the
  events' ids), then the tidying;
- then the ack. A pass that fails half way leaves its message for redelivery.

Only one pass advances a run at a time. Other workers are kept out by the lease in the record
(taken by compare-and-set, renewed by the heartbeat every third of the ack wait); a second message
for a run this worker advances now is kept out by `Passes.active`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from . import attempts, replay, tracing
from .attempts import interrupted
from .bus import Bus, Delivery, RunMessage
from .durations import now_ms
from .errors import MeshflowError, NatsError, StateError
from .events import Event, encode_event, event_limit
from .flow.slots import Slot, Slots, StepSlots, slot_backoff
from .functions import Function
from .inflight import InFlight
from .lifecycle import Lifecycle
from .logs import LogShipper
from .names import HDR_MSG_ID, cancel_message_id, timer_wake_id
from .ownership import Ownership, RunLost, StoreEffects, Yielded
from .requests import TooLarge
from .router import Router
from .runs import (
    NEVER,
    ErrorInfo,
    Pending,
    PendingKind,
    RunRecord,
    RunStatus,
    StepMemo,
    finished_events,
    new_lease,
    record_limit,
    transition,
)
from .settle import (
    PassFacts,
    Settlement,
    Triage,
    Wake,
    opened_before,
    settle,
    to_open,
    triage,
)
from .store import RunConflict, Store
from .threads import DaemonThreads
from .timers import LocalTimers

if TYPE_CHECKING:
    from .metrics import StepAttempt, WorkerMetrics

log = structlog.get_logger("meshflow.worker")

_WRITE_ATTEMPTS = 10
# An emitted event's headers: its Nats-Msg-Id, a traceparent and a tracestate of up to 512 bytes.
_EVENT_HEADERS_ROOM = 1024


class Passes:
    """Runs the passes of the runs a worker serves."""

    def __init__(
        self,
        *,
        worker_id: str,
        ack_wait: float,
        store: Store,
        bus: Bus,
        router: Router,
        life: Lifecycle,
        slots: Slots,
        inflight: InFlight,
        threads: DaemonThreads | None = None,
        logs: LogShipper | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.ack_wait = ack_wait
        self.lease_ms = int(ack_wait * 1000)
        self.store = store
        self.bus = bus
        self.router = router
        self.life = life
        self.slots = slots
        self.inflight = inflight
        self.threads = threads
        self.logs = logs
        self.timers = LocalTimers()
        # Runs this worker is advancing now. The lease keeps other workers out; this keeps out a
        # second message for the same run here (a timer's twin, two parallel sleeps waking).
        self.active: set[str] = set()
        # Runs of ours asked to stop (core message): the engine checks before each new step.
        self._cancel_signals: set[str] = set()
        self.abandoned = 0  # passes that stopped because another pass took their run over
        self.stopping = False  # the worker stops: passes end after the step they run
        self.metrics: WorkerMetrics | None = None  # counts starts, ends and step attempts, if set

    def signal_cancel(self, run_id: str) -> None:
        """Run ``run_id`` was asked to stop: if a pass of it runs here, it stops before its next step."""
        if run_id in self.active:
            self._cancel_signals.add(run_id)

    # --- resume: is there anything to do? -------------------------------------------------------
    async def resume(
        self,
        fn: Function,
        delivery: Delivery,
        wake: Wake,
        run_id: str,
        found: tuple[RunRecord, int] | None = None,
        memos: dict[str, StepMemo] | None = None,
    ) -> None:
        """Advance run ``run_id`` (as ``found``, else read now) if ``wake`` gives it anything to do."""
        try:
            got = found or await self.store.get_run(run_id)
        except StateError as exc:  # no pass can read it: nothing to advance, ever
            log.error("message for a run whose record cannot be read dropped", run_id=run_id, error=str(exc))
            await delivery.term()
            return
        record, rev = got if got is not None else (None, 0)
        now = now_ms()
        what = triage(
            record,
            wake,
            now=now,
            worker=self.worker_id,
            redelivered=delivery.redelivered,
            busy_here=run_id in self.active,
        )
        if what is Triage.ADVANCE:
            assert record is not None
            await self._take(fn, delivery, wake, record, rev, memos)
            return
        if what is Triage.BUSY:
            log.debug("run busy; looked at again shortly", run_id=run_id, source=delivery.source)
            await delivery.nak(delay=0.25)  # being advanced right now; look again shortly
            return
        if what is Triage.UNKNOWN:
            log.warning("run message for an unknown run", run_id=run_id, function=fn.full_id)
        elif what is Triage.EMIT_AGAIN:  # we may have died between writing the record and emitting
            assert record is not None
            await self.emit_ended(fn, record)
        elif what is Triage.TIMED_OUT:
            assert record is not None
            await self.life.timed_out(record, wake.key)
        await delivery.ack()

    async def _take(
        self,
        fn: Function,
        delivery: Delivery,
        wake: Wake,
        record: RunRecord,
        rev: int,
        memos: dict[str, StepMemo] | None,
    ) -> None:
        """Take the run's concurrency slots (if its function has any) and its lease, then advance it.
        It is `active` from before its lease is written: a second delivery here (a local timer's
        twin) would read a lease of ours, which only `active` tells from one a dead pass left."""
        run_id = record.id
        if run_id in self.active:  # a pass of ours took it since we read it
            await delivery.nak(delay=0.25)
            return
        self.active.add(run_id)
        advancing = False  # once it is, `advance` removes the run from `active` as it ends
        try:
            slots: list[Slot] = []
            owner = ""
            if fn.flow.concurrency and record.cancel is None:
                taken = await self.slots.acquire(fn, record)
                if taken is None:  # every slot of its key is busy: it waits (never dropped)
                    await delivery.nak(delay=slot_backoff(delivery.delivered))
                    return
                slots, owner = taken
            leased = self.leased(record, now_ms())
            if not record.armed:  # created elsewhere (an invoke, a replay): set up its timeouts now
                leased = msgspec.structs.replace(leased, armed=True)
            if _interrupted(record):  # a pass that never ended was running these: each is an attempt
                leased = self._count_interrupted(leased, record)
            try:
                rev = await self.store.update_run(leased, rev, was=record.status)
            except RunConflict:
                await self.slots.release(slots, owner)
                await delivery.nak(delay=0.05)
                return
            if record.started_at is None:  # its first pass: a queued, invoked or replayed run starts
                await self.started(fn, leased)
            if not record.armed and await self.life.arm(fn, leased, starting=True):
                await self.slots.release(slots, owner)
                await delivery.ack()  # cancelled by an event already sent; the cancel message ends it
                return
            own = self.own(leased, rev, slots=slots, owner=owner)
            advancing = True
            await self.advance(fn, delivery, wake, own, memos=memos, before=record, taken=True)
        finally:
            if not advancing:
                self.active.discard(run_id)

    async def started(self, fn: Function, record: RunRecord) -> None:
        """The first pass of ``record`` (leased) begins: tell whoever counts."""
        await self.bus.announce_start(fn)
        if self.metrics is not None:
            self.metrics.run_started(fn, record)

    def ended(self, run: RunRecord) -> None:
        """``run`` was written ended (or created skipped) here: tell whoever counts."""
        if self.metrics is not None:
            self.metrics.run_finished(run)

    def _step_attempts(self, fn: Function, run_id: str) -> StepAttempt | None:
        """What the engine enters around each step attempt: the trace span, timed if counted."""
        traced = tracing.step_attempts(fn, run_id)
        return traced if self.metrics is None else self.metrics.step_attempts(fn, traced)

    def own(
        self, record: RunRecord, rev: int, *, slots: list[Slot] | None = None, owner: str = ""
    ) -> Ownership:
        """What a pass holds of ``record``, written under its lease at revision ``rev``."""
        return Ownership(
            self.store,
            record,
            rev,
            lease_ms=self.lease_ms,
            slots=slots,
            owner=owner,
            stopping=lambda: self.stopping,
        )

    def _count_interrupted(self, leased: RunRecord, record: RunRecord) -> RunRecord:
        """``leased`` with an attempt recorded for each step the pass before was running."""
        assert record.lease is not None
        failures = dict(record.step_failures)
        history = {key: list(tried) for key, tried in record.step_history.items()}
        for key in _interrupted(record):
            failures[key] = failures.get(key, 0) + 1
            cut = interrupted(failures[key], record.lease, self.lease_ms)
            history[key] = attempts.kept([*history.get(key, []), cut])
        log.info("steps interrupted by a worker that died or stopped count as attempts", run_id=record.id)
        return msgspec.structs.replace(leased, step_failures=failures, step_history=history)

    def leased(self, record: RunRecord, now: int) -> RunRecord:
        """``record`` running under this worker's lease, to be written by compare-and-set."""
        return transition(
            record,
            RunStatus.RUNNING,
            lease=new_lease(self.worker_id, now, self.lease_ms),
            started_at=record.started_at or now,
            updated_at=now,
        )

    # --- advance: one pass ------------------------------------------------------------------------
    async def advance(
        self,
        fn: Function,
        delivery: Delivery,
        wake: Wake,
        own: Ownership,
        *,
        memos: dict[str, StepMemo] | None,
        before: RunRecord,
        taken: bool = False,
    ) -> None:
        """Replay the leased run, write what came of it, then ack the delivery. ``taken``: the
        caller marked the run `active` already (and this pass removes it as it ends)."""
        run_id = own.record.id
        if not taken:
            if run_id in self.active:  # claimed by a pass of ours since we read it
                await delivery.nak(delay=0.25)
                return
            self.active.add(run_id)
        span = tracing.run_pass(
            fn, own.record, subject=delivery.subject, headers=delivery.headers, wake=wake.reason
        )
        with span as traced:
            try:
                await self._pass(fn, delivery, wake, own, memos, before, traced)
            except RunLost:  # another pass holds the run: this one writes, acks and naks nothing more
                self.abandoned += 1
                traced.abandoned("another pass holds the run")
                log.info("pass abandoned: another pass holds the run", run_id=run_id, function=fn.full_id)
            except Yielded:  # the worker stops: the run goes on elsewhere, from the step after this one
                traced.abandoned("the worker stops")
                await self._let_go(own)
                await delivery.abandon()
            except asyncio.CancelledError:  # the worker stops now: let another worker take the run at once
                traced.abandoned("the worker stops now")
                await self._let_go(own)
                raise
            finally:
                self.active.discard(run_id)
                self._cancel_signals.discard(run_id)
                if own.slots:
                    with contextlib.suppress(MeshflowError):  # unreleased, they expire with the lease
                        await self.slots.release(own.slots, own.owner)

    async def _pass(
        self,
        fn: Function,
        delivery: Delivery,
        wake: Wake,
        own: Ownership,
        memos: dict[str, StepMemo] | None,
        before: RunRecord,
        traced: tracing.PassSpan,
    ) -> None:
        """The pass itself: replay the run, settle, carry the settlement out, ack."""
        try:
            outcome, effects = await self._run(fn, delivery, own, memos, before)
            memos = effects.memos
        except (StateError, TooLarge) as exc:  # no retry could read or store it: the run fails
            outcome, memos = replay.Failed(error=_unrecoverable(exc)), memos or {}
        facts = PassFacts(
            now=now_ms(),
            wake=wake,
            redelivered=delivery.redelivered,
            memos=memos,
            max_record_bytes=record_limit(self.bus.max_payload),
            max_event_bytes=self._event_bytes,
        )
        settled = settle(fn, before, own.record, outcome, facts)
        if self.logs is not None:  # what the pass logged is stored before what it did
            await self.logs.flush()
        await self._carry_out(fn, own, settled, memos)
        traced.settled(before, settled.record)
        await delivery.ack()

    async def _let_go(self, own: Ownership) -> None:
        """End this pass's lease now, so another worker takes the run over without waiting for it
        to run out (best effort: it runs out anyway)."""
        with contextlib.suppress(MeshflowError, TimeoutError):
            await asyncio.wait_for(own.renew(release=True), timeout=2.0)

    async def _run(
        self,
        fn: Function,
        delivery: Delivery,
        own: Ownership,
        memos: dict[str, StepMemo] | None,
        before: RunRecord,
    ) -> tuple[replay.Outcome, StoreEffects]:
        """The engine, again at once while a wait it suspends on is satisfied already."""
        record = own.record
        if memos is None:
            memos = await self.store.load_memos(record.id)
        effects = StoreEffects(self.store, self.bus, own, memos)
        opened = opened_before(before, delivery.redelivered)
        # where the run stands: what the record holds, then what a pass that went on at once left
        state = replay.Suspended(
            pending=record.pending,
            step_failures=record.step_failures,
            attempt=record.attempt,
            step_history=record.step_history,
            history=record.history,
        )
        if own.slots:
            own.step_slots = StepSlots(self.slots, fn, record, own.owner)
        beat = asyncio.create_task(self._heartbeat(delivery, own))
        outcome: replay.Outcome = replay.Cancelled()
        try:
            while record.cancel is None:
                outcome = await replay.execute(
                    replay.Activation(
                        function=fn,
                        run_id=record.id,
                        events=record.events,
                        attempt=state.attempt,
                        memos=effects.memos,
                        pending=state.pending,
                        step_failures=state.step_failures,
                        step_history=state.step_history,
                        history=state.history,
                        worker=self.worker_id,
                        seq=record.seq,
                        created_at=record.created_at,
                        cancelled=lambda: record.id in self._cancel_signals,
                        fence=own.fence,
                        # a step result or output may be as large as an event: each leaves
                        # the same room for the record around it
                        max_value_bytes=event_limit(self.bus.max_payload),
                        run_sync=self.threads.run if self.threads is not None else None,
                        executing=own.executing,
                        step_slot=own.step_slots.executing if own.step_slots else None,
                        logs=self.logs,
                        step_attempt=self._step_attempts(fn, record.id),
                    ),
                    effects,
                )
                # A wait an event already satisfies, or an invoke that cannot start: go on at once.
                if not isinstance(outcome, replay.Suspended) or not await self._open(
                    record, outcome.pending, opened, effects
                ):
                    break
                state = outcome
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        return outcome, effects

    async def _open(
        self, record: RunRecord, pending: list[Pending], opened: set[str], effects: StoreEffects
    ) -> bool:
        """Register new waits and start new child runs; True if one of them is resolved already."""
        resolved = False
        for item in to_open(pending, opened):
            opened.add(item.key)
            if item.kind is PendingKind.WAIT:
                memo = await self.router.open_wait(record, item)
            else:
                memo = await self.life.start_child(record, item)
            if memo is not None:
                effects.memos[memo.hash] = memo
                resolved = True
        return resolved

    async def _heartbeat(self, delivery: Delivery, own: Ownership) -> None:
        """While a long pass runs: keep the message from redelivery and renew the lease, until the
        pass loses its run (then the message is another pass's to settle)."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            if own.lost:
                return
            with contextlib.suppress(MeshflowError):
                await delivery.in_progress()
            if own.slots:
                with contextlib.suppress(MeshflowError):
                    await self.slots.renew(own.slots, own.owner)
                    if own.step_slots is not None:
                        await own.step_slots.renew()
            with contextlib.suppress(NatsError):
                await own.renew()
            if own.record.cancel is not None:
                self._cancel_signals.add(own.record.id)

    # --- carrying out a settlement ----------------------------------------------------------------
    async def _carry_out(
        self, fn: Function, own: Ownership, settled: Settlement, memos: dict[str, StepMemo]
    ) -> None:
        run = settled.record
        await own.fence(may_yield=False)  # a pass that lost its run writes nothing of it
        if settled.ended:
            emitting = self._emit(run, settled.emit, notify_parent=settled.notify_parent)
            await asyncio.gather(emitting, self._write(own, run))
            self.ended(run)
        else:
            for item in settled.arm:
                await self.bus.schedule(fn, run.id, item.key, item.until)
            await self._write(own, run)
        await self._tidy(fn, run, settled)
        if not settled.ended:
            armed = [item for item in settled.arm if self._arm_local(fn, run.id, item.key, item.until)]
            if armed and own.record is run:
                self.timers.keep_warm(run, own.rev, memos)
        _log_outcome(run)

    async def emit_ended(self, fn: Function, run: RunRecord) -> None:
        """An ended run's finished events (again: their ids make a second emit a no-op)."""
        events = finished_events(run, handles_failures=fn.failure_of is not None, limit=self._event_bytes)
        await self._emit(run, events, notify_parent=run.parent is not None)

    @property
    def _event_bytes(self) -> int:
        """The most an event this worker emits may hold (its Nats-Msg-Id header aside)."""
        return self.bus.max_payload - _EVENT_HEADERS_ROOM

    async def _emit(self, run: RunRecord, events: list[Event], *, notify_parent: bool) -> None:
        """A run's finished events; and the parent's step resolved, for an invoked run."""
        trace = tracing.outgoing(run.trace)  # the pass's span, else the trace the run joined
        await self.bus.publish_many(
            [
                (self.bus.names.event_subject(e.name), encode_event(e), {HDR_MSG_ID: e.id, **trace})
                for e in events
            ]
        )
        if notify_parent:
            await self.life.notify_parent(run)

    async def _tidy(self, fn: Function, run: RunRecord, settled: Settlement) -> None:
        """Waits, timers and cancel_on waiters the run no longer needs. Best effort: whatever is
        left finds the item no longer pending (or the run ended) and is dropped then."""
        for item in settled.forget_waits:
            with contextlib.suppress(NatsError):
                await self.router.forget(run.id, item)
        for key in settled.drop_timers:
            with contextlib.suppress(NatsError):
                await self.bus.cancel_timer(run.id, key)
        if settled.forget_cancels:
            with contextlib.suppress(NatsError):
                await self.router.forget_cancels(fn, run)

    async def _write(self, own: Ownership, final: RunRecord) -> None:
        """Write the pass's record by compare-and-set, merging a cancel request that came meanwhile."""
        was = own.record.status
        for _ in range(_WRITE_ATTEMPTS):
            try:
                own.rev = await self.store.update_run(final, own.rev, was=was)
                own.record = final
                return
            except RunConflict:
                got = await self.store.get_run(final.id)
                if got is None:
                    own.lose()
                    raise RunLost(f"run {final.id}: it was deleted") from None
                current, own.rev = got
                was = current.status
                if not own.holds(current):  # ended, or taken over by another pass after our lease lapsed
                    own.lose()
                    raise RunLost(f"run {final.id}: another pass holds it now") from None
                if current.cancel is not None and final.cancel is None:
                    final = msgspec.structs.replace(final, cancel=current.cancel)
                    if not final.status.terminal:  # asked to stop as this pass ended: a pass to do it
                        nudge = RunMessage(run_id=final.id, reason="cancel")
                        await self.bus.publish_run(
                            final.app, final.fn, nudge, msg_id=cancel_message_id(final.id, own.rev)
                        )
        raise NatsError(
            f"run {final.id}: could not write its record after {_WRITE_ATTEMPTS} conflicting updates"
        )

    # --- local timers ---------------------------------------------------------------------------
    def _arm_local(self, fn: Function, run_id: str, key: str, until: int) -> bool:
        """A timer in this worker for a near deadline (the durable schedule stays armed): when it
        fires, the run's pass starts from the state this worker wrote, without a message."""

        def fire() -> None:
            message = RunMessage(run_id=run_id, reason="timer", key=key)

            async def to_stream() -> None:  # the pass could not start here: the stream's way
                try:
                    await self.bus.publish_run(
                        fn.app_id, fn.id, message, msg_id=timer_wake_id(run_id, key, until)
                    )
                except MeshflowError as exc:  # the durable schedule will still fire
                    log.warning("local timer could not wake the run", run_id=run_id, error=str(exc))

            delivery = Delivery.local(self.bus.names.run_subject(fn.app_id, fn.id), to_stream)
            warm = self.timers.take_warm(run_id)
            found = (warm.record, warm.revision) if warm is not None else None

            async def wake(d: Delivery) -> None:
                await self.resume(fn, d, Wake("timer", key), run_id, found, warm.memos if warm else None)

            self.inflight.spawn(f"timer {fn.full_id}", delivery, wake)

        return self.timers.arm(run_id, key, until, fire)


def _log_outcome(run: RunRecord) -> None:
    fields: dict[str, Any] = {"run_id": run.id, "function": run.function}
    if run.status is RunStatus.COMPLETED:
        log.info("run completed", duration_ms=(run.ended_at or 0) - (run.started_at or 0), **fields)
    elif run.status is RunStatus.FAILED:
        err = run.error
        log.warning("run failed", error=f"{err.type}: {err.message}" if err else None, **fields)
    else:
        until = min(p.until for p in run.pending) if run.pending else NEVER
        log.info(f"run {run.status}", resumes_in_ms=until - now_ms() if until < NEVER else None, **fields)


def _interrupted(record: RunRecord) -> list[str]:
    """The steps a pass that never ended was executing when it last renewed its lease."""
    lease = record.lease
    return list(lease.executing) if record.status is RunStatus.RUNNING and lease is not None else []


def _unrecoverable(exc: StateError | TooLarge) -> ErrorInfo:
    """Why a run fails that no retry could carry on: its stored state cannot be read, or a value
    of it cannot be stored."""
    if isinstance(exc, StateError):
        return ErrorInfo(type="StateError", message=str(exc), retriable=False)
    return ErrorInfo(type="SerializationError", message=f"{exc}: the run cannot go on", retriable=False)
