"""Unit tests for meshflow.durations: parsing durations and times, and their wire forms."""

from __future__ import annotations

import datetime as dt

import pytest

from meshflow.durations import epoch_ms, format_duration, from_ms, parse_duration, parse_when, rfc3339, to_ms
from meshflow.errors import ConfigError, DurationError

S = dt.timedelta(seconds=1)
MS = dt.timedelta(milliseconds=1)
MIN = dt.timedelta(minutes=1)
H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)
W = dt.timedelta(weeks=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", 30 * S),
        ("2h", 2 * H),
        ("3 days", 3 * D),
        ("7d", 7 * D),
        ("1h30m", H + 30 * MIN),
        ("1 day 2 hours", D + 2 * H),
        ("1 day, 2 hours", D + 2 * H),
        ("500ms", 500 * MS),
        ("1.5h", H + 30 * MIN),
        ("2 weeks", 2 * W),
        ("90 seconds", 90 * S),
        ("1m", MIN),
        ("10 min", 10 * MIN),
        ("1w", W),
        ("0.1s", 100 * MS),
        (".5s", 500 * MS),
        ("0s", dt.timedelta(0)),
    ],
)
def test_parse_duration_reads_the_documented_forms(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("unit", "size"),
    [
        *[(u, MS) for u in ("ms", "millisecond", "milliseconds")],
        *[(u, S) for u in ("s", "sec", "secs", "second", "seconds")],
        *[(u, MIN) for u in ("m", "min", "mins", "minute", "minutes")],
        *[(u, H) for u in ("h", "hr", "hrs", "hour", "hours")],
        *[(u, D) for u in ("d", "day", "days")],
        *[(u, W) for u in ("w", "week", "weeks")],
    ],
)
def test_parse_duration_knows_every_unit_spelling_with_or_without_a_space(
    unit: str, size: dt.timedelta
) -> None:
    assert parse_duration(f"2{unit}") == 2 * size
    assert parse_duration(f"2 {unit}") == 2 * size


def test_parse_duration_ignores_case_and_surrounding_whitespace() -> None:
    assert parse_duration("  2H 30M\n") == 2 * H + 30 * MIN
    assert parse_duration("3 Days") == 3 * D
    assert parse_duration("500MS") == 500 * MS


def test_parse_duration_reads_a_bare_number_string_as_seconds() -> None:
    assert parse_duration("30") == 30 * S
    assert parse_duration(" 2.5 ") == dt.timedelta(seconds=2.5)


def test_parse_duration_reads_ints_and_floats_as_seconds() -> None:
    assert parse_duration(30) == 30 * S
    assert parse_duration(0) == dt.timedelta(0)
    assert parse_duration(1.5) == 1500 * MS
    assert parse_duration(0.1) == 100 * MS


def test_parse_duration_passes_a_non_negative_timedelta_through() -> None:
    value = dt.timedelta(minutes=5, microseconds=7)
    assert parse_duration(value) is value


def test_parse_duration_rounds_sub_microsecond_string_amounts_up() -> None:
    assert parse_duration("0.0000001s") == dt.timedelta(microseconds=1)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "3 fortnights",
        "abc",
        "5 parsecs",
        "1h 30",
        "h",
        "1..5s",
        "1e3s",
        "5s,",
        "1 day,",
        "+5s",
        "½h",
    ],
)
def test_parse_duration_rejects_garbage_naming_the_value_and_purpose(value: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(value, what="sleep")
    message = str(info.value)
    assert repr(value) in message
    assert "for sleep" in message
    assert '"30s"' in message


def test_parse_duration_error_message_matches_the_house_wording() -> None:
    with pytest.raises(DurationError) as info:
        parse_duration("3 fortnights", what="sleep")
    assert str(info.value) == (
        "invalid duration '3 fortnights' for sleep: "
        'use a number with a unit, like "30s", "15m", "2h", "3 days"'
    )


@pytest.mark.parametrize("value", ["-5s", " -1 day", -1, -0.5, dt.timedelta(seconds=-1)])
def test_parse_duration_rejects_negative_durations(value: str | int | float | dt.timedelta) -> None:
    with pytest.raises(DurationError, match="negative") as info:
        parse_duration(value, what="timeout")
    assert "for timeout" in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_parse_duration_rejects_non_finite_floats(value: float) -> None:
    with pytest.raises(DurationError, match="finite"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False, None, [1], b"30s"])
def test_parse_duration_rejects_other_types_including_bool(value: object) -> None:
    with pytest.raises(DurationError, match=type(value).__name__):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["99999999999 days", 10**20, 1e20])
def test_parse_duration_rejects_durations_too_long_for_timedelta(value: str | int | float) -> None:
    with pytest.raises(DurationError, match="too long"):
        parse_duration(value)


def test_duration_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_duration("nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T10:00:00Z", dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC)),
        ("2026-11-22T10:00:00.123+01:00", dt.datetime(2026, 11, 22, 9, 0, 0, 123_000, tzinfo=dt.UTC)),
        (" 2026-11-22T10:00:00-05:30 ", dt.datetime(2026, 11, 22, 15, 30, tzinfo=dt.UTC)),
    ],
)
def test_parse_when_reads_iso_strings_with_an_offset_into_utc(text: str, expected: dt.datetime) -> None:
    parsed = parse_when(text)
    assert parsed == expected
    assert parsed.tzinfo is dt.UTC


def test_parse_when_converts_an_aware_datetime_to_utc() -> None:
    tz = dt.timezone(dt.timedelta(hours=2))
    parsed = parse_when(dt.datetime(2026, 1, 1, 12, tzinfo=tz))
    assert parsed == dt.datetime(2026, 1, 1, 10, tzinfo=dt.UTC)
    assert parsed.tzinfo is dt.UTC


@pytest.mark.parametrize("value", [dt.datetime(2026, 1, 1, 12), "2026-11-22T10:00:00", "2026-11-22"])
def test_parse_when_rejects_times_without_a_timezone(value: dt.datetime | str) -> None:
    with pytest.raises(DurationError, match="timezone is needed") as info:
        parse_when(value, what="sleep_until")
    assert "sleep_until" in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", ["", "tomorrow", "2026-13-01T00:00:00Z"])
def test_parse_when_rejects_unparseable_strings(value: str) -> None:
    with pytest.raises(DurationError, match="ISO-8601") as info:
        parse_when(value, what="deadline")
    assert f"invalid deadline {value!r}" in str(info.value)


def test_parse_when_rejects_other_types() -> None:
    with pytest.raises(DurationError, match="int"):
        parse_when(1_700_000_000)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.timedelta(0), 0),
        (dt.timedelta(microseconds=1), 1),
        (dt.timedelta(microseconds=999), 1),
        (dt.timedelta(microseconds=1000), 1),
        (dt.timedelta(microseconds=1001), 2),
        (dt.timedelta(seconds=1.5), 1500),
        (dt.timedelta(days=2), 172_800_000),
    ],
)
def test_to_ms_rounds_up_so_a_sleep_is_never_shortened(value: dt.timedelta, expected: int) -> None:
    assert to_ms(value) == expected


def test_from_ms_and_epoch_ms_round_trip_through_aware_utc() -> None:
    when = from_ms(1_700_000_000_123)
    assert when.tzinfo is not None
    assert when.utcoffset() == dt.timedelta(0)
    assert when == dt.datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=dt.UTC)
    assert epoch_ms(when) == 1_700_000_000_123
    assert from_ms(0) == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def test_epoch_ms_truncates_sub_millisecond_digits_and_honours_offsets() -> None:
    tz = dt.timezone(dt.timedelta(hours=1))
    assert epoch_ms(dt.datetime(1970, 1, 1, 1, 0, 0, 1_999, tzinfo=tz)) == 1


def test_epoch_ms_rejects_a_naive_datetime() -> None:
    with pytest.raises(DurationError, match="timezone"):
        epoch_ms(dt.datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.timedelta(0), "0s"),
        (3 * D, "3d"),
        (2 * H + 30 * MIN, "2h 30m"),
        (1500 * MS, "1.5s"),
        (250 * MS, "250ms"),
        (dt.timedelta(microseconds=1500), "1.5ms"),
        (90 * S, "1m 30s"),
        (D + 5 * S, "1d 5s"),
        (-30 * S, "-30s"),
    ],
)
def test_format_duration_is_compact(value: dt.timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    [dt.timedelta(microseconds=1), 999 * MS, dt.timedelta(days=400, seconds=3_661, microseconds=250_001)],
)
def test_format_duration_output_parses_back_to_the_same_duration(value: dt.timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


def test_rfc3339_renders_utc_with_milliseconds_and_z() -> None:
    when = dt.datetime(2026, 11, 22, 11, 0, 0, 123_456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert rfc3339(when) == "2026-11-22T10:00:00.123Z"
    assert rfc3339(dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC)) == "2026-11-22T10:00:00.000Z"


def test_rfc3339_output_is_accepted_by_parse_when() -> None:
    when = dt.datetime(2026, 11, 22, 10, 0, 0, 123_000, tzinfo=dt.UTC)
    assert parse_when(rfc3339(when)) == when


def test_rfc3339_rejects_a_naive_datetime() -> None:
    with pytest.raises(DurationError, match="timezone"):
        rfc3339(dt.datetime(2026, 1, 1))
