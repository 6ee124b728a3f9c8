"""Durations and points in time: parsing what users write, and the wire forms NATS needs.

Invariants:

- Every duration this module returns is a non-negative `timedelta`; every point in time is an
  aware `datetime` in UTC. Naive datetimes are refused rather than guessed at.
- Converting a duration to milliseconds rounds up, so a sleep is never shortened.
- Parsing is exact: string amounts go through `Decimal`, so `"0.1s"` is 100 ms, not 99.999 ms.
- Pure: no I/O, no clock reads; callers pass in every value.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from decimal import ROUND_CEILING, Decimal

from meshflow.errors import DurationError

__all__ = ["epoch_ms", "format_duration", "from_ms", "parse_duration", "parse_when", "rfc3339", "to_ms"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

_US_PER_MS = 1_000
_US_PER_S = 1_000_000
_ONE_US = dt.timedelta(microseconds=1)
_ONE_MS = dt.timedelta(milliseconds=1)

# Unit name -> microseconds. Keys are lower case; parsing folds case first.
_UNITS: dict[str, int] = {
    name: us
    for names, us in (
        (("ms", "millisecond", "milliseconds"), _US_PER_MS),
        (("s", "sec", "secs", "second", "seconds"), _US_PER_S),
        (("m", "min", "mins", "minute", "minutes"), 60 * _US_PER_S),
        (("h", "hr", "hrs", "hour", "hours"), 3_600 * _US_PER_S),
        (("d", "day", "days"), 86_400 * _US_PER_S),
        (("w", "week", "weeks"), 7 * 86_400 * _US_PER_S),
    )
    for name in names
}

# One "amount unit" term, optionally followed by a comma ("1 day, 2 hours").
# [0-9], not \d: \d would also accept digits of other scripts.
_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_TERM = re.compile(rf"\s*(?P<num>{_NUMBER})\s*(?P<unit>[a-z]+)\s*,?")
_BARE_NUMBER = re.compile(_NUMBER)

_DURATION_HINT = 'use a number with a unit, like "30s", "15m", "2h", "3 days"'
_WHEN_HINT = 'use an aware datetime or an ISO-8601 string with a timezone, like "2026-11-22T10:00:00Z"'
_TOO_LONG = "too long; the limit is 999999999 days"


def _duration_error(value: object, what: str, reason: str = _DURATION_HINT) -> DurationError:
    # The default `what` already says "duration"; repeating it ("... for duration") reads badly.
    where = "" if what == "duration" else f" for {what}"
    return DurationError(f"invalid duration {value!r}{where}: {reason}")


def _parse_duration_str(value: str, what: str) -> dt.timedelta:
    text = value.strip().lower()
    if text.startswith("-"):
        raise _duration_error(value, what, "durations cannot be negative")
    if _BARE_NUMBER.fullmatch(text):
        text += "s"  # a bare number means seconds, as an int or float argument does
    total = Decimal(0)
    pos = 0
    while pos < len(text):
        match = _TERM.match(text, pos)
        if match is None or match.group("unit") not in _UNITS:
            raise _duration_error(value, what)
        total += Decimal(match.group("num")) * _UNITS[match.group("unit")]
        pos = match.end()
    # `pos == 0`: nothing but whitespace. A dangling comma means something is missing.
    if pos == 0 or text.endswith(","):
        raise _duration_error(value, what)
    try:
        # Sub-microsecond remainders round up, as `to_ms` does: never shorten a wait.
        return dt.timedelta(microseconds=int(total.to_integral_value(ROUND_CEILING)))
    except OverflowError:
        raise _duration_error(value, what, _TOO_LONG) from None


def parse_duration(value: dt.timedelta | int | float | str, *, what: str = "duration") -> dt.timedelta:
    """Turn what a user wrote for a duration into a non-negative `timedelta`.

    Args:
        value: a `timedelta`; a number of seconds (`int` or `float`); or a string of one or more
            number-unit terms, like `"30s"`, `"1h30m"`, `"1 day 2 hours"`, `"1.5h"`, `"500ms"`.
            Units (case-insensitive): ms/millisecond(s), s/sec(s)/second(s), m/min(s)/minute(s),
            h/hr(s)/hour(s), d/day(s), w/week(s). A bare number string means seconds. Terms may
            be run together or separated by spaces or commas.
        what: what the duration is for, named in the error message (`"sleep"`, `"timeout"`).

    Returns:
        The duration as a `timedelta` (zero or more).

    Raises:
        DurationError: the value is negative, not finite, of the wrong type, or unparseable.
    """
    # Typed callers cannot pass anything else, but config files and untyped code can.
    obj: object = value
    if isinstance(obj, dt.timedelta):
        if obj < dt.timedelta(0):
            raise _duration_error(obj, what, "durations cannot be negative")
        return obj
    if isinstance(obj, str):
        return _parse_duration_str(obj, what)
    # bool is an int subclass; `sleep(True)` is a bug, not one second.
    if isinstance(obj, bool) or not isinstance(obj, int | float):
        raise _duration_error(obj, what, f"got a {type(obj).__name__}; {_DURATION_HINT}")
    if not math.isfinite(obj):
        raise _duration_error(obj, what, "use a finite number of seconds")
    if obj < 0:
        raise _duration_error(obj, what, "durations cannot be negative")
    try:
        # A float is already inexact, so the nearest microsecond (timedelta's rounding) is right;
        # ceiling its binary expansion would turn 0.1 s into 100.001 ms.
        return dt.timedelta(seconds=obj)
    except OverflowError:
        raise _duration_error(obj, what, _TOO_LONG) from None


def _when_error(value: object, what: str, reason: str) -> DurationError:
    return DurationError(f"invalid {what} {value!r}: {reason}")


def parse_when(value: dt.datetime | str, *, what: str = "time") -> dt.datetime:
    """Turn what a user wrote for a point in time into an aware UTC `datetime`.

    Args:
        value: an aware `datetime`, or an ISO-8601 string with an offset or a trailing `Z`,
            like `"2026-11-22T10:00:00Z"` or `"2026-11-22T10:00:00.123+01:00"`.
        what: what the time is for, named in the error message.

    Returns:
        The same instant as an aware `datetime` in UTC.

    Raises:
        DurationError: the value has no timezone, is of the wrong type, or is unparseable.
    """
    obj: object = value  # typed callers cannot pass anything else; untyped ones can
    if isinstance(obj, str):
        try:
            parsed = dt.datetime.fromisoformat(obj.strip())
        except ValueError:
            raise _when_error(obj, what, _WHEN_HINT) from None
    elif isinstance(obj, dt.datetime):
        parsed = obj
    else:
        raise _when_error(obj, what, f"got a {type(obj).__name__}; {_WHEN_HINT}")
    # A tzinfo whose utcoffset() is None is naive in all but name.
    if parsed.utcoffset() is None:
        raise _when_error(value, what, f"a timezone is needed; {_WHEN_HINT}")
    return parsed.astimezone(dt.UTC)


def _require_aware(when: dt.datetime) -> None:
    if when.utcoffset() is None:
        raise _when_error(when, "time", f"a timezone is needed; {_WHEN_HINT}")


def now_ms() -> int:
    """The wall clock in epoch milliseconds (the one clock meshflow stores times in)."""
    return time.time_ns() // 1_000_000


def to_ms(value: dt.timedelta) -> int:
    """Whole milliseconds in `value`, rounded up so a sleep is never shortened.

    Args:
        value: the duration.

    Returns:
        The duration in milliseconds; 1 µs becomes 1 ms.
    """
    # timedelta // timedelta is exact integer arithmetic; negating twice turns floor into ceiling.
    return -(-value // _ONE_MS)


def from_ms(ms: int) -> dt.datetime:
    """The aware UTC `datetime` that is `ms` milliseconds after the Unix epoch.

    Args:
        ms: milliseconds since 1970-01-01T00:00:00Z.

    Returns:
        An aware `datetime` in UTC.
    """
    # Adding to the epoch is exact; datetime.fromtimestamp goes through a float.
    return _EPOCH + dt.timedelta(milliseconds=ms)


def epoch_ms(when: dt.datetime) -> int:
    """Milliseconds since the Unix epoch, truncated like every Unix timestamp.

    Args:
        when: an aware `datetime`.

    Returns:
        Whole milliseconds since 1970-01-01T00:00:00Z, rounded down.

    Raises:
        DurationError: `when` is naive.
    """
    _require_aware(when)
    return (when - _EPOCH) // _ONE_MS


def ms_at(when: dt.datetime) -> int:
    """Epoch milliseconds of ``when``, rounded *up*: a wake time between two milliseconds must
    not wake early (`epoch_ms` rounds down, as timestamps do)."""
    _require_aware(when)
    return -(-(when - _EPOCH) // _ONE_MS)


def _trim(number: Decimal) -> str:
    text = f"{number:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_duration(value: dt.timedelta) -> str:
    """A compact human form of a duration that `parse_duration` reads back unchanged.

    Args:
        value: the duration.

    Returns:
        Text like `"3d"`, `"2h 30m"`, `"1.5s"`, `"250ms"` or `"0s"`; negative durations get a `-`.
    """
    if value < dt.timedelta(0):
        return "-" + format_duration(-value)
    total_us = value // _ONE_US
    if total_us == 0:
        return "0s"
    if total_us < _US_PER_S:
        return f"{_trim(Decimal(total_us) / _US_PER_MS)}ms"
    parts: list[str] = []
    rest = total_us
    for unit, size in (("d", 86_400 * _US_PER_S), ("h", 3_600 * _US_PER_S), ("m", 60 * _US_PER_S)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    if rest:
        parts.append(f"{_trim(Decimal(rest) / _US_PER_S)}s")
    return " ".join(parts)


def rfc3339(when: dt.datetime) -> str:
    """`when` in UTC as RFC 3339 with milliseconds and a `Z`, e.g. `"2026-11-22T10:00:00.123Z"`.

    This is the form of the `Nats-Schedule: @at ...` header. Sub-millisecond digits are dropped,
    as `epoch_ms` drops them.

    Args:
        when: an aware `datetime`.

    Returns:
        The formatted instant.

    Raises:
        DurationError: `when` is naive.
    """
    _require_aware(when)
    u = when.astimezone(dt.UTC)
    return (
        f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}"
        f".{u.microsecond // 1000:03d}Z"
    )
