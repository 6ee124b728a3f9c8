"""Flow-control settings as users write them, and their checked form.

Users pass ``meshflow.Concurrency``, ``Throttle``, ``RateLimit``, ``Debounce``, ``Batch``,
``Priority`` and ``Singleton`` to ``@app.function``; `check` validates them when the function is
registered (durations, limits, CEL keys, combinations Inngest also refuses) and returns the
checked specs the worker uses.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from ..durations import parse_duration, to_ms
from ..errors import ConfigError
from ..expressions import Expression, compile_expression
from . import ratelimit

Duration = dt.timedelta | float | str

#: The controls the worker enforces (the others are refused at registration until they are).
ENFORCED = frozenset({"throttle", "rate_limit", "singleton", "debounce", "batch", "concurrency", "priority"})


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` steps of this function execute at once (per ``key`` value, if given).

    ``scope="env"`` shares the limit with every function using the same ``key`` expression
    in the namespace. Sleeping and waiting runs hold no slot.
    """

    limit: int
    key: str | None = None
    scope: str = "fn"


@dataclass(frozen=True)
class Throttle:
    """At most ``limit`` runs start per ``period`` (``burst`` at once); the rest start later."""

    limit: int
    period: Duration
    burst: int = 1
    key: str | None = None


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` runs start per ``period``; the rest are skipped (recorded as such)."""

    limit: int
    period: Duration
    key: str | None = None


@dataclass(frozen=True)
class Debounce:
    """Start one run ``period`` after the last event (per key), at most ``timeout`` after the first.

    The run gets the last event; ``all_events=True`` gives it every debounced event (``ctx.events``).
    """

    period: Duration
    key: str | None = None
    timeout: Duration | None = None
    all_events: bool = False


@dataclass(frozen=True)
class Batch:
    """One run per up to ``max_size`` events (per key), started when full or ``timeout`` after the first."""

    max_size: int
    timeout: Duration
    key: str | None = None


@dataclass(frozen=True)
class Priority:
    """``run``: a CEL expression giving seconds a run jumps ahead (positive) or behind (negative)."""

    run: str


@dataclass(frozen=True)
class Singleton:
    """One run at a time per ``key``: a new one is skipped (``"skip"``) or replaces it (``"cancel"``)."""

    key: str | None = None
    mode: str = "skip"


@dataclass(frozen=True)
class Limit:
    """A checked rate limit, throttle or concurrency constraint."""

    limit: int
    period_ms: int = 0
    burst: int = 1
    key: Expression | None = None
    scope: str = "fn"


@dataclass(frozen=True)
class Window:
    """A checked debounce or batch."""

    period_ms: int
    timeout_ms: int | None
    key: Expression | None
    max_size: int = 0
    all_events: bool = False


@dataclass(frozen=True)
class FlowSpec:
    """Every flow control of one function, checked."""

    concurrency: tuple[Limit, ...] = ()
    throttle: Limit | None = None
    rate_limit: Limit | None = None
    debounce: Window | None = None
    batch: Window | None = None
    priority: Expression | None = None
    singleton: tuple[Expression | None, str] | None = None

    def describe(self) -> list[str]:
        """One line per control, for the registry (the dashboard's functions page)."""

        def key(expr: Expression | None) -> str:
            return f" per {expr.source}" if expr is not None else ""

        lines = [
            f"concurrency {c.limit}{key(c.key)}{' (env)' if c.scope == 'env' else ''}"
            for c in self.concurrency
        ]
        if self.throttle:
            t = self.throttle
            lines.append(f"throttle {t.limit} per {t.period_ms} ms, burst {t.burst}{key(t.key)}")
        if self.rate_limit:
            r = self.rate_limit
            lines.append(f"rate limit {r.limit} per {r.period_ms} ms{key(r.key)}")
        if self.debounce:
            d = self.debounce
            timeout = f", at most {d.timeout_ms} ms" if d.timeout_ms else ""
            lines.append(
                f"debounce {d.period_ms} ms{timeout}{key(d.key)}{', all events' if d.all_events else ''}"
            )
        if self.batch:
            b = self.batch
            lines.append(f"batch of {b.max_size} or {b.period_ms} ms{key(b.key)}")
        if self.priority is not None:
            lines.append(f"priority {self.priority.source}")
        if self.singleton is not None:
            lines.append(f"singleton ({self.singleton[1]}){key(self.singleton[0])}")
        return lines

    @property
    def gated(self) -> bool:
        """Whether a run's start depends on anything but its event."""
        return bool(self.throttle or self.rate_limit or self.debounce or self.batch or self.singleton)


def _key(source: str | None, what: str) -> Expression | None:
    if source is None:
        return None
    return compile_expression(source, variables=("event",), what=f"{what} key")


def _count(value: object, what: str, *, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ConfigError(f"{what} must be a whole number from 1 to {high}, got {value!r}")
    return value


def _ms(value: Duration, what: str) -> int:
    ms = to_ms(parse_duration(value, what=what))
    if ms <= 0:
        raise ConfigError(f"{what} must be longer than zero")
    return ms


def check(
    fn: str,
    *,
    concurrency: Concurrency | Sequence[Concurrency] | None = None,
    throttle: Throttle | None = None,
    rate_limit: RateLimit | None = None,
    debounce: Debounce | None = None,
    batch: Batch | None = None,
    priority: Priority | None = None,
    singleton: Singleton | None = None,
    has_idempotency: bool = False,
    has_cancel_on: bool = False,
) -> FlowSpec:
    """Validate a function's flow controls; `ConfigError` naming the function and the fix."""
    what = f"function {fn!r}"
    spec = FlowSpec(
        concurrency=_concurrency(concurrency, what) if concurrency is not None else (),
        throttle=_throttle(throttle, f"{what} throttle") if throttle is not None else None,
        rate_limit=_rate_limit(rate_limit, f"{what} rate_limit") if rate_limit is not None else None,
        debounce=_debounce(debounce, f"{what} debounce") if debounce is not None else None,
        batch=_batch(batch, f"{what} batch") if batch is not None else None,
        priority=(
            compile_expression(priority.run, variables=("event",), what=f"{what} priority run")
            if priority is not None
            else None
        ),
        singleton=_singleton(singleton, f"{what} singleton") if singleton is not None else None,
    )
    _refuse_combinations(what, spec, has_idempotency=has_idempotency, has_cancel_on=has_cancel_on)
    for name, present in (
        ("concurrency", spec.concurrency),
        ("debounce", spec.debounce),
        ("batch", spec.batch),
        ("priority", spec.priority),
    ):
        if present and name not in ENFORCED:
            raise ConfigError(
                f"{what}: {name} is checked but not enforced by this version of meshflow yet; "
                "remove it rather than rely on it"
            )
    return spec


def _concurrency(value: Concurrency | Sequence[Concurrency], what: str) -> tuple[Limit, ...]:
    items = [value] if isinstance(value, Concurrency) else list(value)
    if not 1 <= len(items) <= 2 or not all(isinstance(c, Concurrency) for c in items):
        raise ConfigError(f"{what}: concurrency takes one or two meshflow.Concurrency(limit=..., key=...)")
    limits = []
    for i, c in enumerate(items):
        w = f"{what} concurrency[{i}]"
        if c.scope not in ("fn", "env"):
            raise ConfigError(f"{w}: scope must be 'fn' or 'env', got {c.scope!r}")
        if c.scope == "env" and c.key is None:
            raise ConfigError(f"{w}: scope='env' needs a key (the limit is shared by that key's value)")
        limits.append(
            Limit(limit=_count(c.limit, f"{w} limit", high=10_000), key=_key(c.key, w), scope=c.scope)
        )
    return tuple(limits)


def _throttle(value: Throttle, what: str) -> Limit:
    return Limit(
        limit=_count(value.limit, f"{what} limit", high=1_000_000),
        period_ms=_ms(value.period, f"{what} period"),
        burst=_count(value.burst, f"{what} burst", high=1_000_000),
        key=_key(value.key, what),
    )


def _rate_limit(value: RateLimit, what: str) -> Limit:
    return Limit(
        limit=_count(value.limit, f"{what} limit", high=ratelimit.MAX_LIMIT),
        period_ms=_ms(value.period, f"{what} period"),
        key=_key(value.key, what),
    )


def _debounce(value: Debounce, what: str) -> Window:
    period = _ms(value.period, f"{what} period")
    timeout = None if value.timeout is None else _ms(value.timeout, f"{what} timeout")
    if timeout is not None and timeout < period:
        raise ConfigError(f"{what}: timeout must be at least the period")
    return Window(period, timeout, _key(value.key, what), all_events=bool(value.all_events))


def _batch(value: Batch, what: str) -> Window:
    return Window(
        _ms(value.timeout, f"{what} timeout"),
        None,
        _key(value.key, what),
        max_size=_count(value.max_size, f"{what} max_size", high=1000),
    )


def _singleton(value: Singleton, what: str) -> tuple[Expression | None, str]:
    if value.mode not in ("skip", "cancel"):
        raise ConfigError(f"{what}: mode must be 'skip' or 'cancel', got {value.mode!r}")
    return _key(value.key, what), value.mode


def _refuse_combinations(what: str, spec: FlowSpec, *, has_idempotency: bool, has_cancel_on: bool) -> None:
    if spec.batch is not None:
        clash = [
            name
            for name, present in (
                ("idempotency", has_idempotency),
                ("rate_limit", spec.rate_limit is not None),
                ("cancel_on", has_cancel_on),
                ("priority", spec.priority is not None),
                ("debounce", spec.debounce is not None),
                ("singleton", spec.singleton is not None),
            )
            if present
        ]
        if clash:
            raise ConfigError(
                f"{what}: batch cannot be combined with {', '.join(clash)}: a batched run starts from many "
                "events, so per-event keys, limits and cancellation have no single event to apply to"
            )
    if spec.singleton is not None and spec.concurrency:
        raise ConfigError(f"{what}: singleton already allows one run at a time; drop concurrency")
    if spec.priority is not None and not spec.concurrency:
        raise ConfigError(
            f"{what}: priority orders the runs waiting for a concurrency slot; without concurrency no run "
            "waits, so add concurrency=meshflow.Concurrency(...) or drop priority"
        )
