"""The test kit shipped in `meshflow.testing`: users drive a function through the engine with it."""

from __future__ import annotations

import msgspec
import pytest

import meshflow
from meshflow.replay import Completed
from meshflow.testing import EPOCH_MS, EngineRun, FakeClock, wait_until

DAY_MS = 86_400_000


async def test_a_function_that_sleeps_three_days_finishes_at_once_with_the_clock_moved_on() -> None:
    app = meshflow.App("kit")

    @app.function("signup", trigger="user/signup")
    async def signup(ctx: meshflow.Context) -> dict[str, str]:
        account = await ctx.step.run("create-account", lambda: {"id": "acc-1"})
        await ctx.step.sleep("wait-for-onboarding", "3 days")
        await ctx.step.run("send-onboarding", lambda: None)
        return {"account": account["id"]}

    run = EngineRun(signup, event=meshflow.Event(name="user/signup", data={"email": "a@b.c"}))
    outcome = await run.finish()

    assert isinstance(outcome, Completed)
    assert msgspec.json.decode(outcome.output) == {"account": "acc-1"}
    assert run.committed == ["create-account", "wait-for-onboarding", "send-onboarding"]
    assert run.clock.now == EPOCH_MS + 3 * DAY_MS


async def test_the_memory_store_keeps_the_first_commit_of_a_step() -> None:
    app = meshflow.App("kit")

    @app.function("once", trigger="t/e")
    async def once(ctx: meshflow.Context) -> int:
        return int(await ctx.step.run("pick", lambda: 1))

    first = EngineRun(once)
    await first.finish()
    again = EngineRun(once, first.effects.memos, clock=FakeClock(EPOCH_MS + 1))
    assert isinstance(await again.finish(), Completed)
    assert again.committed == []  # replayed from the memo, nothing executed or committed


async def test_wait_until_names_the_condition_and_its_last_value_when_it_times_out() -> None:
    with pytest.raises(TimeoutError, match=r"the answer not met within 0.05s \(last value: 0\)"):
        await wait_until(lambda: 0, timeout=0.05, message="the answer")
