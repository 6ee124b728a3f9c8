"""Runs and steps as stored: statuses, their transition table, and the records kept in KV.

A run moves ``queued → running ⇄ sleeping | waiting | retrying → completed | failed | cancelled``,
or is created ``skipped`` (flow control turned its event away).
Terminal statuses never change again (a replay is a new run). Records are versioned msgspec
structs; new fields get defaults and are never reordered or retyped.

Step memos are written once (``create``) and never change: that is what makes a committed step
never run again.
"""

from __future__ import annotations

import os
import secrets
import traceback as tb
from enum import StrEnum
from types import TracebackType
from typing import Any

import msgspec

from .codec import decode_value
from .events import Event, encode_event
from .names import (
    EVENT_FUNCTION_CANCELLED,
    EVENT_FUNCTION_FAILED,
    EVENT_FUNCTION_FINISHED,
    cancelled_event_id,
    failed_event_id,
    finished_event_id,
)

#: The stored form of "no value" (msgspec cannot decode ``Raw | None``, so no-value is JSON null).
NULL = msgspec.Raw(b"null")


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SLEEPING = "sleeping"
    WAITING = "waiting"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # never ran: a rate limit or singleton turned its event away

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def suspended(self) -> bool:
        """Sleeping, waiting or retrying: resumed only by a timer or an event."""
        return self in _SUSPENDED


_TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.SKIPPED})
_SUSPENDED = frozenset({RunStatus.SLEEPING, RunStatus.WAITING, RunStatus.RETRYING})

#: Which status may follow which. A run may be advanced again while running (a redelivered
#: message after a worker died), so RUNNING → RUNNING is allowed.
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset(set(RunStatus) - {RunStatus.QUEUED}),
    **{s: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED}) for s in _SUSPENDED},
    **{s: frozenset() for s in _TERMINAL},
}


def can_transition(old: RunStatus, new: RunStatus) -> bool:
    """Whether a run in ``old`` may move to ``new``."""
    return new in TRANSITIONS[old]


class IllegalTransition(Exception):
    """A status change the transition table forbids: a bug in meshflow, never the user's doing.
    The pass that tried it is abandoned (its message redelivered); it never leaves the worker."""


def transition(record: RunRecord, status: RunStatus, **changes: Any) -> RunRecord:
    """``record`` moved to ``status`` (with ``changes``), if `TRANSITIONS` allows it.

    Every status change of a stored run goes through here; new records are made by `new_run`.

    Raises:
        IllegalTransition: the table has no such move (a terminal run never changes, say).
    """
    if not can_transition(record.status, status):
        raise IllegalTransition(f"run {record.id}: {record.status} may not become {status}")
    return msgspec.structs.replace(record, status=status, **changes)


def new_run(
    run_id: str,
    *,
    app: str,
    fn: str,
    events: list[Event],
    now: int,
    status: RunStatus = RunStatus.QUEUED,
    **fields: Any,
) -> RunRecord:
    """A run record to create: ``queued`` unless said otherwise (a trigger may create it
    ``running`` under its lease, or ``skipped``)."""
    return RunRecord(
        id=run_id,
        app=app,
        function=f"{app}-{fn}",
        fn=fn,
        status=status,
        events=events,
        created_at=now,
        updated_at=now,
        **fields,
    )


class StepStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"


class StepKind(StrEnum):
    RUN = "run"
    SLEEP = "sleep"
    WAIT = "wait"  # wait_for_event / wait_for_any: the event, or null on timeout
    INVOKE = "invoke"  # the child run's output, or its error
    SEND = "send"  # send_event: the ids of the events sent


class PendingKind(StrEnum):
    SLEEP = "sleep"
    STEP_RETRY = "step_retry"
    RUN_RETRY = "run_retry"
    WAIT = "wait"  # an event (or its timeout)
    INVOKE = "invoke"  # a child run's end (or its timeout)


#: ``Pending.until`` of an item with no deadline (an ``invoke`` without a timeout).
NEVER = 2**62


class WaitSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One event a ``wait_for_event`` (or one branch of a ``wait_for_any``) accepts.

    Only events stored in the events stream after ``floor_seq`` (or, when it is 0, at or after
    ``floor_time``) count, so a run never takes an event older than its window or one it took
    before.
    """

    event: str
    match: str | None = None  # a path like "data.userId", compared with the trigger's value
    match_token: str | None = None  # `expressions.match_key` of the trigger's value there, if it has one
    if_: str | None = None  # a CEL condition over `event` (the trigger) and `async` (the candidate)
    floor_seq: int = 0
    floor_time: int = 0
    not_seq: int = 0  # never this event (the run's trigger, for a window by time)


class InvokeSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The child run an ``invoke`` step starts: which function, with what data, under which id."""

    function: str  # the child's full id, "{app}-{fn}"
    run_id: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class ParentRef(msgspec.Struct, frozen=True, kw_only=True):
    """On a child run: the parent run and the ``invoke`` step waiting for it."""

    run_id: str
    app: str
    fn: str
    key: str  # the parent's step hash
    step_id: str = ""


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An error as stored: class name, message and formatted traceback."""

    type: str
    message: str
    traceback: str = ""
    retriable: bool = True


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt of a step (or of the function, for an error outside steps): when it ran, on
    which worker, and its error (None: it succeeded). ``ended_at`` is None for an attempt whose
    worker stopped or died while it ran (its error then says so)."""

    attempt: int
    started_at: int
    ended_at: int | None = None
    worker: str = ""
    error: ErrorInfo | None = None


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    """Something a suspended run waits for: a sleep's wake time or a retry's backoff."""

    kind: PendingKind
    key: str  # the step hash, or "run" for a function-level retry
    step_id: str = ""
    until: int  # epoch ms; the run must not resume before it
    since: int = 0  # epoch ms when the run started waiting
    attempt: int = 0  # for retries: the failed attempts so far
    error: ErrorInfo | None = None
    waits: list[WaitSpec] = msgspec.field(default_factory=list)  # WAIT: the events it accepts
    invoke: InvokeSpec | None = None  # INVOKE: the child run
    # STEP_RETRY: the step's arguments as kept on record (`codec.encode_input`), decoded (a Pending
    # is public, on `Run.pending`, so it holds plain data); None: none.
    input: Any = None


class CancelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A request to cancel a run: by whom or what, and when. The run stops between steps."""

    reason: str
    at: int


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """A pass executing a run holds it until ``until`` (epoch ms) unless it renews the lease.

    ``token`` names the pass (a new one for every pass): a pass that finds another token in the
    record has lost the run to that pass and stops (``meshflow.passes``). ``until`` in the past
    with the worker alive means the pass let the run go (its worker stopped).
    """

    worker: str
    until: int
    token: str = ""
    # The steps whose handlers ran when the lease was last renewed: a pass that takes the run over
    # from a pass that never ended counts each of them as an attempt.
    executing: list[str] = msgspec.field(default_factory=list)


class TraceContext(msgspec.Struct, frozen=True, kw_only=True):
    """The W3C trace context a run's passes join (``meshflow.tracing``): the ``traceparent`` and
    ``tracestate`` of the message that created the run, or of the span that did."""

    traceparent: str
    tracestate: str = ""


def new_lease(worker: str, now: int, lease_ms: int) -> Lease:
    """A lease for a new pass of ``worker``: its own token, good for ``lease_ms`` from ``now``."""
    return Lease(worker=worker, until=now + lease_ms, token=secrets.token_hex(8))


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A run, as stored in the runs bucket under its id."""

    v: int = 1
    id: str
    app: str
    function: str  # full id: "{app}-{fn}"
    fn: str
    status: RunStatus
    events: list[Event]
    created_at: int
    updated_at: int
    started_at: int | None = None
    ended_at: int | None = None
    attempt: int = 0  # function-level failed attempts so far
    output: msgspec.Raw = msgspec.field(default_factory=lambda: NULL)  # JSON null until it completes
    error: ErrorInfo | None = None
    pending: list[Pending] = msgspec.field(default_factory=list)
    step_failures: dict[str, int] = msgspec.field(default_factory=dict)
    # The attempts so far of steps not committed yet (a step retrying), by step hash; a
    # committed step's memo holds its own.
    step_history: dict[str, list[Attempt]] = msgspec.field(default_factory=dict)
    history: list[Attempt] = msgspec.field(default_factory=list)  # the function's failed attempts
    lease: Lease | None = None
    replay_of: str | None = None
    failure_of: str | None = None  # for on_failure runs: the run that failed
    seq: int = 0  # the triggering event's sequence in the events stream (0: not from the stream)
    parent: ParentRef | None = None  # for invoked runs: who waits for this run's end
    cancel: CancelInfo | None = None  # set when cancellation was asked for
    not_before: int = 0  # a queued run starts no earlier than this (an event with a future ts)
    armed: bool = False  # its timeouts and cancel_on waiters are set up
    trace: TraceContext | None = None  # the trace every pass of the run joins (None: none)


class StepMemo(msgspec.Struct, frozen=True, kw_only=True):
    """A step's committed result, stored once under ``{run_id}.{step_hash}``."""

    v: int = 1
    id: str
    hash: str
    kind: StepKind
    status: StepStatus
    output: msgspec.Raw = msgspec.field(default_factory=lambda: NULL)
    error: ErrorInfo | None = None
    attempts: int = 1
    started_at: int
    ended_at: int
    seq: int = 0  # WAIT: the taken event's sequence in the events stream
    child: str | None = None  # INVOKE: the child run's id
    worker: str = ""  # the worker whose attempt this result is
    history: list[Attempt] = msgspec.field(default_factory=list)  # every attempt, when there were several
    # RUN: the step's arguments as kept on record (`codec.encode_input`); JSON null: none.
    input: msgspec.Raw = msgspec.field(default_factory=lambda: NULL)


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a note saying why it could not be had (a broken ``__str__``)."""
    try:
        return str(exc)
    except BaseException as inner:  # a user's __str__ may raise anything
        return f"<str() of {type(exc).__name__} raised {type(inner).__name__}>"


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _from_user_code(frames: TracebackType | None) -> TracebackType | None:
    """A traceback from its first frame outside meshflow on (the engine's frames that called the
    user's handler say nothing to its author); all of it when every frame is meshflow's."""
    first = frames
    while first is not None and first.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        first = first.tb_next
    return first or frames


#: What of an error is stored: the first 4 KiB of its message, the last 16 KiB of its traceback
#: (where it was raised), each with a note of how much was cut.
MAX_MESSAGE = 4 * 1024
MAX_TRACEBACK = 16 * 1024


def error_info(exc: BaseException, *, retriable: bool) -> ErrorInfo:
    """Describe ``exc`` for storage (bounded: `MAX_MESSAGE`, `MAX_TRACEBACK`), robust to exceptions
    whose ``__str__`` raises."""
    frames = _from_user_code(exc.__traceback__)
    try:
        trace = "".join(tb.format_exception(type(exc), exc, frames))
    except BaseException:  # format_exception calls __str__ too
        trace = "".join(tb.format_tb(frames))
    message = safe_str(exc)
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}… [{len(message) - MAX_MESSAGE} more characters cut]"
    if len(trace) > MAX_TRACEBACK:
        trace = f"[{len(trace) - MAX_TRACEBACK} characters cut]\n…{trace[-MAX_TRACEBACK:]}"
    return ErrorInfo(type=type(exc).__name__, message=message, traceback=trace, retriable=retriable)


def record_size(record: RunRecord | StepMemo) -> int:
    """The bytes of a record as stored."""
    return len(encode_record(record))


#: What a record write leaves of the server's max_payload for its headers.
KV_ROOM = 512


def record_limit(max_payload: int) -> int:
    """The largest record (encoded) a server with this ``max_payload`` stores."""
    return max_payload - KV_ROOM


def too_large_to_run(record: RunRecord, limit: int, now: int) -> RunRecord:
    """A new run whose record cannot be stored (its events are too large): failed at once, saying
    so, with its events' data left out (the events stay whole in the events stream)."""
    size = record_size(record)
    error = ErrorInfo(
        type="EventError",
        message=f"the run's record would be {size} bytes with its event(s), more than one record may "
        f"hold ({limit} bytes: the NATS server's max_payload less room for its headers); send smaller "
        "events (meshflow's client refuses events that leave no room for their runs)",
        retriable=False,
    )
    return msgspec.structs.replace(
        record,
        status=RunStatus.FAILED,
        events=[without_data(e) for e in record.events],
        error=error,
        lease=None,
        started_at=None,
        not_before=0,
        ended_at=now,
        updated_at=now,
    )


def without_data(event: Event) -> Event:
    """``event`` with its data left out (it is too large for a run record): ``{"_omitted": N}``
    holds how many bytes it had; the event stays whole in the events stream."""
    return msgspec.structs.replace(event, data={"_omitted": len(encode_event(event))})


_run_encoder = msgspec.json.Encoder()
_run_decoder = msgspec.json.Decoder(RunRecord)
_memo_decoder = msgspec.json.Decoder(StepMemo)


def encode_record(record: RunRecord | StepMemo) -> bytes:
    return _run_encoder.encode(record)


def decode_run(raw: bytes) -> RunRecord:
    return _run_decoder.decode(raw)


def decode_memo(raw: bytes) -> StepMemo:
    return _memo_decoder.decode(raw)


def finished_events(run: RunRecord, *, handles_failures: bool, limit: int | None = None) -> list[Event]:
    """The events a run emits when it ends: ``meshflow/function.finished``, and for a failure
    ``meshflow/function.failed`` with the original event (which starts ``on_failure``).

    Their ids derive from the run, so emitting again after a crash is deduplicated. A failing
    ``on_failure`` run emits no ``failed`` event of its own, so failures cannot cascade. An event
    over ``limit`` bytes leaves out the run's output (``output_omitted``), then the original
    event's data (``event_data_omitted``): both stay in the run's record.
    """
    data: dict[str, object] = {"function_id": run.function, "run_id": run.id, "status": str(run.status)}
    if run.status is RunStatus.COMPLETED:
        data["output"] = decode_value(run.output)
    if run.error is not None:
        data["error"] = msgspec.to_builtins(run.error)
    events = [_fitted(Event(name=EVENT_FUNCTION_FINISHED, id=finished_event_id(run.id), data=data), limit)]
    if run.status is RunStatus.FAILED and not handles_failures:
        failed = {**data, "event": msgspec.to_builtins(run.events[0])}
        events.append(
            _fitted(Event(name=EVENT_FUNCTION_FAILED, id=failed_event_id(run.id), data=failed), limit)
        )
    if run.status is RunStatus.CANCELLED:
        cancelled = {**data, "event": msgspec.to_builtins(run.events[0])}
        event = Event(name=EVENT_FUNCTION_CANCELLED, id=cancelled_event_id(run.id), data=cancelled)
        events.append(_fitted(event, limit))
    return events


def _fitted(event: Event, limit: int | None) -> Event:
    """``event``, or, when it is over ``limit`` bytes, without the output and then without the
    original event's data."""
    if limit is None or len(encode_event(event)) <= limit:
        return event
    data = dict(event.data)
    if "output" in data:
        data["output"], data["output_omitted"] = None, True
    if len(encode_event(msgspec.structs.replace(event, data=data))) > limit and isinstance(
        data.get("event"), dict
    ):
        data["event"] = {**data["event"], "data": {}}
        data["event_data_omitted"] = True
    return msgspec.structs.replace(event, data=data)
