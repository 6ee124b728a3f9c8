"""The replay engine (`meshflow.replay`): each rule of its module docstring, defended without a server.

Runs are driven the way a worker drives them, with ``meshflow.testing``'s `EngineRun`: an in-memory
step store where the first commit of a hash wins, and a fake clock. When a pass suspends, the
clock jumps to the earliest wake time and the next pass gets what the last one left (pending
items, step failures, the function's attempt). Nothing here sleeps for real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from meshflow.durations import from_ms
from meshflow.errors import NonRetriableError, RetryAfterError, StepError
from meshflow.events import Event
from meshflow.flow.config import Concurrency
from meshflow.functions import App
from meshflow.ids import step_hash
from meshflow.replay import Activation, Completed, Failed, Outcome, Suspended, execute
from meshflow.retries import Retry
from meshflow.runs import ErrorInfo, Pending, PendingKind, StepKind, StepMemo, StepStatus
from meshflow.steps import Context
from meshflow.testing import EngineRun, wait_until

T0 = 1_700_000_000_000  # where the fake clock starts, epoch ms
SECOND = 1_000
FAST = Retry(retries=3, backoff=("1s", "2s"))  # short backoffs keep the expected times readable


# --- the world around the engine -------------------------------------------------------------


@dataclasses.dataclass
class Run(EngineRun):
    """A run of these tests: its triggering event is ``t/e`` at the clock's start."""

    event: Event = dataclasses.field(default_factory=lambda: Event(name="t/e", data={"n": 1}, ts=T0))


def output(outcome: Outcome) -> Any:
    assert isinstance(outcome, Completed), outcome
    return msgspec.json.decode(outcome.output)


def completed(step_id: str, value: Any, n: int = 0) -> tuple[str, StepMemo]:
    """A committed result of the `n`-th use of `step_id`, keyed as the store keys it."""
    key = step_hash(step_id, n)
    raw = msgspec.Raw(msgspec.json.encode(value))
    memo = StepMemo(
        id=step_id,
        hash=key,
        kind=StepKind.RUN,
        status=StepStatus.COMPLETED,
        output=raw,
        started_at=T0,
        ended_at=T0,
    )
    return key, memo


class Calls:
    """Counts how often each step handler ran."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def handler(self, name: str, value: Any) -> Callable[[], Any]:
        def run() -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            return value

        return run


def failing(times: int, error: Callable[[], BaseException], then: Any = "ok") -> Callable[[], Awaitable[Any]]:
    """An async handler that raises `error()` on its first `times` calls, then returns `then`."""
    calls = 0

    async def handler() -> Any:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise error()
        return then

    return handler


@pytest.fixture
def app() -> App:
    return App("t")


@dataclasses.dataclass
class User:
    id: int
    name: str


class Order(msgspec.Struct):
    id: int
    total: float


# --- rule 2: new steps run inline, one commit each, in one pass --------------------------------


async def test_three_new_steps_complete_in_one_pass_with_one_memo_each(app: App) -> None:
    async def load_order(order_id: int) -> Order:
        return Order(id=order_id, total=9.5)

    @app.function("checkout", trigger="t/e")
    async def checkout(ctx: Context) -> dict[str, Any]:
        user = await ctx.step.run("load-user", lambda: User(id=1, name="ada"))
        order = await ctx.step.run("load-order", load_order, 7)
        total = await ctx.step.run("add-tax", lambda: order["total"] * 2)
        return {"user": user, "order": order, "total": total}

    run = Run(checkout)

    outcome = await run.advance()

    assert output(outcome) == {
        "user": {"id": 1, "name": "ada"},
        "order": {"id": 7, "total": 9.5},
        "total": 19.0,
    }
    assert run.committed == ["load-user", "load-order", "add-tax"]
    assert [m.hash for m in run.effects.commits] == [
        step_hash("load-user"),
        step_hash("load-order"),
        step_hash("add-tax"),
    ]
    assert all(m.status is StepStatus.COMPLETED and m.attempts == 1 for m in run.effects.commits)


async def test_a_step_result_reaches_the_function_as_decoded_json_not_the_returned_object(app: App) -> None:
    seen: list[Any] = []

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> None:
        seen.append(await ctx.step.run("user", lambda: User(id=1, name="ada")))
        seen.append(await ctx.step.run("order", lambda: Order(id=2, total=1.5)))
        seen.append(await ctx.step.run("when", lambda: dt.datetime(2026, 1, 2, tzinfo=dt.UTC)))

    await Run(f).finish()

    assert seen == [{"id": 1, "name": "ada"}, {"id": 2, "total": 1.5}, "2026-01-02T00:00:00Z"]


async def test_a_step_result_is_decoded_into_the_given_type_first_time_and_on_replay(app: App) -> None:
    seen: list[Any] = []

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> None:
        seen.append(await ctx.step.run("user", lambda: User(id=1, name="ada"), type=User))
        seen.append(await ctx.step.run("order", lambda: {"id": 2, "total": 1.5}, type=Order))

    await Run(f).finish()
    await Run(
        f, dict([completed("user", {"id": 3, "name": "bob"}), completed("order", {"id": 4, "total": 0})])
    ).finish()

    assert seen == [
        User(id=1, name="ada"),
        Order(id=2, total=1.5),
        User(id=3, name="bob"),
        Order(id=4, total=0),
    ]


async def test_the_event_and_the_run_reach_the_function_through_ctx(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> dict[str, Any]:
        return {"data": ctx.event.data, "n": len(ctx.events), "run": ctx.run_id, "fn": ctx.function_id}

    assert output(await Run(f).finish()) == {"data": {"n": 1}, "n": 1, "run": "run-1", "fn": "t-f"}


# --- rule 1: memoized steps return their stored result without running -----------------------


async def test_memoized_steps_are_not_run_again_and_the_first_new_step_runs(app: App) -> None:
    calls = Calls()

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> list[Any]:
        a = await ctx.step.run("a", calls.handler("a", "fresh a"))
        b = await ctx.step.run("b", calls.handler("b", "fresh b"))
        c = await ctx.step.run("c", calls.handler("c", "fresh c"))
        return [a, b, c]

    run = Run(f, dict([completed("a", "stored a"), completed("b", "stored b")]))

    assert output(await run.advance()) == ["stored a", "stored b", "fresh c"]
    assert calls.counts == {"c": 1}
    assert run.committed == ["c"]


async def test_a_memoized_failure_raises_step_error_at_the_call_site_without_running(app: App) -> None:
    calls = Calls()
    key = step_hash("charge")
    failure = StepMemo(
        id="charge",
        hash=key,
        kind=StepKind.RUN,
        status=StepStatus.FAILED,
        error=ErrorInfo(type="CardDeclined", message="no funds", retriable=False),
        attempts=5,
        started_at=T0,
        ended_at=T0,
    )

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        try:
            await ctx.step.run("charge", calls.handler("charge", "charged"))
        except StepError as exc:
            return f"{exc.step_id}: {exc.error_type}: {exc.error_message}"
        return "charged"

    assert output(await Run(f, {key: failure}).advance()) == "charge: CardDeclined: no funds"
    assert calls.counts == {}


async def test_when_another_worker_committed_a_step_first_the_function_gets_the_stored_result(
    app: App,
) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> Any:
        return await ctx.step.run("a", lambda: "mine")

    run = Run(f)
    key, theirs = completed("a", "theirs")
    run.effects.memos[key] = theirs  # committed after this pass loaded the run's memos

    activation = Activation(function=f, run_id="run-1", events=[run.event], clock=run.clock)
    outcome = await execute(activation, run.effects)

    assert output(outcome) == "theirs"
    assert run.effects.memos[key] is theirs


async def test_a_step_id_repeated_in_a_loop_gets_a_distinct_hash_per_use(app: App) -> None:
    async def double(i: int) -> int:
        return i * 2

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> list[int]:
        return [await ctx.step.run("double", double, i) for i in range(3)]

    run = Run(f)

    assert output(await run.advance()) == [0, 2, 4]
    assert [m.hash for m in run.effects.commits] == [
        step_hash("double"),
        step_hash("double", 1),
        step_hash("double", 2),
    ]
    assert len({m.hash for m in run.effects.commits}) == 3


async def test_each_loop_iteration_gets_back_its_own_memo(app: App) -> None:
    calls = Calls()

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> list[str]:
        return [await ctx.step.run("fetch", calls.handler("fetch", "fresh")) for _ in range(4)]

    memos = dict(completed("fetch", f"page {n}", n) for n in range(3))

    assert output(await Run(f, memos).advance()) == ["page 0", "page 1", "page 2", "fresh"]
    assert calls.counts == {"fetch": 1}


# --- handlers ----------------------------------------------------------------------------------


async def test_a_sync_handler_runs_in_a_worker_thread_with_its_arguments(app: App) -> None:
    threads: list[threading.Thread] = []

    def add(a: int, b: int, c: int = 0) -> int:
        threads.append(threading.current_thread())
        return a + b + c

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> int:
        return await ctx.step.run("add", add, 2, 3)

    assert output(await Run(f).advance()) == 5
    assert threads
    assert threads[0] is not threading.current_thread()


async def test_an_async_handler_runs_on_the_loop_with_its_arguments(app: App) -> None:
    threads: list[threading.Thread] = []

    async def greet(name: str, punctuation: str) -> str:
        threads.append(threading.current_thread())
        return f"hello {name}{punctuation}"

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        return await ctx.step.run("greet", greet, "ada", "!")

    assert output(await Run(f).advance()) == "hello ada!"
    assert threads == [threading.current_thread()]


async def test_a_lambda_returning_a_coroutine_is_awaited(app: App) -> None:
    async def fetch(url: str) -> dict[str, str]:
        return {"url": url}

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> Any:
        return await ctx.step.run("fetch", lambda: fetch("https://example.test"))

    assert output(await Run(f).advance()) == {"url": "https://example.test"}


async def test_steps_awaited_together_with_gather_run_concurrently_in_one_pass(app: App) -> None:
    a_started, b_started = asyncio.Event(), asyncio.Event()

    async def a() -> str:
        a_started.set()
        await asyncio.wait_for(b_started.wait(), timeout=5)  # only returns if b runs meanwhile
        return "a"

    async def b() -> str:
        b_started.set()
        await asyncio.wait_for(a_started.wait(), timeout=5)
        return "b"

    @app.function("f", trigger="t/e", retries=0)
    async def f(ctx: Context) -> list[str]:
        return list(await asyncio.gather(ctx.step.run("a", a), ctx.step.run("b", b)))

    run = Run(f)

    assert output(await run.advance()) == ["a", "b"]
    assert sorted(run.committed) == ["a", "b"]


async def test_under_a_concurrency_limit_steps_awaited_together_run_one_at_a_time(app: App) -> None:
    executing: list[int] = [0]
    most: list[int] = [0]
    asked: set[str] = set()

    async def step(name: str) -> str:
        executing[0] += 1
        most[0] = max(most[0], executing[0])
        # Every branch asks for its step before this one ends: an ask goes on, without yielding,
        # to where the step waits for its slot, so the others are waiting there now (or running).
        await wait_until(lambda: asked == set("abc"), timeout=5, message="every branch asked")
        executing[0] -= 1
        return name

    async def ask(ctx: Context, name: str) -> str:
        asked.add(name)
        return str(await ctx.step.run(name, step, name))

    @app.function("f", trigger="t/e", retries=0, concurrency=Concurrency(limit=5))
    async def f(ctx: Context) -> list[str]:
        return list(await asyncio.gather(*(ask(ctx, n) for n in "abc")))

    run = Run(f)

    assert output(await run.advance()) == ["a", "b", "c"]
    assert sorted(run.committed) == ["a", "b", "c"]
    assert most == [1]  # the pass holds one slot: one step at a time


# --- sleeps ------------------------------------------------------------------------------------


async def test_a_sleep_suspends_until_now_plus_its_duration(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        await ctx.step.sleep("nap", "2s")
        return "awake"

    run = Run(f)

    outcome = await run.advance()

    assert isinstance(outcome, Suspended)
    assert outcome.pending == [
        Pending(kind=PendingKind.SLEEP, key=step_hash("nap"), step_id="nap", until=T0 + 2 * SECOND, since=T0)
    ]
    assert run.committed == []


async def test_a_sleep_never_wakes_early_and_keeps_its_wake_time_across_early_passes(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        await ctx.step.sleep("nap", "2s")
        return "awake"

    run = Run(f)
    first = await run.advance()
    assert isinstance(first, Suspended)

    run.clock.now = T0 + 2 * SECOND - 1  # the timer message came a millisecond early
    second = await run.advance()

    assert isinstance(second, Suspended)
    assert second.pending == first.pending  # same `until`: not pushed back to now + 2s
    assert run.committed == []


async def test_a_due_sleep_commits_a_sleep_memo_and_the_function_continues(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        await ctx.step.sleep("nap", "2s")
        return await ctx.step.run("after", lambda: "awake")

    run = Run(f)
    await run.advance()
    run.clock.now = T0 + 2 * SECOND

    assert output(await run.advance()) == "awake"
    nap, after = run.effects.commits
    assert (nap.id, nap.hash, nap.kind, nap.status) == (
        "nap",
        step_hash("nap"),
        StepKind.SLEEP,
        StepStatus.COMPLETED,
    )
    assert (nap.started_at, nap.ended_at) == (T0, T0 + 2 * SECOND)
    assert after.id == "after"


async def test_a_slept_step_is_not_slept_again_on_replay(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        await ctx.step.sleep("nap", "1h")
        return await ctx.step.run("after", lambda: "awake")

    run = Run(f)
    assert output(await run.finish()) == "awake"
    replay = Run(f, {m.hash: m for m in run.effects.commits if m.kind is StepKind.SLEEP})

    assert output(await replay.advance()) == "awake"


@pytest.mark.parametrize("duration", ["2s", "2000ms", 2, 2.0, dt.timedelta(seconds=2)])
async def test_sleep_accepts_strings_seconds_and_timedeltas(app: App, duration: Any) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> None:
        await ctx.step.sleep("nap", duration)

    outcome = await Run(f).advance()

    assert isinstance(outcome, Suspended)
    assert [p.until for p in outcome.pending] == [T0 + 2 * SECOND]


@pytest.mark.parametrize(
    "when",
    [
        from_ms(T0 + 5 * SECOND),
        from_ms(T0 + 5 * SECOND).astimezone(dt.timezone(dt.timedelta(hours=2))),
        from_ms(T0 + 5 * SECOND).isoformat(),
        from_ms(T0 + 5 * SECOND).isoformat().replace("+00:00", "Z"),
    ],
    ids=["utc-datetime", "offset-datetime", "iso-string", "iso-string-z"],
)
async def test_sleep_until_accepts_aware_datetimes_and_iso_strings(app: App, when: Any) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> None:
        await ctx.step.sleep_until("wake", when)

    outcome = await Run(f).advance()

    assert isinstance(outcome, Suspended)
    assert [p.until for p in outcome.pending] == [T0 + 5 * SECOND]


async def test_sleep_until_a_time_between_two_milliseconds_wakes_at_the_later_one(app: App) -> None:
    when = from_ms(T0 + 5 * SECOND) + dt.timedelta(microseconds=500)

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> None:
        await ctx.step.sleep_until("wake", when)

    run = Run(f)
    outcome = await run.advance()

    assert isinstance(outcome, Suspended)
    assert [p.until for p in outcome.pending] == [T0 + 5 * SECOND + 1]


@pytest.mark.parametrize(
    "sleep",
    [
        lambda ctx: ctx.step.sleep_until("wake", from_ms(T0 - SECOND)),
        lambda ctx: ctx.step.sleep_until("wake", from_ms(T0)),
        lambda ctx: ctx.step.sleep("wake", 0),
    ],
    ids=["past", "now", "zero"],
)
async def test_a_sleep_already_due_does_not_suspend(
    app: App, sleep: Callable[[Context], Awaitable[None]]
) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        await sleep(ctx)
        return "done"

    run = Run(f)

    assert output(await run.advance()) == "done"
    assert run.committed == ["wake"]


async def test_parallel_sleeps_suspend_together_and_each_wakes_at_its_own_time(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        await asyncio.gather(ctx.step.sleep("short", "1s"), ctx.step.sleep("long", "3s"))
        return "both"

    run = Run(f)

    assert output(await run.finish()) == "both"
    first, second, _ = run.outcomes
    assert isinstance(first, Suspended)
    assert isinstance(second, Suspended)
    assert sorted(p.until for p in first.pending) == [T0 + SECOND, T0 + 3 * SECOND]
    assert [p.step_id for p in second.pending] == ["long"]
    assert run.committed == ["short", "long"]


async def test_except_exception_around_a_sleep_does_not_swallow_the_suspension(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> str:
        try:
            await ctx.step.sleep("nap", "1h")
        except Exception:
            return "swallowed"
        return "slept"

    run = Run(f)

    assert isinstance(await run.advance(), Suspended)
    assert output(await run.finish()) == "slept"


# --- rule 4: step retries ----------------------------------------------------------------------


async def test_a_failing_step_is_retried_at_its_backoff_times_until_it_succeeds(app: App) -> None:
    flaky = failing(2, lambda: ConnectionError("reset"), then="paid")

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> Any:
        return await ctx.step.run("charge", flaky)

    run = Run(f)

    assert output(await run.finish()) == "paid"
    first, second, _ = run.outcomes
    key = step_hash("charge")
    assert isinstance(first, Suspended)
    assert isinstance(second, Suspended)
    [retry1], [retry2] = first.pending, second.pending
    assert (retry1.kind, retry1.key, retry1.step_id) == (PendingKind.STEP_RETRY, key, "charge")
    assert (retry1.until, retry1.attempt) == (T0 + SECOND, 1)
    assert (retry2.until, retry2.attempt) == (T0 + SECOND + 2 * SECOND, 2)
    assert retry1.error is not None
    assert (retry1.error.type, retry1.error.message) == ("ConnectionError", "reset")
    assert (first.step_failures, second.step_failures) == ({key: 1}, {key: 2})
    [memo] = run.effects.commits
    assert (memo.status, memo.attempts, memo.started_at) == (StepStatus.COMPLETED, 3, T0 + 3 * SECOND)


async def test_a_retry_message_that_arrives_early_suspends_again_without_running_the_step(app: App) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("reset")

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> Any:
        return await ctx.step.run("charge", flaky)

    run = Run(f)
    first = await run.advance()
    run.clock.now = T0 + SECOND - 1

    second = await run.advance()

    assert isinstance(second, Suspended)
    assert second.pending == first.pending
    assert calls == 1


async def test_a_step_retry_only_reruns_that_step(app: App) -> None:
    calls = Calls()
    flaky = failing(1, lambda: TimeoutError("slow"), then="b")

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> list[Any]:
        return [await ctx.step.run("a", calls.handler("a", "a")), await ctx.step.run("b", flaky)]

    assert output(await Run(f).finish()) == ["a", "b"]
    assert calls.counts == {"a": 1}


async def test_a_non_retriable_error_fails_the_step_at_once_and_uncaught_fails_the_run(app: App) -> None:
    calls = 0

    async def charge() -> None:
        nonlocal calls
        calls += 1
        raise NonRetriableError("card declined")

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> None:
        await ctx.step.run("charge", charge)

    run = Run(f)

    outcome = await run.finish()

    assert isinstance(outcome, Failed)
    assert len(run.outcomes) == 1
    assert calls == 1
    assert outcome.error.type == "StepError"
    assert "charge" in outcome.error.message
    assert "card declined" in outcome.error.message
    [memo] = run.effects.commits
    assert (memo.status, memo.attempts) == (StepStatus.FAILED, 1)
    assert memo.error is not None
    assert (memo.error.type, memo.error.message, memo.error.retriable) == (
        "NonRetriableError",
        "card declined",
        False,
    )


async def test_a_non_retriable_step_error_is_catchable_in_the_function(app: App) -> None:
    declined = failing(1, lambda: NonRetriableError("card declined"))

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> dict[str, str]:
        try:
            await ctx.step.run("charge", declined)
        except StepError as exc:
            return {"step": exc.step_id, "type": exc.error_type, "message": exc.error_message}
        return {}

    outcome = await Run(f).advance()

    assert output(outcome) == {"step": "charge", "type": "NonRetriableError", "message": "card declined"}


async def test_an_exhausted_step_raises_a_step_error_the_function_can_catch_and_complete(app: App) -> None:
    down = failing(99, lambda: ConnectionError("down"))

    @app.function("f", trigger="t/e", retries=Retry(retries=2, backoff=("1s",)))
    async def f(ctx: Context) -> str:
        try:
            return await ctx.step.run("charge", down)
        except StepError as exc:
            note = f"queued after {exc.error_type}"
        return await ctx.step.run("fallback", lambda: note)

    run = Run(f)

    assert output(await run.finish()) == "queued after ConnectionError"
    assert len(run.outcomes) == 3
    charge, fallback = run.effects.commits
    assert (charge.status, charge.attempts) == (StepStatus.FAILED, 3)
    assert fallback.status is StepStatus.COMPLETED


async def test_a_step_can_set_its_own_retries(app: App) -> None:
    flaky = failing(1, lambda: ConnectionError("down"))

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> None:
        await ctx.step.run("once", flaky, retries=0)

    run = Run(f)

    assert isinstance(await run.finish(), Failed)
    assert len(run.outcomes) == 1


async def test_retry_after_error_sets_the_delay_instead_of_the_backoff_table(app: App) -> None:
    rate_limited = failing(1, lambda: RetryAfterError("rate limited", "5s"))

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> Any:
        return await ctx.step.run("call-api", rate_limited)

    run = Run(f)

    assert output(await run.finish()) == "ok"
    first = run.outcomes[0]
    assert isinstance(first, Suspended)
    assert [(p.kind, p.until) for p in first.pending] == [(PendingKind.STEP_RETRY, T0 + 5 * SECOND)]


async def test_retry_after_error_with_a_datetime_retries_at_that_time(app: App) -> None:
    at = from_ms(T0 + 90 * SECOND)

    later = failing(1, lambda: RetryAfterError("later", at))

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> Any:
        return await ctx.step.run("call-api", later)

    outcome = await Run(f).advance()

    assert isinstance(outcome, Suspended)
    assert [p.until for p in outcome.pending] == [T0 + 90 * SECOND]


# --- rule 5: errors outside steps retry the function ------------------------------------------


async def test_an_error_outside_steps_suspends_with_a_run_retry_and_the_next_attempt_keeps_the_steps(
    app: App,
) -> None:
    calls = Calls()

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> dict[str, Any]:
        a = await ctx.step.run("a", calls.handler("a", "a"))
        if ctx.attempt == 0:
            raise ValueError("flaky body")
        return {"a": a, "attempt": ctx.attempt}

    run = Run(f)

    assert output(await run.finish()) == {"a": "a", "attempt": 1}
    first = run.outcomes[0]
    assert isinstance(first, Suspended)
    assert first.attempt == 1
    [retry] = first.pending
    assert (retry.kind, retry.key, retry.until, retry.attempt) == (
        PendingKind.RUN_RETRY,
        "run",
        T0 + SECOND,
        1,
    )
    assert retry.error is not None
    assert (retry.error.type, retry.error.message) == ("ValueError", "flaky body")
    assert calls.counts == {"a": 1}


async def test_when_the_function_attempts_are_spent_the_run_fails(app: App) -> None:
    @app.function("f", trigger="t/e", retries=Retry(retries=2, backoff=("1s", "2s")))
    async def f(ctx: Context) -> None:
        raise ValueError(f"attempt {ctx.attempt}")

    run = Run(f)

    outcome = await run.finish()

    assert isinstance(outcome, Failed)
    assert (outcome.error.type, outcome.error.message, outcome.error.retriable) == (
        "ValueError",
        "attempt 2",
        False,
    )
    assert [o.attempt for o in run.outcomes if isinstance(o, Suspended)] == [1, 2]
    assert [p.until for o in run.outcomes if isinstance(o, Suspended) for p in o.pending] == [
        T0 + SECOND,
        T0 + SECOND + 2 * SECOND,
    ]


async def test_a_function_retry_woken_early_waits_out_its_backoff_instead_of_running_again(app: App) -> None:
    """A retry's old schedule can fire after the next attempt has started its own backoff (both
    are keyed "run"): that wake must not start an attempt before the new backoff has passed."""
    attempts: list[int] = []

    @app.function("f", trigger="t/e", retries=Retry(retries=3, backoff=("3s", "6s", "12s")))
    async def f(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ValueError(f"attempt {ctx.attempt}")

    run = Run(f)
    await run.advance()
    run.clock.now = T0 + 3 * SECOND  # the first backoff is over: attempt 1
    second = await run.advance()
    assert isinstance(second, Suspended)
    [retry] = second.pending
    assert retry.until == T0 + 9 * SECOND

    run.clock.now = T0 + 3 * SECOND + 260  # the first backoff's schedule fires late, now
    early = await run.advance()

    assert isinstance(early, Suspended)
    assert early.pending == second.pending  # still waiting for T0 + 9 s, not rerun now
    assert early.attempt == 2
    assert attempts == [0, 1]
    run.clock.now = T0 + 9 * SECOND
    await run.advance()
    assert attempts == [0, 1, 2]


async def test_a_function_without_retries_fails_on_its_first_error(app: App) -> None:
    @app.function("f", trigger="t/e", retries=0)
    async def f(ctx: Context) -> None:
        raise ValueError("boom")

    outcome = await Run(f).advance()

    assert isinstance(outcome, Failed)
    assert "boom" in outcome.error.message
    assert "Traceback" in outcome.error.traceback


@pytest.mark.parametrize(
    "error", [NonRetriableError("stop"), SystemExit(2), KeyboardInterrupt()], ids=lambda e: type(e).__name__
)
async def test_a_non_retriable_or_non_exception_error_in_the_function_fails_the_run_at_once(
    app: App, error: BaseException
) -> None:
    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> None:
        raise error

    outcome = await Run(f).advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == type(error).__name__
    assert outcome.error.retriable is False


# --- bad values and bad exceptions -------------------------------------------------------------


class Socket:
    """Something a step might return by mistake: a live resource, not data."""


def cyclic() -> list[Any]:
    items: list[Any] = []
    items.append(items)
    return items


@pytest.mark.parametrize(
    "value",
    [object(), Socket(), {(1, 2): "tuple key"}, cyclic()],
    ids=["object", "socket", "tuple-key", "cycle"],
)
async def test_an_unserializable_step_output_fails_the_step_without_retries_naming_it(
    app: App, value: Any
) -> None:
    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> None:
        await ctx.step.run("open-socket", lambda: value)

    run = Run(f)

    outcome = await run.finish()

    assert isinstance(outcome, Failed)
    assert len(run.outcomes) == 1
    assert "open-socket" in outcome.error.message
    [memo] = run.effects.commits
    assert memo.status is StepStatus.FAILED
    assert memo.error is not None
    assert memo.error.type == "SerializationError"
    assert memo.error.retriable is False
    assert "step 'open-socket'" in memo.error.message


@pytest.mark.parametrize("value", [object(), Socket(), cyclic()], ids=["object", "socket", "cycle"])
async def test_an_unserializable_function_result_fails_the_run(app: App, value: Any) -> None:
    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> Any:
        return value

    outcome = await Run(f).advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == "SerializationError"
    assert "the function" in outcome.error.message


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt])
async def test_a_handler_raising_system_exit_fails_its_step_non_retriably(
    app: App, sync: bool, error: type[BaseException]
) -> None:
    def exits_sync() -> None:
        raise error("bye")

    async def exits_async() -> None:
        raise error("bye")

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> None:
        await ctx.step.run("exit", exits_sync if sync else exits_async)

    run = Run(f)

    outcome = await run.finish()

    assert isinstance(outcome, Failed)
    assert len(run.outcomes) == 1
    [memo] = run.effects.commits
    assert memo.error is not None
    assert (memo.status, memo.error.type, memo.error.retriable) == (StepStatus.FAILED, error.__name__, False)


class Cryptic(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


async def test_a_step_error_whose_str_raises_is_recorded_with_a_placeholder_message(app: App) -> None:
    cryptic = failing(1, Cryptic)

    @app.function("f", trigger="t/e", retries=0)
    async def f(ctx: Context) -> None:
        await ctx.step.run("cryptic", cryptic)

    run = Run(f)

    assert isinstance(await run.finish(), Failed)
    [memo] = run.effects.commits
    assert memo.error is not None
    assert memo.error.type == "Cryptic"
    assert memo.error.message == "<str() of Cryptic raised RuntimeError>"


async def test_a_function_error_whose_str_raises_is_recorded_with_a_placeholder_message(app: App) -> None:
    @app.function("f", trigger="t/e", retries=0)
    async def f(ctx: Context) -> None:
        raise Cryptic

    outcome = await Run(f).advance()

    assert isinstance(outcome, Failed)
    assert (outcome.error.type, outcome.error.message) == (
        "Cryptic",
        "<str() of Cryptic raised RuntimeError>",
    )


async def test_a_step_called_inside_another_steps_handler_fails_the_run_naming_both(app: App) -> None:
    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> None:
        async def outer() -> Any:
            return await ctx.step.run("inner", lambda: 1)

        await ctx.step.run("outer", outer)

    run = Run(f)

    outcome = await run.finish()

    assert isinstance(outcome, Failed)
    assert len(run.outcomes) == 1
    assert "'inner'" in outcome.error.message
    assert "'outer'" in outcome.error.message
    [memo] = run.effects.commits
    assert memo.error is not None
    assert (memo.id, memo.error.type) == ("outer", "NestedStepError")


async def test_a_sleep_memo_under_a_step_run_id_fails_the_run_with_non_determinism_error(app: App) -> None:
    key = step_hash("charge")
    slept = StepMemo(
        id="charge", hash=key, kind=StepKind.SLEEP, status=StepStatus.COMPLETED, started_at=T0, ended_at=T0
    )

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> Any:
        return await ctx.step.run("charge", lambda: "charged")

    outcome = await Run(f, {key: slept}).advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == "NonDeterminismError"
    assert "charge" in outcome.error.message


async def test_a_run_memo_under_a_sleep_id_fails_the_run_with_non_determinism_error(app: App) -> None:
    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: Context) -> None:
        await ctx.step.sleep("wait", "1h")

    outcome = await Run(f, dict([completed("wait", "ran")])).advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == "NonDeterminismError"


# --- the replay-aware logger -------------------------------------------------------------------


async def test_the_function_logger_is_silent_while_memoized_steps_replay_and_logs_past_them(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> None:
        ctx.logger.info("starting")
        await ctx.step.run("a", lambda: 1)
        ctx.logger.info("a done")

        async def b() -> int:
            ctx.logger.info("inside b")
            return 2

        await ctx.step.run("b", b)
        ctx.logger.info("b done")

    with capture_logs() as logs:
        await Run(f, dict([completed("a", 1)])).advance()

    # past every memo: "a done" comes after what an earlier pass reached (it crashed there)
    assert [entry["event"] for entry in logs] == ["a done", "inside b", "b done"]
    assert logs[1]["step"] == "b"
    assert all(entry["run_id"] == "run-1" and entry["function"] == "t-f" for entry in logs)


async def test_each_line_is_logged_once_across_passes_of_retries_and_sleeps(app: App) -> None:
    calls = [0]

    @app.function("f", trigger="t/e", retries=Retry(retries=1, backoff=("1s",)))
    async def f(ctx: Context) -> None:
        ctx.logger.info("starting")
        await ctx.step.run("a", lambda: 1)
        ctx.logger.info("a done")

        async def b() -> int:
            calls[0] += 1
            ctx.logger.info("inside b", call=calls[0])
            if calls[0] == 1:
                raise ConnectionError("flaky")
            return 2

        await ctx.step.run("b", b)
        ctx.logger.info("b done")
        await ctx.step.sleep("nap", "1s")
        ctx.logger.info("awake")  # first reached in the pass after the sleep

    run = Run(f)
    with capture_logs() as logs:
        await run.finish()

    assert [entry["event"] for entry in logs] == [
        "starting",
        "a done",
        "inside b",
        "inside b",
        "b done",
        "awake",
    ]


async def test_the_function_logger_logs_everything_on_a_fresh_run(app: App) -> None:
    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> None:
        ctx.logger.info("starting")
        await ctx.step.run("a", lambda: 1)
        ctx.logger.warning("a done")

    with capture_logs() as logs:
        await Run(f).advance()

    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("starting", "info"),
        ("a done", "warning"),
    ]


# --- rule 6: execute never raises for anything the user's code does ----------------------------


async def _raise_value_error(ctx: Context) -> None:
    raise ValueError("boom")


async def _raise_system_exit(ctx: Context) -> None:
    raise SystemExit(1)


async def _raise_keyboard_interrupt(ctx: Context) -> None:
    raise KeyboardInterrupt


async def _raise_cancelled(ctx: Context) -> None:
    raise asyncio.CancelledError


async def _cancel_itself(ctx: Context) -> None:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)


async def _raise_cryptic(ctx: Context) -> None:
    raise Cryptic


async def _return_object(ctx: Context) -> object:
    return object()


async def _return_cycle(ctx: Context) -> object:
    return cyclic()


async def _empty_step_id(ctx: Context) -> None:
    await ctx.step.run("", lambda: 1)


async def _int_step_id(ctx: Context) -> None:
    await ctx.step.run(42, lambda: 1)  # type: ignore[arg-type]


async def _long_step_id(ctx: Context) -> None:
    await ctx.step.run("x" * 300, lambda: 1)


async def _bad_step_retries(ctx: Context) -> None:
    await ctx.step.run("a", lambda: 1, retries=99)


async def _not_callable_handler(ctx: Context) -> None:
    await ctx.step.run("a", 42)  # type: ignore[arg-type]


async def _unserializable_step(ctx: Context) -> None:
    await ctx.step.run("a", object)


async def _cryptic_step(ctx: Context) -> None:
    async def cryptic() -> None:
        raise Cryptic

    await ctx.step.run("a", cryptic)


async def _nested_step(ctx: Context) -> None:
    async def outer() -> Any:
        return await ctx.step.run("inner", lambda: 1)

    await ctx.step.run("outer", outer)


async def _bad_duration(ctx: Context) -> None:
    await ctx.step.sleep("nap", "soon")


async def _negative_duration(ctx: Context) -> None:
    await ctx.step.sleep("nap", -1)


async def _naive_datetime(ctx: Context) -> None:
    await ctx.step.sleep_until("nap", dt.datetime(2030, 1, 1))  # naive: the mistake under test


async def _bad_iso_string(ctx: Context) -> None:
    await ctx.step.sleep_until("nap", "tomorrow")


async def _one_id_for_two_kinds(ctx: Context) -> None:
    await ctx.step.run("a", lambda: 1)
    await ctx.step.sleep("a", "1s")  # the id's second use: its own hash, so no conflict


async def _gather_with_failure(ctx: Context) -> None:
    await asyncio.gather(ctx.step.run("a", lambda: 1), _raise_value_error(ctx))


BAD_FUNCTIONS = [
    _raise_value_error,
    _raise_system_exit,
    _raise_keyboard_interrupt,
    _raise_cancelled,
    _cancel_itself,
    _raise_cryptic,
    _return_object,
    _return_cycle,
    _empty_step_id,
    _int_step_id,
    _long_step_id,
    _bad_step_retries,
    _not_callable_handler,
    _unserializable_step,
    _cryptic_step,
    _nested_step,
    _bad_duration,
    _negative_duration,
    _naive_datetime,
    _bad_iso_string,
    _one_id_for_two_kinds,
    _gather_with_failure,
]


@pytest.mark.parametrize("body", BAD_FUNCTIONS, ids=lambda fn: fn.__name__.lstrip("_"))
async def test_execute_returns_an_outcome_whatever_the_function_does(
    app: App, body: Callable[[Context], Awaitable[Any]]
) -> None:
    fn = app.function("f", trigger="t/e", retries=1)(body)
    run = Run(fn)

    outcome = await run.advance()

    assert isinstance(outcome, Completed | Failed | Suspended)
    assert isinstance(await run.finish(), Completed | Failed)


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        (_empty_step_id, "ConfigError"),
        (_int_step_id, "ConfigError"),
        (_long_step_id, "ConfigError"),
        (_bad_step_retries, "ConfigError"),
        (_bad_duration, "DurationError"),
        (_negative_duration, "DurationError"),
        (_naive_datetime, "DurationError"),
        (_bad_iso_string, "DurationError"),
    ],
    ids=lambda v: v.__name__.lstrip("_") if callable(v) else v,
)
async def test_a_misused_step_api_fails_the_run_at_once(
    app: App, body: Callable[[Context], Awaitable[Any]], error_type: str
) -> None:
    fn = app.function("f", trigger="t/e", retries=FAST)(body)

    outcome = await Run(fn).advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == error_type


# --- rule 2: a pass is O(steps) ----------------------------------------------------------------


async def test_a_long_replay_runs_only_the_one_new_step(app: App) -> None:
    calls = Calls()

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> int:
        for i in range(200):
            await ctx.step.run(f"step-{i}", calls.handler(f"step-{i}", i))
        return 200

    memos = dict(completed(f"step-{i}", i) for i in range(199))
    run = Run(f, memos)

    assert output(await run.advance()) == 200
    assert calls.counts == {"step-199": 1}
    assert run.committed == ["step-199"]


async def test_a_fresh_run_of_many_steps_commits_each_once_in_one_pass(app: App) -> None:
    calls = Calls()

    @app.function("f", trigger="t/e")
    async def f(ctx: Context) -> int:
        total = 0
        for i in range(200):
            total += await ctx.step.run("add", calls.handler("add", i))
        return total

    run = Run(f)

    assert output(await run.advance()) == sum(range(200))
    assert calls.counts == {"add": 200}
    assert len(run.effects.commits) == 200
    assert len({m.hash for m in run.effects.commits}) == 200
