"""Attempts: what one attempt of a step comes to, and the attempts a step keeps on record.

An attempt that raised is retried while its policy allows (a `Pending` retry, its attempts so far
kept in the run record until the step is committed), or fails the step for good; one that
returned is the step's result. Either way the memo holds every attempt when there were several
(`StepMemo.history`), bounded by `kept`; a step whose first attempt succeeded keeps none (its memo
says when and where it ran). An attempt its worker did not live to finish is `interrupted`.
The step's input (its arguments as `codec.encode_input` keeps them) goes on its memo, and on its
pending retry while it waits.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses

import msgspec

from .codec import decode_value, input_beside
from .retries import Retry, attempts_left, never_retried, retry_delay_ms
from .runs import (
    NULL,
    Attempt,
    ErrorInfo,
    Lease,
    Pending,
    PendingKind,
    StepKind,
    StepMemo,
    StepStatus,
    error_info,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Tried:
    """One attempt of a step: which, when, where."""

    step_id: str
    key: str  # the step hash
    attempt: int  # 1 for the first
    started: int  # epoch ms
    ended: int
    worker: str
    given: msgspec.Raw = dataclasses.field(default_factory=lambda: NULL)  # `codec.encode_input`


@dataclasses.dataclass(frozen=True, slots=True)
class After:
    """What came of an attempt: a memo to commit, or a retry to wait for (with the attempts so far)."""

    memo: StepMemo | None
    retry: Pending | None
    history: list[Attempt]


def after(
    tried: Tried,
    *,
    history: list[Attempt],
    policy: Retry,
    exc: BaseException | None,
    output: msgspec.Raw | None,
    rnd: float,
    room: int | None = None,
) -> After:
    """The outcome of ``tried``, which raised ``exc`` or returned ``output`` (JSON), after the
    attempts in ``history``; ``rnd`` jitters a retry's backoff. The step's input is kept while it
    fits in ``room`` beside its output (the most one stored value may hold; None: no limit)."""
    if exc is None:
        assert output is not None
        this = Attempt(
            attempt=tried.attempt, started_at=tried.started, ended_at=tried.ended, worker=tried.worker
        )
        given = input_beside(tried.given, room, len(output))
        history = kept([*history, this]) if history else []
        memo = _memo(tried, StepStatus.COMPLETED, history, output=output, given=given)
        return After(memo=memo, retry=None, history=memo.history)
    again = not never_retried(exc) and attempts_left(policy, tried.attempt)
    error = error_info(exc, retriable=again)
    this = Attempt(
        attempt=tried.attempt,
        started_at=tried.started,
        ended_at=tried.ended,
        worker=tried.worker,
        error=error,
    )
    record = kept([*history, this])
    given = input_beside(tried.given, room)
    if not again:
        memo = _memo(tried, StepStatus.FAILED, record, error=error, given=given)
        return After(memo=memo, retry=None, history=record)
    retry = Pending(
        kind=PendingKind.STEP_RETRY,
        key=tried.key,
        step_id=tried.step_id,
        until=tried.ended + retry_delay_ms(exc, policy, tried.attempt, tried.ended, rnd),
        since=tried.ended,
        attempt=tried.attempt,
        error=error,
        input=decode_value(given),
    )
    return After(memo=None, retry=retry, history=record)


def _attempt(tried: Tried, error: ErrorInfo | None) -> Attempt:
    return Attempt(
        attempt=tried.attempt,
        started_at=tried.started,
        ended_at=tried.ended,
        worker=tried.worker,
        error=error,
    )


def _memo(
    tried: Tried,
    status: StepStatus,
    history: list[Attempt],
    *,
    output: msgspec.Raw | None = None,
    error: ErrorInfo | None = None,
    given: msgspec.Raw = NULL,
) -> StepMemo:
    return StepMemo(
        id=tried.step_id,
        hash=tried.key,
        kind=StepKind.RUN,
        status=status,
        output=output if output is not None else NULL,
        error=error,
        attempts=tried.attempt,
        started_at=tried.started,
        ended_at=tried.ended,
        worker=tried.worker,
        history=history,
        input=given,
    )


#: A step keeps its last `MAX_ATTEMPTS` attempts, the last `FULL_TRACEBACKS` of them with their
#: tracebacks (16 KiB each at most): 50 whole tracebacks would not fit in one record (1 MiB).
MAX_ATTEMPTS = 50
FULL_TRACEBACKS = 5
_OLD_MESSAGE = 512


def kept(attempts: list[Attempt]) -> list[Attempt]:
    """``attempts`` as stored: the last `MAX_ATTEMPTS`; older than the last `FULL_TRACEBACKS`,
    without their tracebacks and with their messages cut to 512 characters."""
    kept = attempts[-MAX_ATTEMPTS:]
    old = len(kept) - FULL_TRACEBACKS
    return [_without_traceback(a) if i < old else a for i, a in enumerate(kept)]


def _without_traceback(attempt: Attempt) -> Attempt:
    error = attempt.error
    if error is None or (not error.traceback and len(error.message) <= _OLD_MESSAGE):
        return attempt
    message = error.message if len(error.message) <= _OLD_MESSAGE else f"{error.message[:_OLD_MESSAGE]}…"
    return msgspec.structs.replace(
        attempt, error=msgspec.structs.replace(error, message=message, traceback="")
    )


def interrupted(attempt: int, lease: Lease, lease_ms: int) -> Attempt:
    """An attempt cut short: its worker stopped or died while it ran (seen in the lease's last
    renewal, which is when the attempt is known to have been running)."""
    return Attempt(
        attempt=attempt,
        started_at=lease.until - lease_ms,
        worker=lease.worker,
        error=ErrorInfo(
            type="Interrupted",
            message=f"the worker running it ({lease.worker}) stopped or died while it ran",
            retriable=True,
        ),
    )
