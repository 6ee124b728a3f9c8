"""The replay engine's contract (``meshflow.replay``): what a pass hands it (`Activation`, with
`Effects` to commit and send through) and what it gives back (an `Outcome`).

Pure data: no I/O. The pass executor (``meshflow.passes``) builds activations and turns outcomes
into writes through ``meshflow.settle``; ``meshflow.testing`` drives the engine in memory.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import msgspec

from .durations import now_ms
from .events import Event
from .functions import Function
from .runs import Attempt, ErrorInfo, Pending, StepMemo

if TYPE_CHECKING:
    from .logs import LogShipper


class StepScope(NamedTuple):
    """The step attempt a piece of the function's code runs in: its step id and attempt number."""

    step_id: str
    attempt: int


class Effects(Protocol):
    """What the engine needs from the outside world: committing step memos and sending events."""

    async def commit(self, memo: StepMemo) -> StepMemo:
        """Store ``memo`` if the step has none yet; return the memo that is stored (first wins)."""
        ...

    async def send(self, events: Sequence[Event], msg_ids: Sequence[str]) -> None:
        """Publish ``events``, each deduplicated by its ``msg_ids`` entry."""
        ...


@dataclass(frozen=True)
class Activation:
    """Everything the engine needs to advance one run."""

    function: Function
    run_id: str
    events: Sequence[Event]
    attempt: int = 0  # function-level failures so far
    memos: Mapping[str, StepMemo] = field(default_factory=dict)
    pending: Sequence[Pending] = ()
    step_failures: Mapping[str, int] = field(default_factory=dict)
    step_history: Mapping[str, Sequence[Attempt]] = field(default_factory=dict)  # of steps retrying
    history: Sequence[Attempt] = ()  # the function's failed attempts
    worker: str = ""  # who runs this pass, for the attempts it records
    clock: Callable[[], int] = now_ms
    random: Callable[[], float] = random.random
    logger: Any = None
    seq: int = 0  # the triggering event's events-stream sequence (0: not from the stream)
    created_at: int = 0  # when the run was created, epoch ms
    cancelled: Callable[[], bool] = lambda: False  # asked before each new step
    # Awaited before a step's handler runs and before events are sent: raises when the pass no
    # longer holds its run (another pass took it over), which abandons the pass like a failed
    # commit does. None: nothing to check.
    fence: Callable[[], Awaitable[None]] | None = None
    # The most JSON one step result, function output or sent event may hold (the server's
    # max_payload less room for the record around it); None: no limit.
    max_value_bytes: int | None = None
    # Runs a plain ``def`` handler in a thread (the worker's daemon threads); None: asyncio's.
    run_sync: Callable[..., Awaitable[Any]] | None = None
    # The engine keeps the keys of the steps whose handlers run right now in here, for the
    # worker to record in its lease renewals (a step interrupted by a dying worker then counts
    # as an attempt). None: not kept.
    executing: set[str] | None = None
    # Entered around each step's execution when the function has a concurrency limit: holds a
    # slot for the step (the worker's takes an extra slot per step executing beside another).
    # None: one step at a time, on the slot the pass holds.
    step_slot: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None
    # Entered around each attempt of a step's handler, in the task that runs it (a trace span);
    # an exception the handler raises passes through it. None: nothing entered.
    step_attempt: Callable[[StepScope], contextlib.AbstractContextManager[Any]] | None = None
    # Where what the run logs is kept (``meshflow.logs``); None: only printed.
    logs: LogShipper | None = None


class Completed(msgspec.Struct, frozen=True, tag=True):
    output: msgspec.Raw


class Failed(msgspec.Struct, frozen=True, tag=True):
    error: ErrorInfo
    history: list[Attempt] = msgspec.field(default_factory=list)  # the function's attempts, if it failed


class Suspended(msgspec.Struct, frozen=True, tag=True):
    pending: list[Pending]
    step_failures: dict[str, int]
    attempt: int  # function-level failures so far (raised by a RUN_RETRY)
    step_history: dict[str, list[Attempt]] = msgspec.field(default_factory=dict)
    history: list[Attempt] = msgspec.field(default_factory=list)


class Cancelled(msgspec.Struct, frozen=True, tag=True):
    """The run was asked to stop; it stopped before starting another step."""


Outcome = Completed | Failed | Suspended | Cancelled


def as_it_was(act: Activation) -> Suspended:
    """``act``'s run suspended again just as it was (a pass woken before its retry backoff ended)."""
    return Suspended(
        pending=list(act.pending),
        step_failures=dict(act.step_failures),
        attempt=act.attempt,
        step_history={key: list(tried) for key, tried in act.step_history.items()},
        history=list(act.history),
    )
