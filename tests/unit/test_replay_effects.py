"""When committing a step (or sending events) fails, the pass is abandoned — the function has not
failed: no retry is spent and user code cannot catch it; the run resumes from its last commit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

import meshflow
from meshflow import replay
from meshflow.errors import NatsError
from meshflow.events import Event
from meshflow.runs import StepMemo


class Flaky:
    """Effects whose writes fail (NATS has no leader right now)."""

    def __init__(self) -> None:
        self.attempted: list[str] = []

    async def commit(self, memo: StepMemo) -> StepMemo:
        self.attempted.append(memo.id)
        raise NatsError("cannot write step: 503 no leader")

    async def send(self, events: Sequence[Event], msg_ids: Sequence[str]) -> None:
        raise NatsError("cannot publish: 503 no leader")


def activation(fn: meshflow.Function) -> replay.Activation:
    return replay.Activation(function=fn, run_id="run-1", events=[Event(name="t/go")], created_at=1)


async def test_a_failed_commit_raises_out_of_the_pass_not_into_the_function() -> None:
    app = meshflow.App("t")
    caught: list[BaseException] = []

    @app.function("f", trigger="t/go", retries=0)
    async def f(ctx: meshflow.Context) -> str:
        try:
            await ctx.step.run("charge", lambda: "charged")
        except Exception as exc:  # a user's catch-all must not see the infrastructure failing
            caught.append(exc)
        return "done"

    effects = Flaky()
    with pytest.raises(NatsError, match="503"):
        await replay.execute(activation(f), effects)
    assert effects.attempted == ["charge"]
    assert caught == []


async def test_a_failed_send_raises_out_of_the_pass_too() -> None:
    app = meshflow.App("t")

    @app.function("f", trigger="t/go", retries=0)
    async def f(ctx: meshflow.Context) -> None:
        await ctx.step.send_event("tell", Event(name="t/told"))

    with pytest.raises(NatsError):
        await replay.execute(activation(f), Flaky())
