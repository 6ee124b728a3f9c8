"""Unit tests for meshflow.cron: parsing cron triggers and computing their ticks, DST days included."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import zoneinfo
from pathlib import Path

import pytest
from croniter import croniter

import meshflow.cron
from meshflow.cron import Cron, is_cron, parse_cron
from meshflow.durations import epoch_ms, from_ms
from meshflow.errors import ConfigError

WHAT = "function 'digest'"
MINUTE_MS = 60_000
PARIS = "Europe/Paris"
# Europe/Paris in 2025: clocks go 02:00 -> 03:00 on 30 March (01:00 UTC) and 03:00 -> 02:00 on
# 26 October (01:00 UTC), so 02:00-02:59 does not exist on the first day and happens twice on the second.


def ms(text: str) -> int:
    """Epoch milliseconds of an ISO-8601 time with an offset, like "2025-01-06T09:00+00:00"."""
    return epoch_ms(dt.datetime.fromisoformat(text))


def iso(tick: int) -> str:
    """A tick as UTC ISO-8601, so a failing assertion shows times rather than numbers."""
    return from_ms(tick).isoformat(timespec="minutes")


def cron(source: str) -> Cron:
    return parse_cron(source, what=WHAT)


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expr", "tz"),
    [
        ("0 9 * * MON", "0 9 * * MON", "UTC"),
        ("*/15 * * * *", "*/15 * * * *", "UTC"),
        ("0 9-17 * * mon-fri", "0 9-17 * * mon-fri", "UTC"),
        ("0,30 8,12 1,15 jan,jul *", "0,30 8,12 1,15 jan,jul *", "UTC"),
        ("10-50/20 */2 * * *", "10-50/20 */2 * * *", "UTC"),
        ("5/15 * * * *", "5/15 * * * *", "UTC"),
        ("0 0 ? * MON", "0 0 ? * MON", "UTC"),
        ("  0   9 *\t* MON  ", "0 9 * * MON", "UTC"),
        ("TZ=Europe/Paris 0 9 * * MON", "0 9 * * MON", PARIS),
        ("CRON_TZ=America/New_York 0 9 * * 1-5", "0 9 * * 1-5", "America/New_York"),
        ("TZ=UTC 0 9 * * *", "0 9 * * *", "UTC"),
    ],
)
def test_parse_cron_reads_five_fields_and_an_optional_time_zone(source: str, expr: str, tz: str) -> None:
    assert parse_cron(source, what=WHAT) == Cron(source=source, expr=expr, tz=tz)


@pytest.mark.parametrize(
    ("macro", "expr"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_macros_expand_to_their_five_fields(macro: str, expr: str) -> None:
    assert cron(macro).expr == expr
    assert cron(f"TZ=Europe/Paris {macro}") == Cron(source=f"TZ=Europe/Paris {macro}", expr=expr, tz=PARIS)


@pytest.mark.parametrize(
    ("source", "expr"),
    [
        ("0 0 * * 1-1", "0 0 * * 1"),  # croniter reads an equal range as the whole field
        ("0 0 * * mon-mon", "0 0 * * 1"),
        ("59/15 * * * *", "59 * * * *"),
        ("*/1 */1 * * *", "* * * * *"),
        ("0 0 13 * 0-6", "0 0 13 * *"),  # a full range is `*` to croniter's day rule, not to JetStream's
        ("0 0 1-31 * FRI", "0 0 * * FRI"),
        ("0 0 13 * SUN-SAT", "0 0 13 * *"),
        ("*,5 * * * *", "* * * * *"),
    ],
)
def test_spellings_croniter_and_jetstream_read_differently_are_rewritten(source: str, expr: str) -> None:
    assert cron(source).expr == expr


def test_an_equal_range_fires_on_that_one_day_only() -> None:
    ticks = cron("0 0 * * 1-1").ticks_between(ms("2025-01-01T00:00+00:00"), ms("2025-01-31T00:00+00:00"))
    assert [from_ms(t).day for t in ticks] == [6, 13, 20, 27]


def test_names_ignore_case_and_sunday_is_0_or_sun() -> None:
    saturday = ms("2025-01-04T12:00+00:00")
    sunday = ms("2025-01-05T00:00+00:00")
    for source in ("0 0 * * 0", "0 0 * * SUN", "0 0 * * sun", "0 0 * * Sun"):
        assert cron(source).next_after(saturday) == sunday


def test_two_restricted_day_fields_fire_on_either_and_a_star_defers_to_the_other() -> None:
    start, end = ms("2025-06-01T00:00+00:00"), ms("2025-06-30T00:00+00:00")
    either = [from_ms(t).day for t in cron("0 0 13 * FRI").ticks_between(start, end)]
    assert either == [6, 13, 20, 27]  # Fridays and the 13th (a Friday in June 2025)
    either = [from_ms(t).day for t in cron("0 0 14 * FRI").ticks_between(start, end)]
    assert either == [6, 13, 14, 20, 27]
    assert [from_ms(t).day for t in cron("0 0 ? * FRI").ticks_between(start, end)] == [6, 13, 20, 27]
    assert [from_ms(t).day for t in cron("0 0 14 * *").ticks_between(start, end)] == [14]


# --- rejected forms ------------------------------------------------------------------------------


def test_an_out_of_range_value_names_the_function_the_field_and_the_range() -> None:
    with pytest.raises(ConfigError) as info:
        parse_cron("61 * * * *", what=WHAT)
    assert str(info.value) == (
        "function 'digest': cron trigger '61 * * * *' is invalid: minute 61 is out of range 0-59"
    )


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("@reboot", "no machine boots here; to run something when your app starts, send an event"),
        ("0 0 9 * * MON", "it has 6 fields, but a cron has 5 (no seconds field): minute hour"),
        ("0 0 9 * * MON 2030", "it has 7 fields, but a cron has 5 (no seconds or year field)"),
        ("0 9 * *", "it has 4 fields, but a cron has 5: minute hour day-of-month month day-of-week"),
        ("0 24 * * *", "hour 24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month 0 is out of range 1-31"),
        ("0 0 * 13 *", "month 13 is out of range 1-12"),
        ("0 0 1-40 * *", "day-of-month 40 is out of range 1-31"),
        ("0 0 * * 7", "day-of-week 7 is out of range 0-6 (use 0 or SUN for Sunday)"),
        (
            "0 22-2 * * *",
            "hour range '22-2' wraps around, which JetStream refuses; split it in two, like '22-23,0-2'",
        ),
        ("0 0 * * FRI-MON", "like '5-6,0-1'"),
        ("*/0 * * * *", "minute '*/0': a step must be 1 or more"),
        (
            "0 0 L * *",
            "day-of-month 'L': 'L', 'W' and '#' (last, nearest weekday, nth weekday) are not supported",
        ),
        ("0 0 15W * *", "day-of-month '15W': 'L', 'W' and '#'"),
        ("0 0 * * 5#2", "day-of-week '5#2': 'L', 'W' and '#'"),
        ("0 0 * * 5L", "day-of-week '5L': 'L', 'W' and '#'"),
        ("H 9 * * *", "minute 'H': 'H' and 'R' (hashed and random values) are computed differently"),
        ("H(0-29) 9 * * *", "minute 'H(0-29)': 'H' and 'R'"),
        ("H/15 * * * *", "minute 'H/15': 'H' and 'R'"),
        ("R 9 * * *", "minute 'R': 'H' and 'R'"),
        ("? 9 * * *", "minute '?': '?' stands alone, and only in the day fields"),
        ("0 0 * JANUARY *", "month 'JANUARY' is not understood; use numbers 1-12 or JAN-DEC"),
        ("0 0 * * MONDAY", "day-of-week 'MONDAY' is not understood; use numbers 0-6 or SUN-SAT"),
        ("-5 * * * *", "minute '-5' is not understood; use numbers 0-59, '*', ranges"),
        ("every monday at nine o'clock", "minute 'every' is not understood"),
        ("0 0 30 2 *", "it never fires: none of the months it names has a day 30"),
        ("0 0 31 4,6,9,11 *", "it never fires: none of the months it names has a day 31"),
        ("@fortnightly", "unknown macro '@fortnightly'; use one of @hourly, @daily, @midnight, @weekly"),
        (
            "TZ=Europe/Pariss 0 9 * * *",
            "unknown time zone 'Europe/Pariss'; use an IANA name like 'Europe/Paris'",
        ),
        ("TZ=europe/paris 0 9 * * *", "unknown time zone 'europe/paris'"),
        ("TZ=Europe 0 9 * * *", "unknown time zone 'Europe'"),
        ("TZ=../etc/passwd 0 9 * * *", "unknown time zone '../etc/passwd'"),
        ("TZ=localtime 0 9 * * *", "time zone 'localtime' is this machine's zone"),
        ("TZ= 0 9 * * *", "'TZ=' names no time zone"),
        ("TZ=Europe/Paris", "nothing follows the time zone; write a cron like '0 9 * * MON'"),
        ("", "it is empty; write a cron like '0 9 * * MON'"),
        ("   ", "it is empty"),
    ],
)
def test_parse_cron_refuses_what_it_cannot_run_and_says_why(source: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_cron(source, what=WHAT)
    message = str(info.value)
    assert message.startswith(f"{WHAT}: cron trigger {source!r} is invalid: ")
    assert reason in message


@pytest.mark.parametrize("source", [None, 42, b"0 9 * * *", ["0 9 * * *"]])
def test_parse_cron_refuses_a_trigger_that_is_not_a_string(source: object) -> None:
    with pytest.raises(
        ConfigError, match=r"^function 'digest': cron trigger .* is invalid: use a string like"
    ):
        parse_cron(source, what=WHAT)


def test_a_month_day_that_only_leap_years_have_is_accepted() -> None:
    assert iso(cron("0 0 29 2 *").next_after(ms("2025-01-01T00:00+00:00"))) == "2028-02-29T00:00+00:00"


def test_an_impossible_day_of_month_is_accepted_when_the_day_of_week_can_fire() -> None:
    # Both day fields restricted: Mondays in February fire, so the cron is not dead.
    tick = cron("0 0 31 2 MON").next_after(ms("2025-01-01T00:00+00:00"))
    assert iso(tick) == "2025-02-03T00:00+00:00"


# --- next_after and ticks_between ----------------------------------------------------------------


def test_next_after_in_utc() -> None:
    wednesday = ms("2025-01-01T12:00+00:00")
    assert iso(cron("0 9 * * MON").next_after(wednesday)) == "2025-01-06T09:00+00:00"
    assert iso(cron("*/15 * * * *").next_after(wednesday)) == "2025-01-01T12:15+00:00"
    assert iso(cron("@monthly").next_after(wednesday)) == "2025-02-01T00:00+00:00"


def test_next_after_is_strictly_after_and_millisecond_exact() -> None:
    c = cron("0 9 * * *")
    nine = ms("2025-01-06T09:00+00:00")
    assert c.next_after(nine - 1) == nine
    assert iso(c.next_after(nine)) == "2025-01-07T09:00+00:00"
    assert iso(c.next_after(nine + 1)) == "2025-01-07T09:00+00:00"
    assert c.next_after(nine - 59_999) == nine


def test_nine_in_paris_is_eight_utc_in_winter_and_seven_utc_in_summer() -> None:
    c = cron("TZ=Europe/Paris 0 9 * * MON")
    assert iso(c.next_after(ms("2025-01-01T00:00+00:00"))) == "2025-01-06T08:00+00:00"
    assert iso(c.next_after(ms("2025-07-01T00:00+00:00"))) == "2025-07-07T07:00+00:00"


def test_ticks_between_excludes_after_and_includes_until() -> None:
    c = cron("0 * * * *")
    ticks = c.ticks_between(ms("2025-01-01T00:00+00:00"), ms("2025-01-01T03:00+00:00"))
    assert [iso(t) for t in ticks] == [
        "2025-01-01T01:00+00:00",
        "2025-01-01T02:00+00:00",
        "2025-01-01T03:00+00:00",
    ]


def test_ticks_between_keeps_the_earliest_limit_ticks() -> None:
    c = cron("* * * * *")
    start = ms("2025-01-01T00:00+00:00")
    assert c.ticks_between(start, start + 10 * 24 * 3_600_000, limit=3) == [
        start + MINUTE_MS,
        start + 2 * MINUTE_MS,
        start + 3 * MINUTE_MS,
    ]
    assert len(c.ticks_between(start, start + 10 * 24 * 3_600_000)) == 1000
    assert c.ticks_between(start, start + 10 * MINUTE_MS, limit=0) == []


def test_ticks_between_is_empty_when_the_window_holds_no_tick() -> None:
    c = cron("0 9 * * *")
    nine = ms("2025-01-06T09:00+00:00")
    assert c.ticks_between(nine, nine) == []
    assert c.ticks_between(nine, nine - MINUTE_MS) == []
    assert c.ticks_between(nine, nine + 3_600_000) == []


# --- DST -----------------------------------------------------------------------------------------


def test_spring_forward_skips_a_wall_clock_time_that_does_not_exist() -> None:
    # 02:30 does not happen in Paris on 30 March 2025; croniter alone would fire at 03:00.
    c = cron("TZ=Europe/Paris 30 2 * * *")
    ticks = c.ticks_between(ms("2025-03-28T12:00+00:00"), ms("2025-04-01T12:00+00:00"))
    assert [iso(t) for t in ticks] == [
        "2025-03-29T01:30+00:00",  # 02:30 CET
        "2025-03-31T00:30+00:00",  # 02:30 CEST
        "2025-04-01T00:30+00:00",
    ]


def test_spring_forward_keeps_the_ticks_on_either_side_of_the_gap() -> None:
    c = cron("TZ=Europe/Paris */30 * * * *")
    ticks = c.ticks_between(ms("2025-03-30T00:00+00:00"), ms("2025-03-30T02:00+00:00"))
    assert [iso(t) for t in ticks] == [
        "2025-03-30T00:30+00:00",  # 01:30 CET
        "2025-03-30T01:00+00:00",  # 03:00 CEST, the next wall-clock time that exists
        "2025-03-30T01:30+00:00",
        "2025-03-30T02:00+00:00",
    ]


def test_fall_back_fires_a_repeated_wall_clock_time_once_the_first_time() -> None:
    c = cron("TZ=Europe/Paris 30 2 * * *")
    ticks = c.ticks_between(ms("2025-10-25T12:00+00:00"), ms("2025-10-27T12:00+00:00"))
    assert [iso(t) for t in ticks] == [
        "2025-10-26T00:30+00:00",  # 02:30 CEST; 02:30 CET an hour later does not fire
        "2025-10-27T01:30+00:00",
    ]


def test_fall_back_from_inside_the_second_pass_waits_for_the_next_day() -> None:
    c = cron("TZ=Europe/Paris 30 2 * * *")
    assert iso(c.next_after(ms("2025-10-26T01:10+00:00"))) == "2025-10-27T01:30+00:00"  # from 02:10 CET


def test_fall_back_a_cron_for_named_hours_fires_in_the_first_pass_only() -> None:
    c = cron("TZ=Europe/Paris */20 2 * * *")
    ticks = c.ticks_between(ms("2025-10-25T23:00+00:00"), ms("2025-10-26T12:00+00:00"))
    assert [iso(t) for t in ticks] == [
        "2025-10-26T00:00+00:00",
        "2025-10-26T00:20+00:00",
        "2025-10-26T00:40+00:00",
    ]


def test_fall_back_a_cron_for_every_hour_fires_in_both_passes_and_keeps_its_rhythm() -> None:
    c = cron("TZ=Europe/Paris @hourly")
    ticks = c.ticks_between(ms("2025-10-25T22:30+00:00"), ms("2025-10-26T02:30+00:00"))
    assert [iso(t) for t in ticks] == [
        "2025-10-25T23:00+00:00",  # 01:00 CEST
        "2025-10-26T00:00+00:00",  # 02:00 CEST
        "2025-10-26T01:00+00:00",  # 02:00 CET
        "2025-10-26T02:00+00:00",  # 03:00 CET
    ]


def test_fall_back_the_second_pass_can_come_before_the_next_first_pass_tick() -> None:
    # From 02:40 CEST the next wall time of `*/30` is 03:00, but 02:00 CET comes first.
    c = cron("TZ=Europe/Paris */30 * * * *")
    assert iso(c.next_after(ms("2025-10-26T00:40+00:00"))) == "2025-10-26T01:00+00:00"
    assert iso(c.next_after(ms("2025-10-26T01:40+00:00"))) == "2025-10-26T02:00+00:00"  # from 02:40 CET


def _oracle(c: Cron, after_ms: int, until_ms: int) -> list[int]:
    """Every tick by brute force: each minute's wall-clock time, matched by croniter itself."""
    zone = zoneinfo.ZoneInfo(c.tz)
    every_hour = c.expr.split()[1] == "*"
    ticks = []
    for tick in range(after_ms - after_ms % MINUTE_MS + MINUTE_MS, until_ms + 1, MINUTE_MS):
        local = from_ms(tick).astimezone(zone)
        if croniter.match(c.expr, local.replace(tzinfo=None)) and (local.fold == 0 or every_hour):
            ticks.append(tick)
    return ticks


@pytest.mark.parametrize(
    ("tz", "after", "until"),
    [
        (PARIS, "2025-03-29T22:00+00:00", "2025-03-30T04:00+00:00"),
        (PARIS, "2025-10-25T21:00+00:00", "2025-10-26T04:00+00:00"),
        ("America/New_York", "2025-03-09T05:00+00:00", "2025-03-09T09:00+00:00"),
        ("America/New_York", "2025-11-02T04:00+00:00", "2025-11-02T09:00+00:00"),
        ("Australia/Lord_Howe", "2025-04-05T13:00+00:00", "2025-04-05T17:00+00:00"),  # a 30-minute shift
        ("America/Havana", "2025-03-09T03:00+00:00", "2025-03-09T07:00+00:00"),  # at midnight
    ],
)
@pytest.mark.parametrize("expr", ["30 2 * * *", "*/10 * * * *", "0 * * * *", "*/7 1-2 * * *", "0 0 * * *"])
def test_ticks_match_a_minute_by_minute_oracle_across_dst_changes(
    tz: str, after: str, until: str, expr: str
) -> None:
    c = cron(f"TZ={tz} {expr}")
    start, end = ms(after), ms(until)
    expected = _oracle(c, start, end)
    assert [iso(t) for t in c.ticks_between(start, end)] == [iso(t) for t in expected]
    for point in range(start, end, 17 * MINUTE_MS + 1_234):
        later = [t for t in expected if t > point]
        if later:
            assert iso(c.next_after(point)) == iso(later[0])


# --- JetStream -----------------------------------------------------------------------------------


def test_nats_schedule_prepends_a_seconds_field_and_names_the_zone() -> None:
    assert cron("0 9 * * MON").nats_schedule() == ("0 0 9 * * MON", "UTC")
    assert cron("TZ=Europe/Paris */15 9-17 * * 1-5").nats_schedule() == ("0 */15 9-17 * * 1-5", PARIS)
    assert cron("0 0 * * 1-1").nats_schedule() == ("0 0 0 * * 1", "UTC")


@pytest.mark.parametrize(
    ("macro", "header"),
    [
        ("@hourly", "@hourly"),
        ("@daily", "@daily"),
        ("@midnight", "@daily"),
        ("@weekly", "@weekly"),
        ("@monthly", "@monthly"),
        ("@yearly", "@yearly"),
        ("@annually", "@yearly"),
        ("@Daily", "@daily"),
    ],
)
def test_nats_schedule_sends_a_macro_by_its_jetstream_name(macro: str, header: str) -> None:
    assert cron(macro).nats_schedule() == (header, "UTC")
    assert cron(f"TZ=Asia/Tokyo {macro}").nats_schedule() == (header, "Asia/Tokyo")


# --- is_cron and the module itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        ("0 9 * * MON", True),
        ("*/5 * * * *", True),
        ("TZ=Europe/Paris 0 9 * * MON", True),
        ("CRON_TZ=UTC 0 9 * * *", True),
        ("@daily", True),
        ("  @hourly  ", True),
        ("61 * * * *", True),  # a cron, if a bad one: parse_cron will say why
        ("user/signup", False),
        ("2fa/requested", False),  # starts with a digit but is one word: an event name
        ("app/order.created", False),
        ("9", False),
        ("", False),
    ],
)
def test_is_cron_tells_a_cron_from_an_event_name(trigger: str, expected: bool) -> None:
    assert is_cron(trigger) is expected


def test_a_cron_is_a_frozen_value() -> None:
    c = cron("TZ=Europe/Paris 0 9 * * MON")
    assert c == cron("TZ=Europe/Paris 0 9 * * MON")
    assert hash(c) == hash(cron("TZ=Europe/Paris 0 9 * * MON"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tz = "UTC"  # type: ignore[misc]


def test_the_cron_module_imports_no_nats_and_no_io() -> None:
    tree = ast.parse(Path(meshflow.cron.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in imported} & {"nats", "socket", "subprocess", "asyncio", "http"}
