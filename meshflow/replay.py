"""The replay engine: runs a function against its committed steps and says what happens next.

Rules (the tests in ``tests/unit/test_replay.py`` defend each):

1. A step whose memo exists returns the stored result (or raises `StepError` for a stored
   failure) without running anything. Memo keys follow Inngest: ``sha1(id)`` for the first use
   of an id in a run, ``sha1(f"{id}:{n}")`` for its n-th repeat.
2. The first new ``step.run`` executes inline and its memo is committed through
   ``Effects.commit`` *before* the function continues. Execution goes on inline through as many
   steps as it can, so a pass is O(steps), not O(steps²) re-replays. Steps awaited together
   (``asyncio.gather``) execute concurrently; in a function with a concurrency limit each
   executes inside ``Activation.step_slot`` (a slot per executing step), by default one at a time.
3. A step that cannot finish now *parks* its branch: a sleep not yet due, or a failed step
   waiting for its retry backoff. When nothing is executing and every live branch is parked, the
   pass ends with `Suspended` and every parked item; the run holds nothing in memory after that.
4. A failed step is retried per its policy (``Pending(STEP_RETRY)``); when its attempts are
   spent, or it raised `NonRetriableError`, a failed memo is committed and `StepError` is raised
   at the call site, where the function may catch it.
5. An error escaping the function retries the whole function (``Pending(RUN_RETRY)``) while its
   attempts last, never before its backoff is over (a pass woken early suspends again);
   `StepError`, `NonRetriableError`, configuration errors and non-``Exception`` errors
   (``SystemExit``...) fail the run at once.
6. ``execute`` never raises for anything the user's code does: every user error becomes an
   outcome. It imports nothing from NATS; the worker turns outcomes into NATS writes.

Engine control flow is parking on a future that never resolves; the pass ends the function's
task by cancelling it, so nothing a user writes in ``except Exception:`` can swallow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import msgspec

from . import attempts
from .activations import Activation as Activation
from .activations import Cancelled as Cancelled
from .activations import Completed as Completed
from .activations import Effects as Effects
from .activations import Failed as Failed
from .activations import Outcome as Outcome
from .activations import StepScope, as_it_was
from .activations import Suspended as Suspended
from .codec import decode_value, encode_input, encode_value
from .durations import ms_at, parse_duration, parse_when, to_ms
from .errors import (
    ConfigError,
    NestedStepError,
    NonDeterminismError,
    SerializationError,
    StepError,
)
from .events import Event, events_to_send
from .functions import Function
from .ids import StepCounter
from .invokes import invoke_item
from .logs import RunLogger
from .names import sent_event_id
from .retries import Retry, attempts_left, never_retried, retry_delay_ms, retry_policy
from .runs import (
    NULL,
    Attempt,
    ErrorInfo,
    Pending,
    PendingKind,
    StepKind,
    StepMemo,
    StepStatus,
    error_info,
)
from .steps import Context, Step
from .threads import call_handler
from .waits import wait_spec

# How many loop turns to let sibling branches (asyncio.gather) reach their next step call before
# concluding that every branch is parked.
_SETTLE_TICKS = 4
_MAX_STEP_ID = 256

T = TypeVar("T")

# The step attempt the current task executes (its handler's code, and what it awaits), if any.
_in_step: contextvars.ContextVar[StepScope | None] = contextvars.ContextVar("meshflow_in_step", default=None)


class _Stop(BaseException):
    """Raised at a new step's call site when the run is cancelled (not catchable as Exception)."""


class _Abort(BaseException):
    """Raised into the function when committing or sending failed (NATS unreachable): the pass is
    abandoned, not the function failed, and the run resumes from its last commit later."""


class _Exit(Exception):
    """Carries a ``SystemExit``/``KeyboardInterrupt`` the function raised out of its task.

    asyncio re-raises those two out of the event loop, which would stop the worker instead of
    failing the run.
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(type(exc).__name__)
        self.exc = exc


async def _body(function: Function, ctx: Context) -> Any:
    try:
        return await function.handler(ctx)
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _Exit(exc) from None


def _one_at_a_time() -> Callable[[], contextlib.AbstractAsyncContextManager[Any]]:
    """A step slot for a pass with no other: its steps execute one at a time."""
    one = asyncio.Lock()
    return lambda: one


class _Pass:
    """One advance of one run: replays memos, executes new steps, collects parked items."""

    def __init__(self, act: Activation, effects: Effects) -> None:
        self.act = act
        self.effects = effects
        self.counter = StepCounter()
        self.memos = dict(act.memos)
        self.old_pending = {p.key: p for p in act.pending}
        self.parked: dict[str, Pending] = {}
        self.step_failures = dict(act.step_failures)
        self.step_history = {key: list(tried) for key, tried in act.step_history.items()}
        self.started = act.clock()
        self.running = 0
        # A concurrency limit counts executing steps: each executes holding a slot.
        self.step_slot = act.step_slot
        if self.step_slot is None and act.function.flow.concurrency:
            self.step_slot = _one_at_a_time()
        self.version = 0
        self.changed = asyncio.Event()
        # Until it is past every step an earlier pass reached, or at one none did: it logged that before.
        self.reached = {*act.memos, *(p.key for p in act.pending if p.kind is not PendingKind.RUN_RETRY)}
        self.replaying = bool(self.reached)
        self.stopped = False
        self.infra_error: BaseException | None = None
        self.never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def bump(self) -> None:
        self.version += 1
        self.changed.set()

    async def effect(self, call: Awaitable[T]) -> T:
        """Await an effect (a commit, a send); if it fails, abandon the pass (`_Abort`)."""
        try:
            return await call
        except Exception as exc:  # NatsError, a timeout: not the user's code failing
            if self.infra_error is None:
                self.infra_error = exc
            self.bump()
            raise _Abort from exc

    async def fenced(self) -> None:
        """Go on only while the pass holds its run (`Activation.fence`); else abandon the pass."""
        if self.act.fence is not None:
            await self.effect(self.act.fence())

    async def park(self, item: Pending) -> NoReturn:
        self.parked[item.key] = item
        self.bump()
        await self.never
        raise AssertionError("unreachable: the parked future never resolves")

    def _new_step(self, step_id: object, kind: StepKind) -> tuple[str, StepMemo | None]:
        nested = _in_step.get()
        if nested is not None:
            raise NestedStepError(
                f"step {step_id!r} was called inside the handler of step {nested.step_id!r}; "
                "call steps from the function body, not from another step"
            )
        if not isinstance(step_id, str) or not step_id or len(step_id) > _MAX_STEP_ID:
            raise ConfigError(f"step id {step_id!r}: use a non-empty string of at most {_MAX_STEP_ID} chars")
        key = self.counter.next(step_id)
        memo = self.memos.get(key)
        if memo is not None and memo.kind != kind:
            raise NonDeterminismError(
                f"step {step_id!r} was a {memo.kind} step when the run first executed and is a "
                f"{kind} step now; keep step ids stable across deploys of a running function"
            )
        known = key in self.reached
        self.reached.discard(key)
        if not known or not self.reached:
            self.replaying = False
        if memo is None:
            if self.act.cancelled():
                self.stopped = True
                self.bump()
                raise _Stop
        return key, memo

    # --- step.run ----------------------------------------------------------------------------
    async def run_step(
        self,
        step_id: str,
        handler: Callable[..., Any],
        args: tuple[Any, ...],
        type_: Any,
        retries: int | Retry | None,
    ) -> Any:
        key, memo = self._new_step(step_id, StepKind.RUN)
        if memo is None:
            memo = await self._execute(key, step_id, handler, args, retries)
        if memo.status is StepStatus.COMPLETED:
            return decode_value(memo.output, type_)
        err = memo.error or ErrorInfo(type="Error", message="unknown")
        raise StepError(step_id, err.type, err.message, err.traceback)

    async def _execute(
        self,
        key: str,
        step_id: str,
        handler: Callable[..., Any],
        args: tuple[Any, ...],
        retries: int | Retry | None,
    ) -> StepMemo:
        policy = (
            self.act.function.retry if retries is None else retry_policy(retries, what=f"step {step_id!r}")
        )
        old = self.old_pending.get(key)
        if old is not None and old.kind is PendingKind.STEP_RETRY and old.until > self.act.clock():
            await self.park(old)  # still backing off: a message arrived early
        failures = self.step_failures.get(key, 0)
        given = encode_input(args)  # before the handler runs (it may change them), once an attempt
        self.running += 1
        self.bump()
        retry: Pending | None = None
        try:
            started = self.act.clock()
            memo: StepMemo | None = None
            try:
                if self.step_slot is None:
                    await self.fenced()
                    value = await self._call(key, StepScope(step_id, failures + 1), handler, args)
                else:
                    async with self.step_slot():
                        await self.fenced()
                        started = self.act.clock()
                        value = await self._call(key, StepScope(step_id, failures + 1), handler, args)
                output = encode_value(value, what=f"step {step_id!r}", limit=self.act.max_value_bytes)
            except BaseException as exc:
                task = asyncio.current_task()
                if isinstance(exc, _Abort) or (
                    isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling()
                ):
                    raise  # the pass is abandoned or cancelled (the worker stops): not the step's failure
                memo, retry = self._attempted(step_id, key, policy, failures, started, exc, None, given)
            else:
                memo, retry = self._attempted(step_id, key, policy, failures, started, None, output, given)
            if memo is not None:
                memo = await self.effect(self.effects.commit(memo))
                self.memos[key] = memo
                self.step_history.pop(key, None)
        finally:
            self.running -= 1
            self.bump()
        if retry is not None:
            await self.park(retry)
        assert memo is not None
        return memo

    def _attempted(
        self,
        step_id: str,
        key: str,
        policy: Retry,
        failures: int,
        started: int,
        exc: BaseException | None,
        output: msgspec.Raw | None,
        given: msgspec.Raw,
    ) -> tuple[StepMemo | None, Pending | None]:
        """What one attempt of a step comes to (`attempts.after`): the memo to commit, or the
        retry to wait for; the attempts so far are kept for the next pass meanwhile."""
        now = self.act.clock()
        after = attempts.after(
            attempts.Tried(step_id, key, failures + 1, started, now, self.act.worker, given),
            history=self.step_history.get(key, []),
            policy=policy,
            exc=exc,
            output=output,
            rnd=self.act.random(),
            room=self.act.max_value_bytes,
        )
        if after.retry is not None:
            self.step_failures[key] = failures + 1
            self.step_history[key] = after.history
        return after.memo, after.retry

    async def _call(
        self, key: str, scope: StepScope, handler: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        token = _in_step.set(scope)
        executing = self.act.executing if self.act.executing is not None else set()
        executing.add(key)
        observe = self.act.step_attempt(scope) if self.act.step_attempt else contextlib.nullcontext()
        cut_short = False  # by the worker stopping: the step still counts as executing for the lease
        try:
            with observe:
                return await call_handler(handler, args, self.act.run_sync)
        except asyncio.CancelledError:  # the handler's own is an ordinary failure
            task = asyncio.current_task()
            cut_short = task is not None and task.cancelling() > 0
            raise
        finally:
            _in_step.reset(token)
            if not cut_short:
                executing.discard(key)

    # --- step.sleep / sleep_until ------------------------------------------------------------
    async def sleep_step(self, step_id: str, duration: object, *, until: bool) -> None:
        key, memo = self._new_step(step_id, StepKind.SLEEP)
        if memo is not None:
            return
        now = self.act.clock()
        old = self.old_pending.get(key)
        if old is not None and old.kind is PendingKind.SLEEP:
            item = old
        else:
            if until:
                wake = ms_at(parse_when(duration, what=f"step {step_id!r}"))  # type: ignore[arg-type]
            else:
                wake = now + to_ms(parse_duration(duration, what=f"step {step_id!r}"))  # type: ignore[arg-type]
            item = Pending(kind=PendingKind.SLEEP, key=key, step_id=step_id, until=wake, since=now)
        if now < item.until:
            await self.park(item)
        done = StepMemo(
            id=step_id,
            hash=key,
            kind=StepKind.SLEEP,
            status=StepStatus.COMPLETED,
            started_at=item.since or now,
            ended_at=now,
        )
        await self._commit_now(done)

    async def _commit_now(self, memo: StepMemo) -> StepMemo:
        """Commit a memo the pass decided on (a timeout, a sleep's end); first writer wins."""
        self.running += 1
        try:
            stored = await self.effect(self.effects.commit(memo))
            self.memos[memo.hash] = stored
            return stored
        finally:
            self.running -= 1
            self.bump()

    # --- step.wait_for_event / wait_for_any --------------------------------------------------
    async def wait_step(
        self,
        step_id: str,
        specs: Sequence[tuple[object, object, object]],
        timeout: object,
        lookback: object,
        since: object,
    ) -> Event | None:
        key, memo = self._new_step(step_id, StepKind.WAIT)
        if memo is None:
            now = self.act.clock()
            old = self.old_pending.get(key)
            if old is not None and old.kind is PendingKind.WAIT:
                item = old
            else:
                what = f"step {step_id!r}"
                until = now + to_ms(parse_duration(timeout, what=f"{what} timeout"))  # type: ignore[arg-type]
                waits = [
                    wait_spec(
                        spec,
                        trigger=self.act.events[0],
                        seq=self.act.seq,
                        created_at=self.act.created_at,
                        memos=self.memos.values(),
                        now=now,
                        lookback=lookback,
                        since=since,
                        what=what,
                    )
                    for spec in specs
                ]
                item = Pending(
                    kind=PendingKind.WAIT, key=key, step_id=step_id, until=until, since=now, waits=waits
                )
            if now < item.until:
                await self.park(item)
            memo = await self._commit_now(
                StepMemo(
                    id=step_id,
                    hash=key,
                    kind=StepKind.WAIT,
                    status=StepStatus.COMPLETED,
                    started_at=item.since or now,
                    ended_at=now,
                )
            )
        if memo.output == NULL:
            return None
        return decode_value(memo.output, Event)  # type: ignore[no-any-return]

    # --- step.invoke ---------------------------------------------------------------------------
    async def invoke_step(
        self, step_id: str, function: object, data: object, timeout: object, type_: Any
    ) -> Any:
        key, memo = self._new_step(step_id, StepKind.INVOKE)
        if memo is None:
            now = self.act.clock()
            old = self.old_pending.get(key)
            if old is not None and old.kind is PendingKind.INVOKE:
                item = old
            else:
                item = invoke_item(
                    key,
                    step_id,
                    function=function,
                    data=data,
                    timeout=timeout,
                    run_id=self.act.run_id,
                    created_at=self.act.created_at,
                    now=now,
                )
            if now < item.until:
                await self.park(item)
            target = item.invoke.function if item.invoke else "?"
            memo = await self._commit_now(
                StepMemo(
                    id=step_id,
                    hash=key,
                    kind=StepKind.INVOKE,
                    status=StepStatus.FAILED,
                    error=ErrorInfo(
                        type="InvokeTimeoutError",
                        message=f"function {target} did not finish within the invoke timeout",
                        retriable=False,
                    ),
                    started_at=item.since or now,
                    ended_at=now,
                    child=item.invoke.run_id if item.invoke else None,
                )
            )
        if memo.status is StepStatus.COMPLETED:
            return decode_value(memo.output, type_)
        err = memo.error or ErrorInfo(type="Error", message="unknown")
        raise StepError(step_id, err.type, err.message, err.traceback)

    # --- step.send_event -----------------------------------------------------------------------
    async def send_step(self, step_id: str, events: object) -> list[str]:
        key, memo = self._new_step(step_id, StepKind.SEND)
        if memo is None:
            batch = events_to_send(
                events, what=f"step {step_id!r}: send_event", limit=self.act.max_value_bytes
            )
            ids = [event.id for event in batch]
            self.running += 1
            self.bump()
            try:
                started = self.act.clock()
                await self.fenced()
                # A pass re-executed after a crash sends the same message ids: the stream drops them.
                await self.effect(
                    self.effects.send(
                        batch, [sent_event_id(self.act.run_id, key, i) for i in range(len(batch))]
                    )
                )
                memo = StepMemo(
                    id=step_id,
                    hash=key,
                    kind=StepKind.SEND,
                    status=StepStatus.COMPLETED,
                    output=encode_value(ids, what=f"step {step_id!r}"),
                    started_at=started,
                    ended_at=self.act.clock(),
                )
                memo = await self.effect(self.effects.commit(memo))
                self.memos[key] = memo
            finally:
                self.running -= 1
                self.bump()
        return list(decode_value(memo.output))

    # --- ending the pass ---------------------------------------------------------------------
    def suspended(self, attempt: int | None = None, history: list[Attempt] | None = None) -> Suspended:
        return Suspended(
            pending=list(self.parked.values()),
            step_failures=self.step_failures,
            attempt=self.act.attempt if attempt is None else attempt,
            step_history=self.step_history,
            history=list(self.act.history) if history is None else history,
        )

    def failed_attempt(self, error: ErrorInfo) -> list[Attempt]:
        """The function's attempts with this one, which failed in this pass."""
        this = Attempt(
            attempt=self.act.attempt + 1,
            started_at=self.started,
            ended_at=self.act.clock(),
            worker=self.act.worker,
            error=error,
        )
        return attempts.kept([*self.act.history, this])

    def finish(self, task: asyncio.Task[Any]) -> Outcome:
        if task.cancelled():
            return Failed(error=ErrorInfo(type="CancelledError", message="the function cancelled itself"))
        exc = task.exception()
        if isinstance(exc, _Stop) or self.stopped:
            return Cancelled()
        if isinstance(exc, _Exit):
            exc = exc.exc
        if exc is None:
            try:
                limit = self.act.max_value_bytes
                return Completed(output=encode_value(task.result(), what="the function", limit=limit))
            except SerializationError as err:
                error = error_info(err, retriable=False)
                return Failed(error=error, history=self.failed_attempt(error))
        policy = self.act.function.retry
        failures = self.act.attempt + 1
        if never_retried(exc) or not attempts_left(policy, failures):
            error = error_info(exc, retriable=False)
            return Failed(error=error, history=self.failed_attempt(error))
        now = self.act.clock()
        error = error_info(exc, retriable=True)
        self.parked = {
            "run": Pending(
                kind=PendingKind.RUN_RETRY,
                key="run",
                until=now + retry_delay_ms(exc, policy, failures, now, self.act.random()),
                since=now,
                attempt=failures,
                error=error,
            )
        }
        return self.suspended(attempt=failures, history=self.failed_attempt(error))


async def execute(act: Activation, effects: Effects) -> Outcome:
    """Advance one run as far as it can go now. Never raises for anything the user's code does.

    Raises only `asyncio.CancelledError` (the worker is stopping) and errors of ``effects``
    (NATS is unreachable) or of ``Activation.fence`` (the pass lost its run), which leave the run
    to be resumed from its last commit.
    """
    retry = next((p for p in act.pending if p.kind is PendingKind.RUN_RETRY), None)
    if retry is not None and act.clock() < retry.until:  # woken early: the backoff is not over
        return as_it_was(act)
    engine = _Pass(act, effects)
    logger = RunLogger.of(act, lambda: engine.replaying, _in_step.get)
    ctx = Context(
        events=act.events,
        run_id=act.run_id,
        function_id=act.function.full_id,
        attempt=act.attempt,
        step=Step(engine),
        logger=logger,  # type: ignore[arg-type]
    )
    token = logger.enter()  # the function's task, and the threads it starts, log to the run
    task: asyncio.Task[Any] = asyncio.ensure_future(_body(act.function, ctx))
    logger.leave(token)
    task.add_done_callback(lambda _: engine.bump())
    try:
        while not task.done():
            engine.changed.clear()
            if engine.infra_error is not None:
                raise engine.infra_error
            if engine.stopped and engine.running == 0:
                return Cancelled()  # steps in flight on other branches have committed
            if engine.running == 0 and engine.parked:
                seen = engine.version
                for _ in range(_SETTLE_TICKS):
                    await asyncio.sleep(0)
                if not task.done() and seen == engine.version and engine.running == 0:
                    return engine.suspended()
                continue
            await engine.changed.wait()
        if engine.infra_error is not None:
            raise engine.infra_error
        return engine.finish(task)
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: S110 - the user's code unwinding from our cancel; nothing to report
                pass
        elif not task.cancelled():
            task.exception()  # seen: a pass abandoned on an effect's error ends the function with _Abort
