"""Helpers that users' tests and ours share.

- `wait_until`: poll a condition with a deadline, instead of sleeping; `registered`: wait until
  a worker (in another process, say) has registered a function.
- The replay engine without NATS: `FakeClock` (time that moves only when the test says),
  `MemoryEffects` (the steps bucket and the events stream in memory: first commit of a step
  wins, sends are recorded) and `EngineRun`, a run kept between passes the way a worker keeps it,
  with `EngineRun.finish` to drive it pass after pass to its end, the clock jumping to each wake.

    run = EngineRun(my_function, event=meshflow.Event(name="user/signup", data={...}))
    outcome = await run.finish()          # a 3-day sleep takes no time: the clock jumps
    assert run.committed == ["create-account", "send-welcome", "wait-for-onboarding", ...]
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .events import Event
from .functions import Function
from .replay import Activation, Completed, Failed, Outcome, Suspended, execute
from .runs import Attempt, Pending, StepMemo

if TYPE_CHECKING:
    from .client import Client

T = TypeVar("T")

#: Where a `FakeClock` starts unless told: 2023-11-14T22:13:20Z, in epoch milliseconds.
EPOCH_MS = 1_700_000_000_000


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    message: str = ...,
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    message: str = ...,
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline is what this helper is for
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that value.

    Raises:
        TimeoutError: with ``message`` and the last value seen, when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        last = value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout}s (last value: {last!r})")
        await asyncio.sleep(interval)


async def registered(client: Client, fn: Function, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Wait until some worker has registered ``fn`` (so its consumers exist and events sent from
    now on reach it), for up to ``timeout`` seconds; `TimeoutError` saying which function."""

    async def listed() -> bool:
        return any(f.full_id == fn.full_id for f in await client.functions())

    await wait_until(listed, timeout=timeout, message=f"a worker registered {fn.full_id}")


class FakeClock:
    """A clock in epoch milliseconds that moves only when the test moves it."""

    def __init__(self, now: int = EPOCH_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class MemoryEffects:
    """The engine's effects in memory: the steps bucket (a commit under a hash that has a memo
    returns that memo: first writer wins) and the events stream (sends are recorded with their
    message ids)."""

    def __init__(self, memos: dict[str, StepMemo] | None = None) -> None:
        self.memos: dict[str, StepMemo] = dict(memos or {})
        self.commits: list[StepMemo] = []  # every commit asked for, in order
        self.sent: list[tuple[list[Event], list[str]]] = []

    async def commit(self, memo: StepMemo) -> StepMemo:
        self.commits.append(memo)
        return self.memos.setdefault(memo.hash, memo)

    async def send(self, events: Sequence[Event], msg_ids: Sequence[str]) -> None:
        self.sent.append((list(events), list(msg_ids)))


@dataclasses.dataclass
class EngineRun:
    """One run as a worker keeps it between passes, driven through the replay engine in memory.

    Jitter is off (``random`` returns 0), so retry times are exactly the backoff table's.
    """

    function: Function
    memos: dataclasses.InitVar[dict[str, StepMemo] | None] = None
    event: Event = dataclasses.field(default_factory=lambda: Event(name="test/event", ts=EPOCH_MS))
    clock: FakeClock = dataclasses.field(default_factory=FakeClock)
    run_id: str = "run-1"
    seq: int = 0  # the trigger's sequence in the events stream (0: not from the stream)
    created_at: int = 0
    attempt: int = 0
    pending: list[Pending] = dataclasses.field(default_factory=list)
    step_failures: dict[str, int] = dataclasses.field(default_factory=dict)
    step_history: dict[str, list[Attempt]] = dataclasses.field(default_factory=dict)
    history: list[Attempt] = dataclasses.field(default_factory=list)
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    effects: MemoryEffects = dataclasses.field(init=False)

    def __post_init__(self, memos: dict[str, StepMemo] | None) -> None:
        self.effects = MemoryEffects(memos)

    @property
    def committed(self) -> list[str]:
        """The step ids committed so far, in commit order."""
        return [memo.id for memo in self.effects.commits]

    def activation(self) -> Activation:
        """What a worker hands the engine when the run's message arrives."""
        return Activation(
            function=self.function,
            run_id=self.run_id,
            events=[self.event],
            attempt=self.attempt,
            memos=dict(self.effects.memos),
            pending=list(self.pending),
            step_failures=dict(self.step_failures),
            step_history=dict(self.step_history),
            history=list(self.history),
            worker="engine-run",
            clock=self.clock,
            random=lambda: 0.0,
            seq=self.seq,
            created_at=self.created_at,
        )

    async def advance(self, activation: Activation | None = None) -> Outcome:
        """One pass; what it leaves (pending items, failures, attempts) is kept for the next."""
        outcome = await execute(activation or self.activation(), self.effects)
        self.outcomes.append(outcome)
        if isinstance(outcome, Suspended):
            self.pending = outcome.pending
            self.step_failures = outcome.step_failures
            self.step_history = outcome.step_history
            self.history = outcome.history
            self.attempt = outcome.attempt
        return outcome

    async def finish(self, *, max_passes: int = 30) -> Completed | Failed:
        """Advance pass after pass, the clock jumping to each earliest wake, until the run ends.

        Raises:
            AssertionError: the run did not end in ``max_passes`` passes (it waits for an event
                or a child run, which nothing here delivers).
        """
        for _ in range(max_passes):
            outcome = await self.advance()
            if isinstance(outcome, Completed | Failed):
                return outcome
            if not isinstance(outcome, Suspended):
                raise AssertionError(f"the run stopped: {outcome}")
            self.clock.now = max(self.clock.now, min(p.until for p in outcome.pending))
        raise AssertionError(f"the run did not end in {max_passes} passes: {self.outcomes}")
