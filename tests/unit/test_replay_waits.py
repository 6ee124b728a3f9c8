"""The replay engine's waiting steps (`meshflow.replay`), defended without a server.

``ctx.step.wait_for_event`` and ``wait_for_any`` suspend the run with a ``Pending(WAIT)`` that says
which events may end it (name, match token, condition, and the floor below which no event
counts); ``invoke`` suspends with a ``Pending(INVOKE)`` naming a deterministic child run;
``send_event`` publishes once under message ids derived from the run and step. Runs are driven
the way a worker drives them: an in-memory step store where the first commit of a hash wins, an
in-memory outbox, and a clock the test moves by hand. Nothing here sleeps for real.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

import meshflow
from meshflow import App, ConfigError, Context, Event, StepError, WaitFor
from meshflow.expressions import match_key
from meshflow.ids import is_ulid, step_hash
from meshflow.replay import Completed, Failed, Outcome, Suspended
from meshflow.runs import (
    NEVER,
    NULL,
    ErrorInfo,
    Pending,
    PendingKind,
    StepKind,
    StepMemo,
    StepStatus,
    WaitSpec,
    decode_memo,
    encode_record,
)
from meshflow.testing import EngineRun, FakeClock

T0 = 1_700_000_000_000  # where the fake clock starts, epoch ms
SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
CREATED = T0 - MINUTE  # when the run was created: a minute before the pass under test
SEQ = 42  # the trigger's sequence in the events stream
RETRIES = 3  # a misuse must fail at once, not after these

PAID = "shop/order.paid"
CANCELLED = "shop/order.cancelled"


# --- the world around the engine -------------------------------------------------------------


def trigger() -> Event:
    return Event(
        name="shop/order.placed",
        id="evt-trigger",
        data={"userId": "u-1", "orderId": 7, "customer": {"tier": "gold"}},
        ts=CREATED,
    )


@dataclasses.dataclass
class Run(EngineRun):
    """A run of these tests: triggered by ``trigger()`` from the events stream, a minute ago."""

    event: Event = dataclasses.field(default_factory=trigger)
    seq: int = SEQ
    created_at: int = CREATED


def output(outcome: Outcome) -> Any:
    assert isinstance(outcome, Completed), outcome
    return msgspec.json.decode(outcome.output)


def only_pending(outcome: Outcome) -> Pending:
    assert isinstance(outcome, Suspended), outcome
    [item] = outcome.pending
    return item


def stored(
    step_id: str,
    kind: StepKind,
    *,
    value: Any = None,
    error: ErrorInfo | None = None,
    seq: int = 0,
    n: int = 0,
) -> tuple[str, StepMemo]:
    """A committed memo of the `n`-th use of `step_id`, keyed as the store keys it."""
    key = step_hash(step_id, n)
    memo = StepMemo(
        id=step_id,
        hash=key,
        kind=kind,
        status=StepStatus.FAILED if error else StepStatus.COMPLETED,
        output=msgspec.Raw(msgspec.json.encode(value)),
        error=error,
        started_at=T0,
        ended_at=T0,
        seq=seq,
    )
    return key, memo


def took(step_id: str, event: Event, *, seq: int, n: int = 0) -> tuple[str, StepMemo]:
    """The memo of a wait that took `event`, stored at `seq` in the events stream."""
    return stored(step_id, StepKind.WAIT, value=event, seq=seq, n=n)


def paid(amount: int = 10) -> Event:
    return Event(name=PAID, id="evt-paid", data={"userId": "u-1", "amount": amount}, ts=T0)


@pytest.fixture
def app() -> App:
    return App("t")


# --- wait_for_event: what a new wait suspends with -------------------------------------------


async def test_a_new_wait_suspends_until_now_plus_timeout_accepting_events_after_the_trigger(
    app: App,
) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event(
            "payment", event=PAID, timeout="1h", match="data.userId", if_="async.data.amount > 0"
        )

    outcome = await Run(f).advance()

    item = only_pending(outcome)
    assert item == Pending(
        kind=PendingKind.WAIT,
        key=step_hash("payment"),
        step_id="payment",
        until=T0 + HOUR,
        since=T0,
        waits=[
            WaitSpec(
                event=PAID,
                match="data.userId",
                match_token=match_key("u-1"),
                if_="async.data.amount > 0",
                floor_seq=SEQ,
                floor_time=0,
            )
        ],
    )


async def test_a_wait_commits_nothing_and_sends_nothing_while_it_is_pending(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h")

    run = Run(f)

    await run.advance()

    assert run.effects.commits == []
    assert run.effects.sent == []


@pytest.mark.parametrize(
    ("created_at", "floor_time"),
    [(CREATED, CREATED), (0, T0)],
    ids=["from-creation", "no-creation-time-from-now"],
)
async def test_a_wait_in_a_run_not_triggered_from_the_stream_accepts_events_from_its_creation(
    app: App, created_at: int, floor_time: int
) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h")

    outcome = await Run(f, seq=0, created_at=created_at).advance()

    [spec] = only_pending(outcome).waits
    assert (spec.floor_seq, spec.floor_time) == (0, floor_time)


async def test_since_wait_accepts_only_events_sent_after_the_wait_began(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h", since="wait")

    outcome = await Run(f, clock=FakeClock(T0 + 5 * MINUTE)).advance()

    [spec] = only_pending(outcome).waits
    assert (spec.floor_seq, spec.floor_time) == (0, T0 + 5 * MINUTE)


@pytest.mark.parametrize("seq", [SEQ, 0], ids=["from-stream", "not-from-stream"])
async def test_lookback_accepts_events_up_to_that_long_before_the_run_was_created(app: App, seq: int) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h", lookback="1h")

    outcome = await Run(f, seq=seq).advance()

    [spec] = only_pending(outcome).waits
    assert (spec.floor_seq, spec.floor_time) == (0, CREATED - HOUR)


# --- never the same event twice ----------------------------------------------------------------


async def test_a_second_wait_for_the_same_event_starts_after_the_event_the_first_took(app: App) -> None:
    got: list[Event | None] = []

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        got.append(await ctx.step.wait_for_event("first", event=PAID, timeout="1h"))
        got.append(await ctx.step.wait_for_event("second", event=PAID, timeout="1h"))

    outcome = await Run(f, dict([took("first", paid(), seq=100)])).advance()

    assert got == [paid()]
    item = only_pending(outcome)
    assert item.step_id == "second"
    [spec] = item.waits
    assert (spec.floor_seq, spec.floor_time) == (100, 0)


async def test_a_repeated_wait_in_a_loop_never_takes_an_event_it_took_before(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        for _ in range(3):
            await ctx.step.wait_for_event("payment", event=PAID, timeout="1h")

    memos = dict([took("payment", paid(), seq=100), took("payment", paid(), seq=250, n=1)])

    outcome = await Run(f, memos).advance()

    item = only_pending(outcome)
    assert item.key == step_hash("payment", 2)
    assert item.waits[0].floor_seq == 250


async def test_a_taken_event_of_another_name_or_a_timeout_does_not_raise_the_floor(app: App) -> None:
    cancelled = Event(name=CANCELLED, id="evt-c", data={}, ts=T0)

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("cancel", event=CANCELLED, timeout="1h")
        await ctx.step.wait_for_event("late", event=PAID, timeout="1h")  # timed out: null, seq 0
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h")

    memos = dict([took("cancel", cancelled, seq=100), stored("late", StepKind.WAIT)])

    outcome = await Run(f, memos).advance()

    [spec] = only_pending(outcome).waits
    assert (spec.floor_seq, spec.floor_time) == (SEQ, 0)


# --- match tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "token"),
    [
        ("data.userId", match_key("u-1")),
        ("data.orderId", match_key(7)),
        ("data.customer.tier", match_key("gold")),
        ("data.customer", match_key({"tier": "gold"})),
        ("data.missing", None),
        ("data.userId.deeper", None),
    ],
)
async def test_the_match_token_is_the_match_key_of_the_triggers_value_or_none_when_it_has_none(
    app: App, path: str, token: str | None
) -> None:
    """Without a token nothing can match, so only the timeout can end the wait."""

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h", match=path)

    outcome = await Run(f).advance()

    [spec] = only_pending(outcome).waits
    assert (spec.match, spec.match_token) == (path, token)


# --- passes after the first ----------------------------------------------------------------------


async def test_a_wait_rerun_with_its_pending_keeps_its_deadline_and_floors(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h", since="wait")

    run = Run(f)
    first = only_pending(await run.advance())
    run.clock.now = T0 + 10 * MINUTE  # an unrelated message woke the run early

    again = only_pending(await run.advance())

    assert again == first
    assert (again.until, again.waits[0].floor_time) == (T0 + HOUR, T0)


async def test_a_wait_past_its_timeout_commits_a_null_memo_and_returns_none(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> dict[str, Any]:
        event = await ctx.step.wait_for_event("payment", event=PAID, timeout="1h")
        return {"timed_out": event is None}

    run = Run(f)
    await run.advance()
    run.clock.now = T0 + HOUR

    outcome = await run.advance()

    assert output(outcome) == {"timed_out": True}
    [memo] = run.effects.commits
    assert (memo.id, memo.hash, memo.kind, memo.status) == (
        "payment",
        step_hash("payment"),
        StepKind.WAIT,
        StepStatus.COMPLETED,
    )
    assert memo.output == NULL
    assert (memo.started_at, memo.ended_at, memo.seq) == (T0, T0 + HOUR, 0)


async def test_an_event_that_won_the_race_with_the_timeout_is_returned_instead_of_none(app: App) -> None:
    got: list[Event | None] = []

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        got.append(await ctx.step.wait_for_event("payment", event=PAID, timeout="1h"))

    run = Run(f)
    await run.advance()
    run.clock.now = T0 + HOUR
    stale = run.activation()  # read before the event's memo landed in the store
    key, memo = took("payment", paid(), seq=100)
    run.effects.memos[key] = memo

    outcome = await run.advance(stale)

    assert isinstance(outcome, Completed)
    assert got == [paid()]
    assert isinstance(got[0], meshflow.Event)
    assert run.effects.memos[key] is memo  # the timeout did not overwrite the event


async def test_a_stored_wait_memo_returns_an_equal_event(app: App) -> None:
    got: list[Event | None] = []

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> str:
        event = await ctx.step.wait_for_event("payment", event=PAID, timeout="1h")
        got.append(event)
        assert event is not None
        return f"{event.name}:{event.data['amount']}"

    run = Run(f, dict([took("payment", paid(amount=25), seq=100)]))

    outcome = await run.advance()

    assert output(outcome) == f"{PAID}:25"
    assert got == [paid(amount=25)]
    assert isinstance(got[0], meshflow.Event)
    assert run.effects.commits == []


async def test_a_stored_timeout_memo_read_back_from_the_store_returns_none(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> bool:
        return await ctx.step.wait_for_event("payment", event=PAID, timeout="1h") is None

    key, memo = stored("payment", StepKind.WAIT)
    roundtripped = decode_memo(encode_record(memo))

    outcome = await Run(f, {key: roundtripped}).advance()

    assert output(outcome) is True


# --- wait_for_any ------------------------------------------------------------------------------


async def test_wait_for_any_suspends_with_one_pending_holding_a_wait_per_event(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_any(
            "outcome",
            [WaitFor(PAID, match="data.userId", if_="async.data.amount >= 10"), CANCELLED],
            timeout="2h",
        )

    outcome = await Run(f).advance()

    item = only_pending(outcome)
    assert (item.kind, item.step_id, item.until) == (PendingKind.WAIT, "outcome", T0 + 2 * HOUR)
    assert item.waits == [
        WaitSpec(
            event=PAID,
            match="data.userId",
            match_token=match_key("u-1"),
            if_="async.data.amount >= 10",
            floor_seq=SEQ,
        ),
        WaitSpec(event=CANCELLED, floor_seq=SEQ),
    ]


async def test_wait_for_any_returns_the_event_that_was_taken_whichever_it_was(app: App) -> None:
    cancelled = Event(name=CANCELLED, id="evt-c", data={"reason": "changed mind"}, ts=T0)

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> str:
        event = await ctx.step.wait_for_any("outcome", [PAID, CANCELLED], timeout="2h")
        assert event is not None
        return event.name

    outcome = await Run(f, dict([took("outcome", cancelled, seq=100)])).advance()

    assert output(outcome) == CANCELLED


async def test_wait_for_any_raises_the_floor_only_for_the_names_this_run_took(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h")
        await ctx.step.wait_for_any("next", [PAID, CANCELLED], timeout="1h")

    outcome = await Run(f, dict([took("payment", paid(), seq=100)])).advance()

    waits = only_pending(outcome).waits
    assert [(w.event, w.floor_seq) for w in waits] == [(PAID, 100), (CANCELLED, SEQ)]


# --- a misused wait, invoke or send fails the run at once, naming the step ---------------------


async def _bad_event_name(ctx: Context) -> None:
    await ctx.step.wait_for_event("w", event="shop order", timeout="1h")


async def _unparsable_if(ctx: Context) -> None:
    await ctx.step.wait_for_event("w", event=PAID, timeout="1h", if_="event.data.")


async def _unknown_variable_in_if(ctx: Context) -> None:
    await ctx.step.wait_for_event("w", event=PAID, timeout="1h", if_="foo.x == 1")


async def _match_outside_data(ctx: Context) -> None:
    await ctx.step.wait_for_event("w", event=PAID, timeout="1h", match="userId")


async def _bad_timeout(ctx: Context) -> None:
    await ctx.step.wait_for_event("w", event=PAID, timeout="soon")


async def _bad_lookback(ctx: Context) -> None:
    await ctx.step.wait_for_event("w", event=PAID, timeout="1h", lookback="soon")


async def _bad_since(ctx: Context) -> None:
    await ctx.step.wait_for_event("w", event=PAID, timeout="1h", since="later")


async def _wait_for_no_events(ctx: Context) -> None:
    await ctx.step.wait_for_any("w", [], timeout="1h")


async def _wait_for_any_bad_name(ctx: Context) -> None:
    await ctx.step.wait_for_any("w", [PAID, WaitFor("shop/*")], timeout="1h")


async def _invoke_with_list_data(ctx: Context) -> None:
    await ctx.step.invoke("w", function="t-child", data=[1, 2])  # type: ignore[arg-type]


async def _invoke_a_bad_function_id(ctx: Context) -> None:
    await ctx.step.invoke("w", function="t.child")


async def _invoke_a_non_function(ctx: Context) -> None:
    await ctx.step.invoke("w", function=42)  # type: ignore[arg-type]


async def _invoke_with_a_bad_timeout(ctx: Context) -> None:
    await ctx.step.invoke("w", function="t-child", timeout="soon")


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        (_bad_event_name, "ConfigError"),
        (_unparsable_if, "ConfigError"),
        (_unknown_variable_in_if, "ConfigError"),
        (_match_outside_data, "ConfigError"),
        (_bad_timeout, "DurationError"),
        (_bad_lookback, "DurationError"),
        (_bad_since, "ConfigError"),
        (_wait_for_no_events, "ConfigError"),
        (_wait_for_any_bad_name, "ConfigError"),
        (_invoke_with_list_data, "ConfigError"),
        (_invoke_a_bad_function_id, "ConfigError"),
        (_invoke_a_non_function, "ConfigError"),
        (_invoke_with_a_bad_timeout, "DurationError"),
    ],
    ids=lambda v: v.__name__.lstrip("_") if callable(v) else v,
)
async def test_a_misused_wait_or_invoke_fails_the_run_at_once_with_a_config_error_naming_the_step(
    app: App, body: Callable[[Context], Awaitable[Any]], error_type: str
) -> None:
    fn = app.function("f", trigger="shop/order.placed", retries=RETRIES)(body)
    run = Run(fn)

    outcome = await run.advance()

    assert isinstance(outcome, Failed), outcome
    assert outcome.error.type == error_type
    assert issubclass(getattr(meshflow, error_type), ConfigError)
    assert "step 'w'" in outcome.error.message
    assert run.effects.commits == []


async def test_a_bad_match_path_is_reported_as_a_match_path_once(app: App) -> None:
    """The message reads "step 'w' match path 'userId' ...", not "step 'w' match match path"."""
    fn = app.function("f", trigger="shop/order.placed")(_match_outside_data)

    outcome = await Run(fn).advance()

    assert isinstance(outcome, Failed)
    assert "step 'w' match path 'userId'" in outcome.error.message


async def test_a_bad_lookback_fails_the_run_even_with_since_wait(app: App) -> None:
    """A duration that cannot be parsed is refused wherever it is given, not silently ignored."""

    @app.function("f", trigger="shop/order.placed", retries=RETRIES)
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("w", event=PAID, timeout="1h", lookback="soon", since="wait")

    outcome = await Run(f).advance()

    assert isinstance(outcome, Failed), outcome
    assert outcome.error.type == "DurationError"
    assert "step 'w'" in outcome.error.message


# --- invoke --------------------------------------------------------------------------------------


async def test_invoke_suspends_on_a_child_run_of_the_function_object_with_no_deadline(app: App) -> None:
    @app.function("charge", trigger="shop/charge")
    async def charge(ctx: Context) -> None:
        return None

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.invoke("charge", function=charge, data={"amount": 5, "currency": "EUR"})

    outcome = await Run(f).advance()

    item = only_pending(outcome)
    assert (item.kind, item.key, item.step_id) == (PendingKind.INVOKE, step_hash("charge"), "charge")
    assert (item.until, item.since) == (NEVER, T0)
    assert item.invoke is not None
    assert (item.invoke.function, item.invoke.data) == ("t-charge", {"amount": 5, "currency": "EUR"})
    assert is_ulid(item.invoke.run_id)


async def test_invoke_by_full_id_names_another_apps_function_and_defaults_data_to_empty(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.invoke("charge", function="billing-charge")

    outcome = await Run(f).advance()

    spec = only_pending(outcome).invoke
    assert spec is not None
    assert (spec.function, spec.data) == ("billing-charge", {})


async def test_the_child_run_id_is_the_same_on_every_pass_even_without_the_pending(app: App) -> None:
    """A pass re-executed after a crash (its Suspended never stored) must find the same child."""

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.invoke("charge", function="billing-charge", data={"amount": 5})

    run = Run(f)
    first = only_pending(await run.advance()).invoke
    run.pending = []
    run.clock.now = T0 + HOUR

    second = only_pending(await run.advance()).invoke
    other_run = only_pending(await Run(f, run_id="run-2").advance()).invoke

    assert first is not None
    assert second is not None
    assert other_run is not None
    assert second.run_id == first.run_id
    assert other_run.run_id != first.run_id


async def test_invoke_with_a_timeout_suspends_until_now_plus_the_timeout(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.invoke("charge", function="billing-charge", timeout="30m")

    outcome = await Run(f).advance()

    assert only_pending(outcome).until == T0 + 30 * MINUTE


async def test_an_invoke_past_its_timeout_raises_invoke_timeout_error_the_function_can_catch(
    app: App,
) -> None:
    @app.function("f", trigger="shop/order.placed", retries=RETRIES)
    async def f(ctx: Context) -> dict[str, str]:
        try:
            await ctx.step.invoke("charge", function="billing-charge", timeout="30m")
        except StepError as err:
            return {"step": err.step_id, "type": err.error_type}
        return {"step": "", "type": "none"}

    run = Run(f)
    spec = only_pending(await run.advance()).invoke
    run.clock.now = T0 + 30 * MINUTE

    outcome = await run.advance()

    assert output(outcome) == {"step": "charge", "type": "InvokeTimeoutError"}
    [memo] = run.effects.commits
    assert (memo.kind, memo.status) == (StepKind.INVOKE, StepStatus.FAILED)
    assert memo.error is not None
    assert memo.error.type == "InvokeTimeoutError"
    assert "billing-charge" in memo.error.message
    assert spec is not None
    assert memo.child == spec.run_id
    assert (memo.started_at, memo.ended_at) == (T0, T0 + 30 * MINUTE)


async def test_an_uncaught_invoke_timeout_fails_the_run_without_retries(app: App) -> None:
    @app.function("f", trigger="shop/order.placed", retries=RETRIES)
    async def f(ctx: Context) -> None:
        await ctx.step.invoke("charge", function="billing-charge", timeout="30m")

    run = Run(f)
    await run.advance()
    run.clock.now = T0 + HOUR

    outcome = await run.advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == "StepError"
    assert "InvokeTimeoutError" in outcome.error.message


async def test_a_child_that_finished_as_the_invoke_timed_out_wins_and_its_output_is_returned(
    app: App,
) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> Any:
        return await ctx.step.invoke("charge", function="billing-charge", timeout="30m")

    run = Run(f)
    await run.advance()
    run.clock.now = T0 + HOUR
    stale = run.activation()
    key, memo = stored("charge", StepKind.INVOKE, value={"charged": 5})
    run.effects.memos[key] = memo

    outcome = await run.advance(stale)

    assert output(outcome) == {"charged": 5}


@dataclasses.dataclass
class Receipt:
    charged: int
    currency: str


async def test_a_completed_invoke_memo_returns_the_childs_output_decoded_into_type(app: App) -> None:
    got: list[Any] = []

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        got.append(await ctx.step.invoke("charge", function="billing-charge"))
        got.append(await ctx.step.invoke("refund", function="billing-refund", type=Receipt))

    memos = dict(
        [
            stored("charge", StepKind.INVOKE, value={"charged": 5, "currency": "EUR"}),
            stored("refund", StepKind.INVOKE, value={"charged": -5, "currency": "EUR"}),
        ]
    )
    run = Run(f, memos)

    outcome = await run.advance()

    assert isinstance(outcome, Completed)
    assert got == [{"charged": 5, "currency": "EUR"}, Receipt(charged=-5, currency="EUR")]
    assert run.effects.commits == []


async def test_a_failed_invoke_memo_raises_step_error_with_the_childs_error(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> list[str]:
        try:
            await ctx.step.invoke("charge", function="billing-charge")
        except StepError as err:
            return [err.step_id, err.error_type, err.error_message]
        return []

    error = ErrorInfo(type="CardDeclined", message="insufficient funds", retriable=False)
    run = Run(f, dict([stored("charge", StepKind.INVOKE, error=error)]))

    outcome = await run.advance()

    assert output(outcome) == ["charge", "CardDeclined", "insufficient funds"]


# --- send_event ----------------------------------------------------------------------------------


def shipped(order_id: int) -> Event:
    return Event(name="shop/order.shipped", id=f"evt-ship-{order_id}", data={"orderId": order_id}, ts=T0)


async def test_send_event_sends_once_under_run_and_step_msg_ids_and_returns_the_event_ids(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> list[str]:
        return await ctx.step.send_event("notify", [shipped(1), shipped(2)])

    run = Run(f)

    outcome = await run.advance()

    key = step_hash("notify")
    assert output(outcome) == ["evt-ship-1", "evt-ship-2"]
    assert run.effects.sent == [([shipped(1), shipped(2)], [f"run-1:{key}:0", f"run-1:{key}:1"])]
    [memo] = run.effects.commits
    assert (memo.id, memo.hash, memo.kind, memo.status) == (
        "notify",
        key,
        StepKind.SEND,
        StepStatus.COMPLETED,
    )
    assert msgspec.json.decode(memo.output) == ["evt-ship-1", "evt-ship-2"]


async def test_send_event_of_one_event_sends_it_and_returns_its_id_in_a_list(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> list[str]:
        return await ctx.step.send_event("notify", shipped(1))

    run = Run(f)

    outcome = await run.advance()

    assert output(outcome) == ["evt-ship-1"]
    assert run.effects.sent == [([shipped(1)], [f"run-1:{step_hash('notify')}:0"])]


async def test_a_replayed_send_event_sends_nothing_and_returns_the_stored_ids(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> list[str]:
        return await ctx.step.send_event("notify", [shipped(1), shipped(2)])

    run = Run(f, dict([stored("notify", StepKind.SEND, value=["evt-ship-1", "evt-ship-2"])]))

    outcome = await run.advance()

    assert output(outcome) == ["evt-ship-1", "evt-ship-2"]
    assert run.effects.sent == []
    assert run.effects.commits == []


async def test_a_send_re_executed_before_its_memo_was_stored_reuses_its_msg_ids(app: App) -> None:
    """The stream drops the second publish: same run, same step, same message ids."""

    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await ctx.step.send_event("notify", shipped(1))

    first, second = Run(f), Run(f)

    await first.advance()
    await second.advance()

    assert first.effects.sent == second.effects.sent


async def test_an_invalid_event_fails_the_run_with_event_error_and_sends_none_of_the_batch(app: App) -> None:
    @app.function("f", trigger="shop/order.placed", retries=RETRIES)
    async def f(ctx: Context) -> None:
        await ctx.step.send_event("notify", [shipped(1), Event(name="shop order", data={})])

    run = Run(f)

    outcome = await run.advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == "EventError"
    assert run.effects.sent == []
    assert run.effects.commits == []


@pytest.mark.parametrize(
    "events",
    [{"name": "shop/order.shipped"}, [], ["shop/order.shipped"], None],
    ids=["dict", "empty-list", "list-of-str", "none"],
)
async def test_send_event_of_something_other_than_events_fails_the_run_with_event_error(
    app: App, events: Any
) -> None:
    @app.function("f", trigger="shop/order.placed", retries=RETRIES)
    async def f(ctx: Context) -> None:
        await ctx.step.send_event("notify", events)

    run = Run(f)

    outcome = await run.advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == "EventError"
    assert "'notify'" in outcome.error.message
    assert run.effects.sent == []


# --- several waits at once, and non-determinism ---------------------------------------------------


async def test_a_wait_and_an_invoke_awaited_together_suspend_together(app: App) -> None:
    @app.function("f", trigger="shop/order.placed")
    async def f(ctx: Context) -> None:
        await asyncio.gather(
            ctx.step.wait_for_event("payment", event=PAID, timeout="1h"),
            ctx.step.invoke("charge", function="billing-charge"),
        )

    outcome = await Run(f).advance()

    assert isinstance(outcome, Suspended)
    assert sorted((p.kind, p.step_id) for p in outcome.pending) == [
        (PendingKind.INVOKE, "charge"),
        (PendingKind.WAIT, "payment"),
    ]


async def test_a_wait_memo_under_a_step_run_id_fails_the_run_with_non_determinism_error(app: App) -> None:
    @app.function("f", trigger="shop/order.placed", retries=RETRIES)
    async def f(ctx: Context) -> Any:
        return await ctx.step.run("payment", lambda: "ran")

    outcome = await Run(f, dict([took("payment", paid(), seq=100)])).advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == "NonDeterminismError"
    assert "'payment'" in outcome.error.message


@pytest.mark.parametrize("kind", [StepKind.RUN, StepKind.SEND, StepKind.INVOKE])
async def test_another_kind_of_memo_under_a_wait_id_fails_the_run_with_non_determinism_error(
    app: App, kind: StepKind
) -> None:
    @app.function("f", trigger="shop/order.placed", retries=RETRIES)
    async def f(ctx: Context) -> None:
        await ctx.step.wait_for_event("payment", event=PAID, timeout="1h")

    outcome = await Run(f, dict([stored("payment", kind, value="x")])).advance()

    assert isinstance(outcome, Failed)
    assert outcome.error.type == "NonDeterminismError"
