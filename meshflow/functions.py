"""Functions: the ``App`` registry, the ``@app.function`` decorator, triggers and config.

Config is validated when a function is registered, so a bad trigger or retry policy fails at import
time with a message that names the function. An app holds its functions; there is no global
registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, EventError
from .events import Event, validate_event_name
from .ids import is_ulid, run_id_for, ulid_time_ms, validate_id
from .names import EVENT_FUNCTION_FAILED
from .retries import Retry, retry_policy

if TYPE_CHECKING:
    from .steps import Context

Handler = Callable[["Context"], Awaitable[Any]]


def _validate_trigger(pattern: object, *, fn: str) -> str:
    if not isinstance(pattern, str):
        raise ConfigError(f"function {fn!r}: a trigger must be an event name string, got {pattern!r}")
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
    _meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def full_id(self) -> str:
        return f"{self.app_id}-{self.id}"

    def matches(self, event: Event) -> bool:
        """Whether ``event`` starts a run of this function."""
        if not any(trigger_matches(t, event.name) for t in self.triggers):
            return False
        if self.failure_of is not None:
            return event.data.get("function_id") == self.failure_of
        return True

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
        trigger: str | Sequence[str],
        retries: int | Retry | None = None,
        on_failure: Handler | None = None,
        name: str = "",
    ) -> Callable[[Handler], Function]:
        """Register an async function ``fn(ctx)`` that runs for every matching event.

        Args:
            id: the function's id within the app.
            trigger: an event name, a prefix wildcard like ``"app/*"``, or a list of them.
            retries: how many times each step (and the function body) is retried, 0-20
                (default 4), or a `Retry` with its own backoff table.
            on_failure: an async ``fn(ctx)`` run once, as its own run, when a run of this
                function fails for good; ``ctx.event.data`` holds ``function_id``, ``run_id``,
                ``error`` and the original ``event``.
            name: a human-readable name for the dashboard.
        """
        fn_id = validate_id(id, what="function id")
        policy = retry_policy(retries, what=f"function {fn_id!r}")
        obj: object = trigger  # untyped callers can pass anything; a non-list is checked as one trigger
        patterns = tuple(obj) if isinstance(obj, Iterable) and not isinstance(obj, str) else (obj,)
        if not patterns:
            raise ConfigError(f"function {fn_id!r}: needs at least one trigger")
        triggers = tuple(_validate_trigger(p, fn=fn_id) for p in patterns)

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
