"""Cron triggers: what users write for a schedule, and the ticks it fires at.

A trigger string is a cron, as in Inngest: `"0 9 * * MON"` (09:00 UTC every Monday), or with a
time zone first, `"TZ=Europe/Paris 0 9 * * MON"` (09:00 in Paris: 08:00 UTC in winter, 07:00 UTC
in summer). `CRON_TZ=` works as `TZ=` does. Without one the zone is UTC. Zones are IANA names and
case-sensitive; `localtime` and `posixrules` are refused: they name this machine's zone, which the
NATS server need not share.

Syntax: five fields, minute (0-59), hour (0-23), day-of-month (1-31), month (1-12 or JAN-DEC),
day-of-week (0-6 or SUN-SAT; 0 is Sunday). A field is `*` or a comma-separated list of values
(`5`, `MON`), ranges (`1-5`, `MON-FRI`) and steps (`*/15`, `10-50/20`, `5/15` meaning 5-59/15);
`?` is `*` in the day fields; names ignore case. When both day fields are restricted a day that
matches either fires (standard cron); when one is `*`, only the other counts. Macros: `@hourly`,
`@daily` = `@midnight`, `@weekly` (Sunday 00:00), `@monthly`, `@yearly` = `@annually`. Beyond
cron, `@every 30s` fires every 30 seconds (whole seconds, at least one; the ticks are multiples of
the interval since the epoch, in UTC).

Invariant: every cron that parses means the same thing to croniter, which computes ticks here,
and to JetStream's scheduler, which can fire them (`Cron.nats_schedule`). The spellings the two
read differently are rewritten in `Cron.expr`: an equal range (`1-1`, the whole field to croniter)
becomes its one value, and a field that covers its whole range (`*/1`, `0-6`: a `*` to croniter's
day rule but not to JetStream's) becomes `*`.

Rejected, each with a message that says what to write instead: `@reboot` (no machine boots here;
send an event from your startup code); 6 or 7 fields (croniter reads a seconds and a year field,
JetStream reads 6 fields with seconds first: only 5 fields mean one thing); `L`, `W` and `#`
(JetStream does not know them); `H` and `R` (hashed and random values differ between libraries);
ranges that wrap around (`FRI-MON`) and day-of-week 7 (JetStream refuses both); out-of-range
values; unknown zones; crons that never fire (`0 0 30 2 *`).

DST. A tick is a wall-clock time in the zone, converted to an instant:
- Spring forward: a wall-clock time that does not exist that day is skipped; in Paris,
  `30 2 * * *` does not fire on the last Sunday of March. (croniter 7 would fire at 03:00;
  JetStream's own cron skips it, and our ticks must be ones JetStream can fire.)
- Fall back: a wall-clock time that happens twice fires once, the first time, unless the hour
  field is `*`: such a cron (`*/15 * * * *`, `@hourly`) fires in both passes of the repeated
  hour, which is a real hour, so it keeps its rhythm. (croniter 7 and JetStream's scheduler fire
  every cron in both passes; a tick `t` that JetStream fires is one of ours if and only if
  `next_after(t - 1) == t`.)

Pure: no I/O beyond reading the zone database; callers pass in every time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import zoneinfo
from collections.abc import Iterator, Mapping

# Untyped (no stub package installed); pyproject's mypy overrides ignore croniter's missing types.
from croniter import croniter

from meshflow.durations import epoch_ms, from_ms, parse_duration, to_ms
from meshflow.errors import ConfigError

__all__ = ["Cron", "is_cron", "parse_cron"]

_MACROS: Mapping[str, str] = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
# JetStream knows all seven; one spelling per schedule keeps its header stable.
_NATS_MACROS: Mapping[str, str] = {**{m: m for m in _MACROS}, "@midnight": "@daily", "@annually": "@yearly"}
_MACHINE_ZONES = frozenset({"localtime", "posixrules"})
_EXAMPLE = "like '0 9 * * MON' or 'TZ=Europe/Paris 0 9 * * MON'"
_FIELD_NAMES = "minute hour day-of-month month day-of-week"


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: Mapping[str, int] = dataclasses.field(default_factory=dict)


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, {n: i for i, n in enumerate(_MONTHS, start=1)}),
    _Field("day-of-week", 0, 6, {n: i for i, n in enumerate(_WEEKDAYS)}),
)
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February: leap years fire
_ITEM = re.compile(r"(?:(?P<star>\*)|(?P<lo>[0-9a-z]+)(?:-(?P<hi>[0-9a-z]+))?)(?:/(?P<step>[0-9]+))?")


@dataclasses.dataclass(frozen=True)
class Cron:
    """A validated cron trigger. Build one with `parse_cron`.

    Attributes:
        source: the trigger string as the user wrote it.
        expr: the five fields, single-spaced, macros expanded (`"@daily"` is `"0 0 * * *"`).
        tz: the IANA time zone the fields are read in, `"UTC"` unless the source named one.
    """

    source: str
    expr: str
    tz: str = "UTC"
    every_ms: int = 0  # for "@every 30s": the interval; ticks are its multiples since the epoch

    def next_after(self, after_ms: int) -> int:
        """The first tick strictly after a point in time, by the DST rules in the module docstring.

        Args:
            after_ms: the point in time, in epoch milliseconds.

        Returns:
            The tick, in epoch milliseconds.
        """
        if self.every_ms:
            return (after_ms // self.every_ms + 1) * self.every_ms
        wall = from_ms(after_ms).astimezone(self._zone()).replace(tzinfo=None)
        minute = wall.replace(second=0, microsecond=0)
        first, second = self._passes(wall)
        best: int | None = None
        if self._every_hour() and after_ms == first < second:
            # `after` is in the first pass of a repeated hour: the second pass of an earlier wall
            # time may come before the next first-pass tick.
            for earlier in self._walls_after(minute - dt.timedelta(milliseconds=second - first)):
                if earlier > minute:
                    break
                passes = self._passes(earlier)
                if passes[0] < passes[1]:
                    best = passes[1]
                    break
        for later in self._walls_after(minute):
            ticks = [t for t in self._ticks(later) if t > after_ms]
            if ticks:
                return ticks[0] if best is None else min(ticks[0], best)
        raise AssertionError("unreachable: croniter's iteration never ends")  # pragma: no cover

    def ticks_between(self, after_ms: int, until_ms: int, limit: int = 1000) -> list[int]:
        """The ticks in a window of time, earliest first.

        Args:
            after_ms: the start of the window (epoch milliseconds), not included.
            until_ms: the end of the window, included.
            limit: the most ticks to return; the earliest ones are kept.

        Returns:
            The ticks t with `after_ms < t <= until_ms`, in epoch milliseconds.
        """
        ticks: list[int] = []
        tick = after_ms
        while len(ticks) < limit:
            tick = self.next_after(tick)
            if tick > until_ms:
                break
            ticks.append(tick)
        return ticks

    def nats_schedule(self) -> tuple[str, str]:
        """The header values of a JetStream message schedule that fires this cron.

        JetStream's cron has six fields, seconds first, so the five get a leading `"0 "`; macros
        keep their JetStream name (`@midnight` is sent as `@daily`, `@annually` as `@yearly`).
        On DST days JetStream fires a few ticks `next_after` does not (see the module docstring).

        Returns:
            The `Nats-Schedule` value, like `"0 0 9 * * MON"` or `"@daily"`, and the
            `Nats-Schedule-Time-Zone` value, like `"Europe/Paris"` or `"UTC"`.
        """
        if self.every_ms:
            return (self.expr, self.tz)
        macro = _NATS_MACROS.get(self.source.split()[-1].lower())
        return (macro or f"0 {self.expr}", self.tz)

    def _zone(self) -> dt.tzinfo:
        # ZoneInfo caches its instances, so building one per call is cheap.
        return dt.UTC if self.tz == "UTC" else zoneinfo.ZoneInfo(self.tz)

    def _every_hour(self) -> bool:
        # `parse_cron` writes any hour field that covers the whole day as `*`.
        return self.expr.split()[1] == "*"

    def _walls_after(self, start: dt.datetime) -> Iterator[dt.datetime]:
        # Naive wall-clock times: croniter never sees a zone, so its own DST handling never runs.
        it = croniter(self.expr, start)
        while True:
            wall: dt.datetime = it.get_next(dt.datetime)
            yield wall

    def _passes(self, wall: dt.datetime) -> tuple[int, int]:
        # Equal for an ordinary wall time, first < second for a repeated one, first > second in a gap.
        zone = self._zone()
        return epoch_ms(wall.replace(tzinfo=zone, fold=0)), epoch_ms(wall.replace(tzinfo=zone, fold=1))

    def _ticks(self, wall: dt.datetime) -> list[int]:
        first, second = self._passes(wall)
        if first > second:
            return []  # the clocks jumped over this wall time
        if first < second and self._every_hour():
            return [first, second]
        return [first]


def _unsupported(spec: _Field, item: str) -> str:
    """Why `item`, which is not a value, range or step, is refused: the message's reason part."""
    lowered = item.lower()
    if re.fullmatch(r"[hr](\(.*\))?(/.*)?", lowered):
        return (
            f"{spec.name} {item!r}: 'H' and 'R' (hashed and random values) are computed differently "
            "by each cron library; write a fixed value"
        )
    day_extension = re.fullmatch(r"[0-9]*l[0-9]*|l?w[0-9]*|[0-9]+w", lowered)
    if "#" in lowered or (spec.name.startswith("day") and day_extension):
        return (
            f"{spec.name} {item!r}: 'L', 'W' and '#' (last, nearest weekday, nth weekday) are not "
            "supported by JetStream's scheduler; list the days instead"
        )
    if "?" in lowered:
        return f"{spec.name} {item!r}: '?' stands alone, and only in the day fields; use '*'"
    names = list(spec.names)
    named = f" or {names[0].upper()}-{names[-1].upper()}" if names else ""
    return (
        f"{spec.name} {item!r} is not understood; use numbers {spec.low}-{spec.high}{named}, '*', "
        "ranges (1-5), lists (1,3) and steps (*/15)"
    )


def _value(spec: _Field, token: str, item: str) -> int:
    value = int(token) if token.isdigit() else spec.names.get(token)
    if value is None:
        raise ValueError(_unsupported(spec, item))
    if not spec.low <= value <= spec.high:
        hint = " (use 0 or SUN for Sunday)" if spec.name == "day-of-week" and value == 7 else ""
        raise ValueError(f"{spec.name} {value} is out of range {spec.low}-{spec.high}{hint}")
    return value


def _parse_field(spec: _Field, text: str) -> tuple[str, frozenset[int]]:
    """The field as croniter and JetStream both read it, and the values it matches."""
    whole = frozenset(range(spec.low, spec.high + 1))
    if text == "*" or (text == "?" and spec.name.startswith("day")):
        return text, whole
    written: list[str] = []
    values: set[int] = set()
    for item in text.split(","):
        match = _ITEM.fullmatch(item.lower())
        if match is None:
            raise ValueError(_unsupported(spec, item))
        step = int(match["step"] or 1)
        if step == 0:
            raise ValueError(f"{spec.name} {item!r}: a step must be 1 or more")
        if match["star"]:
            lo, hi = spec.low, spec.high
        else:
            lo = _value(spec, match["lo"], item)
            # "5/15" runs from 5 to the end of the field, as "5-59/15" does.
            hi = _value(spec, match["hi"], item) if match["hi"] else spec.high if match["step"] else lo
            if lo > hi:
                raise ValueError(
                    f"{spec.name} range {item!r} wraps around, which JetStream refuses; "
                    f"split it in two, like '{lo}-{spec.high},{spec.low}-{hi}'"
                )
        matched = range(lo, hi + 1, step)
        # croniter reads an equal range ("1-1") as the whole field: write a single value as itself.
        written.append(str(lo) if len(matched) == 1 and item.lower() != match["lo"] else item)
        values.update(matched)
    if values == whole:
        # In the day fields `0-6` or `*/1` is a `*` to croniter but not to JetStream, which then
        # reads the two day fields differently; `*` means the same to both.
        return "*", whole
    return ",".join(written), frozenset(values)


def _zone_problem(tz: str) -> str | None:
    """Why `tz` is refused, or None if it is a usable zone name."""
    if not tz:
        return f"'TZ=' names no time zone; write one, {_EXAMPLE}"
    if tz in _MACHINE_ZONES:
        return (
            f"time zone {tz!r} is this machine's zone, which the NATS server may not share; "
            "use an IANA name like 'Europe/Paris'"
        )
    if tz != "UTC":
        try:
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            return (
                f"unknown time zone {tz!r}; use an IANA name like 'Europe/Paris' or 'UTC' "
                "(names are case-sensitive)"
            )
    return None


def _expression(text: str) -> str:
    """The five fields of `text` (a macro or a cron without its zone), or ValueError(reason)."""
    lowered = text.lower()
    if lowered == "@reboot":
        raise ValueError(
            "@reboot would never fire: no machine boots here; to run something when your app starts, "
            "send an event from its startup code"
        )
    if lowered.startswith("@"):
        if lowered not in _MACROS:
            raise ValueError(f"unknown macro {text!r}; use one of {', '.join(_MACROS)}")
        return _MACROS[lowered]
    fields = text.split()
    if len(fields) != len(_FIELDS):
        extra = {6: " (no seconds field)", 7: " (no seconds or year field)"}.get(len(fields), "")
        raise ValueError(f"it has {len(fields)} fields, but a cron has 5{extra}: {_FIELD_NAMES}, {_EXAMPLE}")
    parsed = [_parse_field(spec, field) for spec, field in zip(_FIELDS, fields, strict=True)]
    (_, days), (_, months), (weekdays, _) = parsed[2:]
    # With day-of-week `*` only the days of the month count, and one of them must exist.
    if weekdays in ("*", "?") and not any(d <= _DAYS_IN_MONTH[m - 1] for d in days for m in months):
        raise ValueError(f"it never fires: none of the months it names has a day {min(days)}")
    return " ".join(written for written, _ in parsed)


def parse_cron(source: object, *, what: str) -> Cron:
    """Check a cron trigger string and return it as a `Cron`.

    Args:
        source: what the user wrote, like `"0 9 * * MON"`, `"TZ=Europe/Paris 0 9 * * MON"` or
            `"@daily"`. The accepted syntax is in this module's docstring.
        what: what the trigger belongs to, the start of every error message (`"function 'digest'"`).

    Returns:
        The parsed cron.

    Raises:
        ConfigError: `source` is not a string, or not a cron meshflow can run; the message says why.
    """
    if not isinstance(source, str):
        raise ConfigError(f"{what}: cron trigger {source!r} is invalid: use a string {_EXAMPLE}")
    tz, text = "UTC", source.strip()
    words = text.split(maxsplit=1)
    if words and words[0].startswith(("TZ=", "CRON_TZ=")):
        tz, text = words[0].partition("=")[2], words[1] if len(words) == 2 else ""
    reason = _zone_problem(tz)
    if reason is None and text.startswith("@every"):
        return _every(source, text, what)
    if reason is None and not text:
        reason = f"{'nothing follows the time zone' if words else 'it is empty'}; write a cron {_EXAMPLE}"
    if reason is None:
        try:
            return Cron(source=source, expr=_expression(text), tz=tz)
        except ValueError as exc:
            reason = str(exc)
    raise ConfigError(f"{what}: cron trigger {source!r} is invalid: {reason}")


def _every(source: str, text: str, what: str) -> Cron:
    """``@every <duration>``: a fixed interval of at least a second (JetStream's own minimum)."""
    try:
        interval = parse_duration(text.removeprefix("@every").strip(), what=f"{what}: @every")
    except ConfigError as exc:
        raise ConfigError(f"{what}: cron trigger {source!r} is invalid: {exc}") from None
    ms = to_ms(interval)
    if ms < 1000 or ms % 1000:
        raise ConfigError(
            f"{what}: cron trigger {source!r} is invalid: @every takes whole seconds, at least 1s"
        )
    return Cron(source=source, expr=f"@every {ms // 1000}s", every_ms=ms)


def is_cron(source: str) -> bool:
    """Whether a trigger string is meant as a cron rather than an event name (a cheap look, no parse).

    Event names contain no whitespace and no `*`, so a cron is a string that starts with `TZ=`,
    `CRON_TZ=` or `@`, or has more than one word and starts with a digit or `*`. `"2fa/requested"`
    is one word: an event name.
    """
    text = source.strip()
    if text.startswith(("TZ=", "CRON_TZ=", "@")):
        return True
    words = text.split(maxsplit=1)
    return len(words) == 2 and words[0][0] in "0123456789*"
