"""Step inputs: the arguments of a ``step.run``, kept on its memo (and on its pending retry) as
JSON, bounded, and never in the way of the step (`meshflow.codec.encode_input`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgspec
import pytest

import meshflow
from meshflow import replay
from meshflow.codec import INPUT_NO_ROOM, MAX_INPUT, NO_INPUT, encode_input, input_beside
from meshflow.events import Event
from meshflow.replay import Completed, Suspended
from meshflow.runs import Pending, PendingKind, RunStatus, new_run
from meshflow.settle import TRIGGER, PassFacts, settle
from meshflow.testing import EngineRun

FAST = meshflow.Retry(retries=2, backoff=("1s",))


@dataclasses.dataclass
class Order:
    id: str
    qty: int


class Broken(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class Model:
    """Looks like a pydantic model whose ``model_dump`` fails."""

    def model_dump(self, mode: str) -> Any:
        raise Broken


def decoded(raw: msgspec.Raw) -> Any:
    return json.loads(bytes(raw))


# --- bounding ------------------------------------------------------------------------------------


def test_arguments_are_kept_as_a_json_list_and_no_arguments_as_null() -> None:
    assert decoded(encode_input(("a", 1, {"k": [True, None]}, Order("o1", 2)))) == [
        "a",
        1,
        {"k": [True, None]},
        {"id": "o1", "qty": 2},
    ]
    assert encode_input(()) == NO_INPUT
    assert decoded(NO_INPUT) is None


@pytest.mark.parametrize(
    ("arg", "marker"),
    [
        (object(), "<not JSON: TypeError: cannot encode a value of type builtins.object>"),
        (Model(), "<not JSON: Broken>"),  # a model_dump that raises, with an exception str() cannot show
    ],
)
def test_arguments_that_are_not_json_are_a_marker_and_never_raise(arg: object, marker: str) -> None:
    assert decoded(encode_input(("fine", arg))) == marker


def test_a_cycle_is_a_marker_too() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    assert decoded(encode_input((cycle,))).startswith("<not JSON: RecursionError")


def test_arguments_over_64_kib_of_json_are_a_marker_with_their_size() -> None:
    at_limit = ("x" * (MAX_INPUT - 4),)  # ["…"] is 4 bytes more
    assert len(encode_input(at_limit)) == MAX_INPUT
    assert decoded(encode_input(at_limit)) == list(at_limit)
    over = ("x" * 70_000,)
    assert decoded(encode_input(over)) == "<not stored: 70,004 bytes of JSON, over the 64 KiB limit>"


def test_an_input_with_no_room_beside_the_output_is_a_marker() -> None:
    given = encode_input(("x" * 100,))
    assert input_beside(given, None, 10**9) is given
    assert input_beside(given, 200, 96) is given  # 104 + 96 = 200: fits
    assert decoded(input_beside(given, 200, 97)) == (
        "<not stored: 104 bytes of JSON, no room beside the step's result>"
    )


# --- in the engine -------------------------------------------------------------------------------


def one_step_function(handler: Any, *args: Any, retries: meshflow.Retry | None = None) -> meshflow.Function:
    app = meshflow.App("t")

    @app.function("f", trigger="t/e", retries=retries or FAST)
    async def f(ctx: meshflow.Context) -> Any:
        return await ctx.step.run("work", handler, *args)

    return f


async def test_a_step_memo_keeps_the_arguments_it_was_given_before_its_handler_changed_them() -> None:
    def handler(items: list[int], order: Order) -> int:
        items.append(99)  # what the step was given is what was passed, not what became of it
        return len(items)

    run = EngineRun(one_step_function(handler, [1, 2], Order("o1", 3)))
    assert isinstance(await run.finish(), Completed)
    [memo] = run.effects.memos.values()
    assert decoded(memo.input) == [[1, 2], {"id": "o1", "qty": 3}]


async def test_a_step_with_an_argument_that_is_not_json_runs_and_returns_all_the_same() -> None:
    run = EngineRun(one_step_function(lambda thing: type(thing).__name__, object()))
    outcome = await run.finish()
    assert isinstance(outcome, Completed)
    assert decoded(outcome.output) == "object"
    [memo] = run.effects.memos.values()
    assert decoded(memo.input) == "<not JSON: TypeError: cannot encode a value of type builtins.object>"


async def test_a_retrying_step_keeps_its_input_on_its_pending_retry_and_then_on_its_memo() -> None:
    calls = [0]

    def flaky(n: int) -> int:
        calls[0] += 1
        if calls[0] == 1:
            raise ConnectionError("down")
        return n * 2

    run = EngineRun(one_step_function(flaky, 21))
    first = await run.advance()
    assert isinstance(first, Suspended)
    [retry] = first.pending
    assert retry.kind is PendingKind.STEP_RETRY
    assert retry.input == [21]
    assert isinstance(await run.finish(), Completed)
    [memo] = run.effects.memos.values()
    assert decoded(memo.input) == [21]


async def test_replaying_a_memoized_step_does_not_encode_its_arguments_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded: list[tuple[Any, ...]] = []

    def counting(args: tuple[Any, ...]) -> msgspec.Raw:
        encoded.append(args)
        return encode_input(args)

    monkeypatch.setattr(replay, "encode_input", counting)
    app = meshflow.App("t")

    @app.function("f", trigger="t/e")
    async def f(ctx: meshflow.Context) -> Any:
        first = await ctx.step.run("first", lambda n: n + 1, 1)
        await ctx.step.sleep("nap", "1h")
        return await ctx.step.run("second", lambda n: n + 1, first)

    run = EngineRun(f)
    assert isinstance(await run.finish(), Completed)
    assert encoded == [(1,), (2,)]  # the second pass replayed "first" without encoding it again
    assert [decoded(m.input) for m in run.effects.commits if m.id != "nap"] == [[1], [2]]


async def test_a_step_whose_output_fills_the_stored_value_keeps_a_marker_for_its_input() -> None:
    run = EngineRun(one_step_function(lambda s: s * 2, "x" * 400))
    activation = dataclasses.replace(run.activation(), max_value_bytes=1_000)
    outcome = await run.advance(activation)
    assert isinstance(outcome, Completed)
    [memo] = run.effects.memos.values()
    assert len(memo.output) == 802
    assert decoded(memo.input) == "<not stored: 404 bytes of JSON, no room beside the step's result>"


# --- in the run record ---------------------------------------------------------------------------


def test_a_record_too_large_with_its_retrying_steps_inputs_keeps_markers_instead_and_suspends() -> None:
    now = 1_800_000_000_000
    running = new_run("run-1", app="t", fn="f", events=[Event(name="t/e")], now=now, status=RunStatus.RUNNING)
    retries = [
        Pending(
            kind=PendingKind.STEP_RETRY,
            key=f"k{i}",
            step_id=f"s{i}",
            until=now + 1000,
            input=["x" * 40_000],
        )
        for i in range(3)
    ]
    outcome = Suspended(pending=retries, step_failures={}, attempt=0)
    facts = PassFacts(now=now, wake=TRIGGER, redelivered=False, max_record_bytes=100_000)

    settled = settle(one_step_function(len), running, running, outcome, facts)

    assert settled.record.status is RunStatus.RETRYING
    assert [p.input for p in settled.record.pending] == [INPUT_NO_ROOM] * 3
    assert INPUT_NO_ROOM == "<not stored: no room for it in the run's record>"
    assert [p.key for p in settled.arm] == ["k0", "k1", "k2"]
