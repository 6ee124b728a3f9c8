"""Attempt history (`meshflow.attempts`): every attempt of a step, kept through its retries into
its memo, and the function's own attempts; bounded."""

from __future__ import annotations

import msgspec

import meshflow
from meshflow.attempts import FULL_TRACEBACKS, MAX_ATTEMPTS, kept
from meshflow.replay import Completed, Failed, Suspended
from meshflow.runs import Attempt, ErrorInfo, StepStatus
from meshflow.testing import EPOCH_MS, EngineRun

FAST = meshflow.Retry(retries=3, backoff=("1s",))


def flaky(fails: int) -> object:
    calls = [0]

    def step() -> str:
        calls[0] += 1
        if calls[0] <= fails:
            raise ValueError(f"attempt {calls[0]} failed")
        return "ok"

    return step


async def test_a_step_that_failed_twice_keeps_both_errors_and_its_success_in_its_memo() -> None:
    app = meshflow.App("t")
    call = flaky(2)

    @app.function("f", trigger="t/e", retries=FAST)
    async def f(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("call", call))

    run = EngineRun(f)
    first = await run.advance()
    assert isinstance(first, Suspended)
    [tried] = first.step_history.values()  # readable while the step waits for its retry
    assert [(a.attempt, a.error.message if a.error else None) for a in tried] == [(1, "attempt 1 failed")]
    outcome = await run.finish()

    assert isinstance(outcome, Completed)
    [memo] = run.effects.memos.values()
    assert [(a.attempt, a.error.type if a.error else None) for a in memo.history] == [
        (1, "ValueError"),
        (2, "ValueError"),
        (3, None),
    ]
    assert [a.started_at for a in memo.history] == [EPOCH_MS, EPOCH_MS + 1000, EPOCH_MS + 2000]
    assert all(a.ended_at is not None for a in memo.history)
    assert "Traceback" in (memo.history[0].error.traceback if memo.history[0].error else "")


async def test_a_step_that_fails_for_good_keeps_every_attempt_and_one_that_never_failed_keeps_none() -> None:
    app = meshflow.App("t")
    broken = flaky(99)

    @app.function("f", trigger="t/e", retries=meshflow.Retry(retries=1, backoff=("1s",)))
    async def f(ctx: meshflow.Context) -> str:
        await ctx.step.run("fine", lambda: 1)
        return str(await ctx.step.run("broken", broken))

    run = EngineRun(f)
    assert isinstance(await run.finish(), Failed)
    memos = {m.id: m for m in run.effects.memos.values()}
    assert memos["broken"].status is StepStatus.FAILED
    assert [a.attempt for a in memos["broken"].history] == [1, 2]
    assert memos["fine"].history == []  # its one attempt is the memo's own started/ended/worker


async def test_function_retries_are_recorded_on_the_run() -> None:
    app = meshflow.App("t")
    calls = [0]

    @app.function("f", trigger="t/e", retries=meshflow.Retry(retries=2, backoff=("1s",)))
    async def f(ctx: meshflow.Context) -> None:
        calls[0] += 1
        raise RuntimeError(f"body {calls[0]}")

    run = EngineRun(f)
    first = await run.advance()
    assert isinstance(first, Suspended)
    assert [a.error.message for a in first.history if a.error] == ["body 1"]
    outcome = await run.finish()
    assert isinstance(outcome, Failed)
    assert [a.error.message for a in outcome.history if a.error] == ["body 1", "body 2", "body 3"]


def test_a_step_keeps_its_last_50_attempts_and_the_last_5_tracebacks() -> None:
    error = ErrorInfo(type="E", message="m" * 2000, traceback="t" * 1000)
    many = [Attempt(attempt=n, started_at=n, ended_at=n, error=error) for n in range(1, 61)]
    out = kept(many)
    assert len(out) == MAX_ATTEMPTS
    assert [a.attempt for a in out] == list(range(11, 61))
    assert all(
        a.error and a.error.traceback == "" and len(a.error.message) <= 513 for a in out[:-FULL_TRACEBACKS]
    )
    assert all(a.error == error for a in out[-FULL_TRACEBACKS:])
    assert len(msgspec.json.encode(out)) < 64 * 1024  # room in a record for it
