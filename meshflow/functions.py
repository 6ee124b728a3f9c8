"""Functions: the ``App`` registry, the ``@app.function`` decorator, triggers and config.

Config is validated when a function is registered, so a bad trigger or retry policy fails at import
time with a message that names the function. An app holds its functions; there is no global
registry.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from .cron import Cron, parse_cron
from .durations import parse_duration, to_ms
from .errors import ConfigError, EventError
from .events import Event, validate_event_name
from .expressions import Expression, compile_expression, compile_match
from .flow.config import Batch, Concurrency, Debounce, FlowSpec, Priority, RateLimit, Singleton, Throttle
from .flow.config import check as check_flow
from .ids import is_ulid, run_id_for, ulid_time_ms, validate_id
from .names import EVENT_FUNCTION_FAILED
from .retries import Retry, retry_policy

if TYPE_CHECKING:
    from .steps import Context

Handler = Callable[["Context"], Awaitable[Any]]
Duration = dt.timedelta | float | str


@dataclass(frozen=True)
class TriggerEvent:
    """An event trigger with an optional CEL filter.

    Attributes:
        event: the event name, or a prefix wildcard like ``"app/*"``.
        if_: a CEL condition over ``event`` (the incoming event), like
            ``"event.data.total > 100"``; the function runs only when it is true.
    """

    event: str
    if_: str | None = None


@dataclass(frozen=True)
class TriggerCron:
    """A schedule: a 5-field cron with an optional ``TZ=`` prefix (``"TZ=Europe/Paris 0 9 * * MON"``),
    a macro (``"@daily"``), or ``"@every 30s"``. Exactly one run per tick, however many workers run."""

    cron: str


@dataclass(frozen=True)
class Cancel:
    """Cancel a run when an event arrives.

    Attributes:
        event: the event name that cancels.
        match: a path like ``"data.userId"``: the event's value there must equal the triggering
            event's.
        if_: a CEL condition over ``event`` (the trigger) and ``async`` (the cancelling event).
        timeout: stop listening after this long (default: for as long as the run lasts).
    """

    event: str
    match: str | None = None
    if_: str | None = None
    timeout: Duration | None = None


@dataclass(frozen=True)
class Timeouts:
    """Cancel a run not started within ``start`` or not finished within ``finish`` of its creation."""

    start: Duration | None = None
    finish: Duration | None = None


class CancelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A validated `Cancel`."""

    event: str
    match: str | None = None
    if_: str | None = None
    timeout_ms: int | None = None


def _event_filters(patterns: Sequence[object], fn: str) -> tuple[tuple[str, Expression | None], ...]:
    out: list[tuple[str, Expression | None]] = []
    for p in patterns:
        if isinstance(p, TriggerEvent):
            pattern = _validate_trigger(p.event, fn=fn)
            expr = None
            if p.if_ is not None:
                expr = compile_expression(p.if_, variables=("event",), what=f"function {fn!r}: trigger if_")
            out.append((pattern, expr))
        elif not isinstance(p, TriggerCron):
            out.append((_validate_trigger(p, fn=fn), None))
    return tuple(out)


def _cancel_specs(cancel_on: Sequence[Cancel], fn: str) -> tuple[CancelSpec, ...]:
    specs = []
    for i, c in enumerate(cancel_on):
        what = f"function {fn!r}: cancel_on[{i}]"
        if not isinstance(c, Cancel):
            raise ConfigError(f"{what}: use meshflow.Cancel(event=..., match=...), got {c!r}")
        try:
            validate_event_name(c.event)
        except EventError as exc:
            raise ConfigError(f"{what}: {exc}") from None
        if c.match is not None:
            compile_match(c.match, what=f"{what} match")
        if c.if_ is not None:
            compile_expression(c.if_, variables=("event", "async"), what=f"{what} if_")
        timeout = None if c.timeout is None else to_ms(parse_duration(c.timeout, what=f"{what} timeout"))
        specs.append(CancelSpec(event=c.event, match=c.match, if_=c.if_, timeout_ms=timeout))
    return tuple(specs)


def _timeout_ms(value: Duration | None, what: str) -> int | None:
    return None if value is None else to_ms(parse_duration(value, what=what))


def _validate_trigger(pattern: object, *, fn: str) -> str:
    if not isinstance(pattern, str):
        raise ConfigError(
            f"function {fn!r}: a trigger must be an event name, a TriggerEvent or a TriggerCron, "
            f"got {pattern!r}"
        )
    name = pattern[:-1] if pattern.endswith("*") else pattern
    if pattern.endswith("*"):
        if not (name.endswith("/") or name.endswith(".")) or len(name) < 2:
            raise ConfigError(
                f"function {fn!r}: invalid trigger {pattern!r}: a wildcard must end a prefix "
                "that ends in '/' or '.', like 'app/*' or 'app/user.*'"
            )
        name = name[:-1]
    try:
        validate_event_name(name)
    except EventError as exc:
        raise ConfigError(f"function {fn!r}: invalid trigger {pattern!r}: {exc}") from None
    return pattern


def trigger_matches(pattern: str, event_name: str) -> bool:
    """Whether an event name matches a trigger (exact, or a prefix wildcard like ``app/*``)."""
    if pattern.endswith("*"):
        return event_name.startswith(pattern[:-1]) and len(event_name) > len(pattern) - 1
    return event_name == pattern


@dataclass(frozen=True, eq=False)
class Function:
    """A registered function. Call it directly only in tests; workers run it from events.

    Attributes:
        app_id: the id of the app it belongs to.
        id: its id within the app.
        full_id: ``{app_id}-{id}``, unique in a deployment.
        triggers: the event names (or ``prefix/*`` wildcards) that start it.
        retry: its retry policy (each step gets ``retry.retries`` retries).
        handler: the async function ``fn(ctx)``.
    """

    app_id: str
    id: str
    handler: Handler
    triggers: tuple[str, ...]
    retry: Retry
    name: str = ""
    on_failure: Function | None = None
    failure_of: str | None = None  # set on the on_failure function: the full id it handles
    filters: tuple[tuple[str, Expression | None], ...] = ()  # (pattern, if_) per event trigger
    crons: tuple[Cron, ...] = ()
    cancel_on: tuple[CancelSpec, ...] = ()
    start_timeout_ms: int | None = None
    finish_timeout_ms: int | None = None
    idempotency: Expression | None = None
    flow: FlowSpec = field(default_factory=FlowSpec)
    _meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def full_id(self) -> str:
        return f"{self.app_id}-{self.id}"

    def matches(self, event: Event) -> bool:
        """Whether ``event`` starts a run of this function (its name, then its trigger's ``if_``)."""
        filters = self.filters or tuple((t, None) for t in self.triggers)
        named = [expr for pattern, expr in filters if trigger_matches(pattern, event.name)]
        if not named:
            return False
        if self.failure_of is not None:
            return event.data.get("function_id") == self.failure_of
        if any(expr is None for expr in named):
            return True
        bindings = {"event": msgspec.to_builtins(event)}
        return any(expr is not None and expr.test(bindings) for expr in named)

    def run_id_for(self, event: Event | str) -> str:
        """The id of the run that ``event`` (or an event id) starts for this function.

        Deterministic, so a client can wait for a run right after sending its event.
        """
        event_id = event.id if isinstance(event, Event) else event
        ts = ulid_time_ms(event_id) if is_ulid(event_id) else 0
        return run_id_for(self.full_id, event_id, ts)

    async def __call__(self, ctx: Context) -> Any:
        return await self.handler(ctx)


class App:
    """A group of functions deployed together; ``meshflow worker module:app`` serves them.

    Args:
        id: the app id (letters, digits, ``-``, ``_``); prefixes every function's full id.
    """

    def __init__(self, id: str) -> None:
        self.id = validate_id(id, what="app id")
        self._functions: dict[str, Function] = {}

    @property
    def functions(self) -> list[Function]:
        """Every function of the app, including generated ``on_failure`` handlers."""
        return list(self._functions.values())

    def function(
        self,
        id: str,
        *,
        trigger: str | TriggerEvent | TriggerCron | Sequence[str | TriggerEvent | TriggerCron],
        retries: int | Retry | None = None,
        on_failure: Handler | None = None,
        name: str = "",
        cancel_on: Sequence[Cancel] = (),
        timeouts: Timeouts | None = None,
        idempotency: str | None = None,
        concurrency: Concurrency | Sequence[Concurrency] | None = None,
        throttle: Throttle | None = None,
        rate_limit: RateLimit | None = None,
        debounce: Debounce | None = None,
        batch: Batch | None = None,
        priority: Priority | None = None,
        singleton: Singleton | None = None,
    ) -> Callable[[Handler], Function]:
        """Register an async function ``fn(ctx)`` that runs for every matching event.

        Args:
            id: the function's id within the app.
            trigger: an event name, a prefix wildcard like ``"app/*"``, a `TriggerEvent` (with a
                CEL ``if_``), a `TriggerCron`, or a list of them.
            retries: how many times each step (and the function body) is retried, 0-20
                (default 4), or a `Retry` with its own backoff table.
            on_failure: an async ``fn(ctx)`` run once, as its own run, when a run of this
                function fails for good; ``ctx.event.data`` holds ``function_id``, ``run_id``,
                ``error`` and the original ``event``.
            name: a human-readable name for the dashboard.
            cancel_on: events that cancel a run (`Cancel`).
            timeouts: cancel runs not started or not finished in time (`Timeouts`).
            idempotency: a CEL expression over ``event`` (like ``"event.data.userId"``): at most
                one run per value of it in 24 hours.
            concurrency, throttle, rate_limit, debounce, batch, priority, singleton: flow
                control (``meshflow.Concurrency`` ...; see ``docs/flow-control.md``).
        """
        fn_id = validate_id(id, what="function id")
        policy = retry_policy(retries, what=f"function {fn_id!r}")
        obj: object = trigger  # untyped callers can pass anything; a non-list is checked as one trigger
        patterns = tuple(obj) if isinstance(obj, Iterable) and not isinstance(obj, str) else (obj,)
        if not patterns:
            raise ConfigError(f"function {fn_id!r}: needs at least one trigger")
        filters = _event_filters(patterns, fn_id)
        triggers = tuple(pattern for pattern, _ in filters)
        crons = tuple(
            parse_cron(p.cron, what=f"function {fn_id!r}") for p in patterns if isinstance(p, TriggerCron)
        )
        cancels = _cancel_specs(cancel_on, fn_id)
        if timeouts is not None and not isinstance(timeouts, Timeouts):
            raise ConfigError(
                f"function {fn_id!r}: timeouts must be meshflow.Timeouts(start=..., finish=...)"
            )
        start_ms = _timeout_ms(timeouts.start if timeouts else None, f"function {fn_id!r} timeouts.start")
        finish_ms = _timeout_ms(timeouts.finish if timeouts else None, f"function {fn_id!r} timeouts.finish")
        flow = check_flow(
            fn_id,
            concurrency=concurrency,
            throttle=throttle,
            rate_limit=rate_limit,
            debounce=debounce,
            batch=batch,
            priority=priority,
            singleton=singleton,
            has_idempotency=idempotency is not None,
            has_cancel_on=bool(cancel_on),
        )
        key_expr = None
        if idempotency is not None:
            key_expr = compile_expression(
                idempotency, variables=("event",), what=f"function {fn_id!r}: idempotency"
            )

        def register(handler: Handler) -> Function:
            _check_handler(handler, what=f"function {fn_id!r}")
            failure_fn = None
            if on_failure is not None:
                _check_handler(on_failure, what=f"on_failure of function {fn_id!r}")
                failure_fn = Function(
                    app_id=self.id,
                    id=validate_id(f"{fn_id}-failure", what="on_failure function id"),
                    handler=on_failure,
                    triggers=(EVENT_FUNCTION_FAILED,),
                    retry=retry_policy(None),
                    name=f"{name or fn_id} (on failure)",
                    failure_of=f"{self.id}-{fn_id}",
                )
            fn = Function(
                app_id=self.id,
                id=fn_id,
                handler=handler,
                triggers=triggers,
                retry=policy,
                name=name or fn_id,
                on_failure=failure_fn,
                filters=filters,
                crons=crons,
                cancel_on=cancels,
                start_timeout_ms=start_ms,
                finish_timeout_ms=finish_ms,
                idempotency=key_expr,
                flow=flow,
            )
            for f in (fn, failure_fn):
                if f is None:
                    continue
                if f.id in self._functions:
                    raise ConfigError(f"app {self.id!r}: function id {f.id!r} is registered twice")
                self._functions[f.id] = f
            return fn

        return register


def _check_handler(handler: object, *, what: str) -> None:
    if not inspect.iscoroutinefunction(handler):
        raise ConfigError(f"{what}: must be an `async def` function taking one argument (ctx)")
