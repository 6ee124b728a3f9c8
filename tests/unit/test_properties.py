"""Properties that hold for every input, generated (hypothesis): durations, crons across DST, CEL
filters, decoding whatever bytes arrive, and the replay engine against a model of the function
it runs, crashed at random points."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import zoneinfo
from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshflow
from meshflow.cron import parse_cron
from meshflow.durations import format_duration, from_ms, parse_duration, to_ms
from meshflow.errors import ConfigError, DurationError, EventError, ExpressionError
from meshflow.events import Event, decode_event, decode_stored_event, encode_event
from meshflow.expressions import compile_expression
from meshflow.replay import Completed, Suspended
from meshflow.runs import RunRecord, StepKind, decode_memo, decode_run, encode_record, new_run
from meshflow.testing import EPOCH_MS, EngineRun, MemoryEffects

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # examples: the profile's

# --- durations -----------------------------------------------------------------------------


@FAST
@given(st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(days=3650)))
def test_a_formatted_duration_parses_back_to_itself(value: dt.timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


@FAST
@given(st.text(max_size=40))
def test_any_text_is_a_duration_or_a_clear_duration_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except DurationError:
        return
    assert value >= dt.timedelta(0)
    assert to_ms(value) >= 0


# --- cron, across DST --------------------------------------------------------------------------

ZONES = [
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/Sao_Paulo",
]
minutes = st.one_of(
    st.just("*"), st.integers(0, 59).map(str), st.sampled_from(["*/15", "*/7", "0,30", "5-10"])
)
hours = st.one_of(st.just("*"), st.integers(0, 23).map(str), st.sampled_from(["*/6", "1-3", "2", "0,12"]))
weekdays = st.sampled_from(["*", "MON-FRI", "SUN", "1,3,5"])


@FAST
@given(
    minute=minutes,
    hour=hours,
    weekday=weekdays,
    zone=st.sampled_from(ZONES),
    start=st.integers(1_767_225_600_000, 1_798_761_600_000),  # any moment of 2026
)
def test_cron_ticks_rise_strictly_match_their_fields_and_are_found_from_just_before(
    minute: str, hour: str, weekday: str, zone: str, start: int
) -> None:
    cron = parse_cron(f"TZ={zone} {minute} {hour} * * {weekday}", what="test")
    tz = zoneinfo.ZoneInfo(zone)
    tick = start
    for _ in range(12):
        nxt = cron.next_after(tick)
        assert nxt > tick
        assert cron.next_after(nxt - 1) == nxt  # a tick is a tick from just before it
        local = from_ms(nxt).astimezone(tz)
        assert _field_allows(minute, local.minute, 60)
        assert _field_allows(hour, local.hour, 24)
        assert weekday == "*" or _field_allows(_dow(weekday), (local.isoweekday() % 7), 7)
        tick = nxt


def _dow(field: str) -> str:
    return field.replace("MON-FRI", "1-5").replace("SUN", "0")


def _field_allows(field: str, value: int, size: int) -> bool:
    for part in field.split(","):
        if part == "*":
            return True
        if part.startswith("*/"):
            if value % int(part[2:]) == 0:
                return True
        elif "-" in part:
            low, high = map(int, part.split("-"))
            if low <= value <= high:
                return True
        elif int(part) == value:
            return True
    return False


@FAST
@given(st.text(max_size=60))
def test_any_text_is_a_cron_or_a_clear_config_error(text: str) -> None:
    try:
        parse_cron(text, what="function 'f'")
    except ConfigError as exc:
        message = str(exc)
    else:
        return
    assert "function 'f'" in message


# --- CEL ---------------------------------------------------------------------------------------


@FAST
@given(x=st.integers(-(2**40), 2**40), n=st.integers(-(2**40), 2**40))
def test_a_comparison_filter_agrees_with_python(x: int, n: int) -> None:
    expr = compile_expression(f"event.data.x > {n}", variables=("event",), what="test")
    assert expr.test({"event": {"data": {"x": x}}}) is (x > n)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@FAST
@given(source=st.text(max_size=40), data=st.dictionaries(st.text(max_size=5), json_values, max_size=4))
def test_any_expression_compiles_or_is_refused_and_evaluates_or_fails_clearly(
    source: str, data: dict[str, Any]
) -> None:
    try:
        expr = compile_expression(source, variables=("event",), what="test")
    except ConfigError:
        return
    try:
        expr.evaluate({"event": {"data": data}})
    except ExpressionError:
        pass
    assert expr.test({"event": {"data": data}}) in (True, False)


# --- decoding whatever arrives -----------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9]{0,8}(/[a-z][a-z0-9]{0,8})?(\.[a-z][a-z0-9]{0,5})?", fullmatch=True)


@FAST
@given(
    name=names, data=st.dictionaries(st.text(max_size=8), json_values, max_size=5), ts=st.integers(0, 2**47)
)
def test_an_event_round_trips_through_its_stored_form(name: str, data: dict[str, Any], ts: int) -> None:
    event = Event(name=name, data=data, ts=ts)
    raw = encode_event(event)
    assert decode_event(raw) == event
    assert decode_stored_event(raw, stream="S", seq=7, stored_ms=1) == event


@FAST
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_are_an_event_or_a_decode_error(raw: bytes) -> None:
    try:
        event = decode_stored_event(raw, stream="S", seq=9, stored_ms=5)
    except msgspec.DecodeError:
        return
    assert event.id
    assert isinstance(event.data, dict)
    assert decode_stored_event(raw, stream="S", seq=9, stored_ms=5).id == event.id  # stable


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_are_a_record_or_a_decode_error(raw: bytes) -> None:
    for decode in (decode_run, decode_memo):
        try:
            decode(raw)
        except msgspec.DecodeError:
            pass


@FAST
@given(data=st.dictionaries(st.text(max_size=8), json_values, max_size=5), attempt=st.integers(0, 30))
def test_a_run_record_round_trips(data: dict[str, Any], attempt: int) -> None:
    record = msgspec.structs.replace(
        new_run("r1", app="a", fn="f", events=[Event(name="a/b", data=data, ts=1)], now=5), attempt=attempt
    )
    assert decode_run(encode_record(record)) == record
    assert isinstance(decode_run(encode_record(record)), RunRecord)


# --- the replay engine against a model ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    fails: int  # the handler fails this many times before it succeeds


@dataclasses.dataclass(frozen=True)
class Sleep:
    ms: int


@dataclasses.dataclass(frozen=True)
class Parallel:
    branches: tuple[int, ...]  # each branch: a step failing this many times


ops = st.one_of(
    st.integers(0, 2).map(Run),
    st.integers(1, 5000).map(Sleep),
    st.lists(st.integers(0, 2), min_size=2, max_size=3).map(lambda b: Parallel(tuple(b))),
)


def model(program: list[Any]) -> list[str]:
    """What the function returns: every run step's result, in program order."""
    out: list[str] = []
    for i, op in enumerate(program):
        if isinstance(op, Run):
            out.append(f"s{i}")
        elif isinstance(op, Parallel):
            out += [f"s{i}.{j}" for j in range(len(op.branches))]
    return out


class CrashingEffects(MemoryEffects):
    """The steps bucket, losing its connection on the commits named in ``crash_on`` (counted
    over the whole run): the pass is abandoned there, its commits so far kept. A result not
    committed yet is lost with the pass (a sibling branch's handler may even finish after it)."""

    def __init__(self, crash_on: set[int]) -> None:
        super().__init__()
        self.crash_on = crash_on
        self.calls = 0

    async def commit(self, memo: Any) -> Any:
        self.calls += 1
        if self.calls in self.crash_on:
            raise meshflow.NatsError("connection lost")
        return await super().commit(memo)


@FAST
@given(
    program=st.lists(ops, min_size=1, max_size=6),
    commit_crashes=st.sets(st.integers(1, 12), max_size=3),
    dropped=st.sets(st.integers(0, 15), max_size=3),
)
def test_random_programs_crashed_at_random_points_end_as_the_model_says(
    program: list[Any], commit_crashes: set[int], dropped: set[int]
) -> None:
    asyncio.run(_replay_against_the_model(program, commit_crashes, dropped))


def _function(program: list[Any], calls: Counter[str], successes: Counter[str]) -> meshflow.Function:
    """The function the program describes; its handlers fail as told, counting every call."""
    app = meshflow.App("prop")

    def step(step_id: str, fails: int) -> str:
        calls[step_id] += 1
        if calls[step_id] <= fails:
            raise ValueError(f"{step_id} fails")
        successes[step_id] += 1
        return step_id

    @app.function("f", trigger="p/e", retries=meshflow.Retry(retries=3, backoff=("1s",)))
    async def f(ctx: meshflow.Context) -> list[str]:
        out: list[str] = []
        for i, op in enumerate(program):
            if isinstance(op, Run):
                out.append(await ctx.step.run(f"s{i}", step, f"s{i}", op.fails))
            elif isinstance(op, Sleep):
                await ctx.step.sleep(f"s{i}", f"{op.ms}ms")
            else:
                ids = [f"s{i}.{j}" for j in range(len(op.branches))]
                out += await asyncio.gather(
                    *(ctx.step.run(s, step, s, fails) for s, fails in zip(ids, op.branches, strict=True))
                )
        return out

    return f


async def _drive(run: EngineRun, dropped: set[int]) -> tuple[Any, int]:
    """Pass after pass, as workers would, losing the record of the passes named in ``dropped``
    and abandoning those whose commits fail; the outcome of the last, and how many were abandoned."""
    outcome = None
    abandoned = 0
    for n in range(200):
        before = (
            list(run.pending),
            dict(run.step_failures),
            run.attempt,
            dict(run.step_history),
            list(run.history),
        )
        try:
            outcome = await run.advance()
        except meshflow.NatsError:
            abandoned += 1
            continue  # the pass was abandoned: the run resumes from what was committed
        if n in dropped and isinstance(outcome, Suspended) and before[0]:  # the record's write was lost
            run.pending, run.step_failures, run.attempt, run.step_history, run.history = before
        elif not isinstance(outcome, Suspended):
            return outcome, abandoned
        run.clock.now = max(run.clock.now, min(p.until for p in run.pending))
    return outcome, abandoned


async def _replay_against_the_model(program: list[Any], commit_crashes: set[int], dropped: set[int]) -> None:
    calls: Counter[str] = Counter()
    successes: Counter[str] = Counter()
    run = EngineRun(_function(program, calls, successes), event=Event(name="p/e", ts=EPOCH_MS))
    effects = CrashingEffects(commit_crashes)
    run.effects = effects
    outcome, abandoned = await _drive(run, dropped)
    assert isinstance(outcome, Completed), outcome
    assert msgspec.json.decode(outcome.output) == model(program)
    for step_id, count in successes.items():  # a committed step never runs again: a step runs
        assert 1 <= count <= 1 + abandoned, (step_id, count)  # again only after a pass lost its result
    for memo in effects.memos.values():
        if memo.kind is StepKind.SLEEP:
            op = program[int(memo.id[1:])]
            assert memo.ended_at - memo.started_at >= op.ms  # never early


@pytest.mark.parametrize("text", ["", " ", "1 fortnight", "-1s", "nan", "1e400s"])
def test_a_bad_duration_names_itself(text: str) -> None:
    with pytest.raises((DurationError, EventError)):
        parse_duration(text)
