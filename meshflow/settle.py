"""What a run's pass does and writes, decided without I/O: `triage` before it, `settle` after it.

The pass executor (``meshflow.passes``) asks `triage` what a delivery means for the run it names
(advance it, or acknowledge, wait, or re-emit without running anything), runs the engine, and
hands `settle` the record before the pass, the record it holds now, the engine's outcome and the
facts of the pass. `settle` returns a `Settlement`; the executor carries it out in the order
that makes a crash at any point safe (timers, then the record, then the tidying, then the ack).

Rules (``tests/unit/test_settle.py`` checks them as tables):

1. A pass asked to stop while it ran (a cancel request in the record it holds) ends
   ``cancelled`` instead of suspending: it stopped before its next step.
2. A suspended run is ``waiting`` when it waits for an event or a child run, else ``sleeping``
   when it sleeps, else ``retrying``. Every status change goes through ``runs.TRANSITIONS``.
3. Durable timers are armed for the pending items that are new or moved in this pass, for the
   item whose timer woke it (that schedule has fired and is gone), and for all of them after a
   redelivery (the pass before may have died before arming them). Items with no deadline get none.
4. Waits and invokes that ended in this pass are tidied: a wait that timed out has its waiter
   entries dropped (the router drops those it resolves); one resolved before its deadline has its
   timeout timer dropped.
5. A run that ends emits its finished events (and notifies its parent); its cancel_on waiters and
   finish-timeout timer are dropped; a cancelled run's pending timers and waits are dropped too.
   An event too large to emit leaves out the run's output, then the original event's data.
6. Waits are registered and children started once each: again only after a redelivery.
7. A record too large to store is never written: a suspended run first leaves out the inputs
   of its retrying steps (markers say so), and if that is not enough, the run fails saying so.

The pass releases its concurrency slots when it ends, whatever the settlement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from .codec import INPUT_NO_ROOM
from .events import Event
from .functions import Function
from .replay import Cancelled, Completed, Failed, Outcome, Suspended
from .runs import (
    NEVER,
    NULL,
    ErrorInfo,
    Pending,
    PendingKind,
    RunRecord,
    RunStatus,
    StepMemo,
    finished_events,
    record_size,
    transition,
    without_data,
)

#: The pending-item keys of a run's start and finish timeouts (``Function.timeouts``).
TIMEOUT_KEYS = frozenset({"timeout", "start-timeout"})
_OPENED = (PendingKind.WAIT, PendingKind.INVOKE)


class Triage(Enum):
    """What a delivery means for its run (`triage`)."""

    ADVANCE = "advance"  # take the run's lease and run a pass
    DONE = "done"  # nothing to do: ack
    EMIT_AGAIN = "emit again"  # a finished run whose last pass may have died before emitting: emit, ack
    TIMED_OUT = "timed out"  # a start or finish timeout fired: cancel it if it applies, ack
    BUSY = "busy"  # another pass holds the run now: look again shortly
    UNKNOWN = "unknown"  # no such run: ack (and log)


@dataclass(frozen=True, slots=True)
class Wake:
    """What woke a pass: a run message's ``reason`` and pending-item ``key``, or the trigger's
    event (``reason="trigger"``), which resumes a run only if it has never suspended."""

    reason: str
    key: str = ""

    @property
    def by_trigger(self) -> bool:
        return self.reason == "trigger"


TRIGGER = Wake("trigger")


def triage(
    record: RunRecord | None, wake: Wake, *, now: int, worker: str, redelivered: bool, busy_here: bool
) -> Triage:
    """What to do with a delivery for ``record`` (None: the run does not exist)."""
    if record is None:
        return Triage.UNKNOWN
    if record.status.terminal:
        return Triage.EMIT_AGAIN if redelivered else Triage.DONE
    if wake.key in TIMEOUT_KEYS:
        return Triage.TIMED_OUT
    if record.status is RunStatus.QUEUED and record.not_before > now and record.cancel is None:
        return Triage.DONE  # an event with a future ts (or a throttle): its "start" timer starts it
    if record.status.suspended and (
        wake.by_trigger  # a resent event for a suspended run: its timers resume it
        or (wake.key and all(p.key != wake.key for p in record.pending))
    ):
        return Triage.DONE  # or a timer, event or child run for an item resumed already
    lease = record.lease
    if busy_here or (lease is not None and lease.worker != worker and lease.until > now):
        return Triage.BUSY
    return Triage.ADVANCE


@dataclass(frozen=True, slots=True)
class PassFacts:
    """What a pass knows besides the records: the clock, how it was woken, what is committed."""

    now: int
    wake: Wake
    redelivered: bool  # the message was delivered before: that pass may have died half way
    memos: Mapping[str, StepMemo] = field(default_factory=dict)  # committed as the pass ends
    max_record_bytes: int | None = None  # what one run record may hold (None: no limit)
    max_event_bytes: int | None = None  # what one emitted event may hold


@dataclass(frozen=True, slots=True)
class Settlement:
    """Everything a pass writes, in the order the executor carries it out."""

    record: RunRecord  # the record to write (by compare-and-set on the revision the pass holds)
    arm: list[Pending] = field(default_factory=list)  # durable timers, before the record
    emit: list[Event] = field(default_factory=list)  # finished events, with the record
    notify_parent: bool = False  # an invoked run ended: resolve its parent's step, with the record
    drop_timers: list[str] = field(default_factory=list)  # after the record: purged timer keys
    forget_waits: list[Pending] = field(default_factory=list)  # after the record: waiter entries
    forget_cancels: bool = False  # after the record: the run's cancel_on waiters

    @property
    def ended(self) -> bool:
        return self.record.status.terminal


def to_open(pending: Sequence[Pending], opened: set[str]) -> list[Pending]:
    """The waits to register and children to start among a suspended pass's ``pending`` (those
    not in ``opened``, the items done already)."""
    return [p for p in pending if p.kind in _OPENED and p.key not in opened]


def opened_before(before: RunRecord, redelivered: bool) -> set[str]:
    """The items whose waits are registered and children started already (none are trusted
    after a redelivery: the pass that died may not have done them)."""
    return set() if redelivered else {p.key for p in before.pending}


def settle(
    fn: Function, before: RunRecord, current: RunRecord, outcome: Outcome, facts: PassFacts
) -> Settlement:
    """What a pass of ``fn``'s run writes: ``before`` is the record as the pass found it, ``current``
    the one it holds now (leased, maybe with a cancel request since), ``outcome`` the engine's.

    A record over ``facts.max_record_bytes`` is never written (no retry could store it): the run
    fails instead, saying why, and if even that does not fit (its events fill the record), its
    events' data is left out of the record (it stays in the events stream).
    """
    if isinstance(outcome, Suspended) and current.cancel is not None:
        outcome = Cancelled()  # asked to stop while this pass ran: it stops before its next step
    if isinstance(outcome, Suspended):
        settled = _suspend(before, current, outcome, facts)
    else:
        settled = _end(fn, before, current, outcome, facts)
    limit = facts.max_record_bytes
    size = record_size(settled.record)
    if limit is None or size <= limit:
        return settled
    if isinstance(outcome, Suspended) and any(p.input is not None for p in outcome.pending):
        # Inputs are kept to be read, never to run: they go before the run would have to fail.
        lean = _suspend(before, current, _without_inputs(outcome), facts)
        if record_size(lean.record) <= limit:
            return lean
    error = ErrorInfo(
        type="SerializationError",
        message=f"the run's record would be {size} bytes, more than one record may hold ({limit} bytes: "
        "the NATS server's max_payload less room for its headers); the run's output, its events or "
        "its errors are too large: store large data elsewhere and pass a reference to it",
        retriable=False,
    )
    settled = _end(fn, before, current, Failed(error=error), facts)
    if record_size(settled.record) <= limit:
        return settled
    slim = msgspec.structs.replace(current, events=[without_data(e) for e in current.events])
    return _end(fn, before, slim, Failed(error=error), facts)


def _without_inputs(outcome: Suspended) -> Suspended:
    pending = [
        p if p.input is None else msgspec.structs.replace(p, input=INPUT_NO_ROOM) for p in outcome.pending
    ]
    return msgspec.structs.replace(outcome, pending=pending)


def _suspend(before: RunRecord, current: RunRecord, outcome: Suspended, facts: PassFacts) -> Settlement:
    known = {(p.key, p.until) for p in before.pending}
    arm = [
        item
        for item in outcome.pending
        if item.until < NEVER
        and (facts.redelivered or (item.key, item.until) not in known or facts.wake.key == item.key)
    ]
    kinds = {p.kind for p in outcome.pending}
    if kinds & set(_OPENED):
        status = RunStatus.WAITING
    elif PendingKind.SLEEP in kinds:
        status = RunStatus.SLEEPING
    else:
        status = RunStatus.RETRYING
    record = transition(
        current,
        status,
        pending=outcome.pending,
        step_failures=outcome.step_failures,
        step_history=outcome.step_history,
        history=outcome.history,
        attempt=outcome.attempt,
        lease=None,
        updated_at=facts.now,
    )
    drop, forget = _ended_items(before, record, facts)
    return Settlement(record=record, arm=arm, drop_timers=drop, forget_waits=forget)


def _end(
    fn: Function, before: RunRecord, current: RunRecord, outcome: Outcome, facts: PassFacts
) -> Settlement:
    history = current.history
    if isinstance(outcome, Completed):
        status, output, error = RunStatus.COMPLETED, outcome.output, None
    elif isinstance(outcome, Failed):
        status, output, error = RunStatus.FAILED, NULL, outcome.error
        history = outcome.history or history
    else:
        reason = current.cancel.reason if current.cancel else "cancelled"
        status, output = RunStatus.CANCELLED, NULL
        error = ErrorInfo(type="Cancelled", message=reason, retriable=False)
    record = transition(
        current,
        status,
        output=output,
        error=error,
        pending=[],
        # a committed step's memo holds its own attempts; those of steps never committed stay
        step_history={k: v for k, v in current.step_history.items() if k not in facts.memos},
        history=history,
        lease=None,
        ended_at=facts.now,
        updated_at=facts.now,
    )
    drop, forget = _ended_items(before, record, facts)
    if fn.finish_timeout_ms is not None:
        drop.append("timeout")
    if status is RunStatus.CANCELLED:  # whatever it still waited for goes too
        for item in before.pending:
            if item.kind is PendingKind.WAIT and item not in forget:
                forget.append(item)
            elif item.kind not in _OPENED and item.until < NEVER and item.key not in drop:
                drop.append(item.key)
    return Settlement(
        record=record,
        emit=finished_events(record, handles_failures=fn.failure_of is not None, limit=facts.max_event_bytes),
        notify_parent=record.parent is not None,
        drop_timers=drop,
        forget_waits=forget,
        forget_cancels=bool(fn.cancel_on),
    )


def _ended_items(before: RunRecord, after: RunRecord, facts: PassFacts) -> tuple[list[str], list[Pending]]:
    """The timers to drop and the waits to forget of the waits and invokes that ended this pass."""
    still = {p.key for p in after.pending}
    drop: list[str] = []
    forget: list[Pending] = []
    for item in before.pending:
        if item.key in still or item.kind not in _OPENED:
            continue
        if item.until <= facts.now:  # its deadline passed: a timed-out wait leaves its entries
            memo = facts.memos.get(item.key)
            if item.kind is PendingKind.WAIT and memo is not None and memo.seq == 0:
                forget.append(item)
        elif item.until < NEVER:  # resolved in time: its timeout would fire for nothing
            drop.append(item.key)
    return drop, forget
