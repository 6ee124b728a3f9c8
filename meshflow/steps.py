"""The step API a function sees: ``ctx.step.run``, ``sleep``, ``sleep_until``, ``wait_for_event``,
``wait_for_any``, ``invoke`` and ``send_event``.

This module is thin on purpose: every call is handed to the replay engine (``meshflow.replay``),
which decides whether the step's result is already committed (return it), or whether to execute
it, or to suspend the run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from .errors import ConfigError
from .events import Event
from .retries import Retry

if TYPE_CHECKING:
    from .functions import Function

Duration = dt.timedelta | float | str


@dataclass(frozen=True)
class WaitFor:
    """One event ``ctx.step.wait_for_any`` accepts.

    Attributes:
        event: the event name to wait for.
        match: a path like ``"data.userId"``: the event's value there must equal the triggering
            event's value at the same path.
        if_: a CEL condition over ``event`` (the run's triggering event) and ``async`` (the
            candidate), like ``"async.data.amount > 100"``.
    """

    event: str
    match: str | None = None
    if_: str | None = None


class _Engine(Protocol):
    async def run_step(
        self,
        step_id: str,
        handler: Callable[..., Any],
        args: tuple[Any, ...],
        type_: Any,
        retries: int | Retry | None,
    ) -> Any: ...

    async def sleep_step(self, step_id: str, duration: object, *, until: bool) -> None: ...

    async def wait_step(
        self,
        step_id: str,
        specs: Sequence[tuple[object, object, object]],
        timeout: object,
        lookback: object,
        since: object,
    ) -> Event | None: ...

    async def invoke_step(
        self, step_id: str, function: object, data: object, timeout: object, type_: Any
    ) -> Any: ...

    async def send_step(self, step_id: str, events: object) -> list[str]: ...


class Step:
    """Checkpointed steps. Each call's result is stored once and returned on every replay.

    Step ids name a step within its run; calling the same id again (in a loop) makes a new step
    each time, so ids need only be unique per line of code, not per iteration.
    """

    def __init__(self, engine: _Engine) -> None:
        self._engine = engine

    async def run(
        self,
        step_id: str,
        handler: Callable[..., Awaitable[Any]] | Callable[..., Any],
        *args: Any,
        type: Any = None,
        retries: int | Retry | None = None,
    ) -> Any:
        """Run ``handler(*args)`` once, durably, and return its (JSON) result.

        A sync handler runs in a thread; an async one on the worker's loop. The result must be
        JSON data, a msgspec Struct, a dataclass or a pydantic model; the function gets it back
        as decoded JSON (or as ``type``, when given) on the first run and every replay alike.

        ``args`` are kept as the step's input for people to read (`StepInfo.input`, the run
        page), as JSON up to 64 KiB; arguments that are not JSON, or larger, are kept as a marker
        saying so, and the handler gets them all the same.

        Args:
            step_id: the step's name within the run.
            handler: what to run.
            *args: positional arguments for the handler (JSON-friendly values are best: they
                are the step's input on record).
            type: decode the result into this type (a Struct, dataclass, ...).
            retries: this step's own retry count (or `Retry` policy), instead of the function's.

        Raises:
            StepError: the step failed for good (retries exhausted or `NonRetriableError`).
        """
        return await self._engine.run_step(step_id, handler, args, type, retries)

    async def sleep(self, step_id: str, duration: dt.timedelta | float | str) -> None:
        """Suspend the run for ``duration`` (``timedelta``, seconds, or ``"30s"``, ``"3 days"``).

        The run holds no worker memory while it sleeps; it never wakes early.
        """
        await self._engine.sleep_step(step_id, duration, until=False)

    async def sleep_until(self, step_id: str, when: dt.datetime | str) -> None:
        """Suspend the run until ``when`` (an aware ``datetime`` or an ISO-8601 string)."""
        await self._engine.sleep_step(step_id, when, until=True)

    async def wait_for_event(
        self,
        step_id: str,
        *,
        event: str,
        timeout: Duration,
        match: str | None = None,
        if_: str | None = None,
        lookback: Duration | None = None,
        since: str = "trigger",
    ) -> Event | None:
        """Suspend the run until an event named ``event`` arrives; return it, or None on timeout.

        Which events count: by default every ``event`` stored *after the run's triggering
        event*, so one sent right after the trigger is seen even if the function reaches this
        wait later; and never one this run already took (a second wait for the same name starts
        after the event the first took). ``lookback="1h"`` widens the window back in time from
        the trigger; ``since="wait"`` narrows it to events sent after the wait began.

        Args:
            step_id: the step's name within the run.
            event: the event name to wait for.
            timeout: give up after this long (``"7d"``, seconds, ``timedelta``) and return None.
            match: a path like ``"data.userId"``: the event's value there must equal the
                triggering event's value at that path (an indexed lookup).
            if_: a CEL condition over ``event`` (the trigger) and ``async`` (the candidate).
            lookback: also accept events stored up to this long before the trigger.
            since: ``"trigger"`` (default) or ``"wait"``.
        """
        return await self._engine.wait_step(step_id, [(event, match, if_)], timeout, lookback, since)

    async def wait_for_any(
        self,
        step_id: str,
        events: Sequence[WaitFor | str],
        *,
        timeout: Duration,
        lookback: Duration | None = None,
        since: str = "trigger",
    ) -> Event | None:
        """Like `wait_for_event`, for several events: the first that arrives wins, the rest are dropped.

        Returns the winning event (its ``name`` tells which) or None on timeout.
        """
        specs: list[tuple[object, object, object]] = []
        for spec in events:
            if isinstance(spec, WaitFor):
                specs.append((spec.event, spec.match, spec.if_))
            else:
                specs.append((spec, None, None))
        if not specs:
            raise ConfigError(f"step {step_id!r}: wait_for_any needs at least one event")
        return await self._engine.wait_step(step_id, specs, timeout, lookback, since)

    async def invoke(
        self,
        step_id: str,
        *,
        function: Function | str,
        data: dict[str, Any] | None = None,
        timeout: Duration | None = None,
        type: Any = None,
    ) -> Any:
        """Run another function as a child run and return its output.

        The child gets an event named ``meshflow/function.invoked`` carrying ``data``, and its run
        records this run as its parent. The parent holds nothing while it waits.

        Args:
            step_id: the step's name within the run.
            function: the `Function`, or its full id ``"{app}-{fn}"`` (for another app's function).
            data: the child's ``ctx.event.data``.
            timeout: give up after this long (default: wait as long as the child takes).
            type: decode the child's output into this type.

        Raises:
            StepError: the child failed (its error), or the timeout passed (``InvokeTimeoutError``).
        """
        return await self._engine.invoke_step(step_id, function, data, timeout, type)

    async def send_event(self, step_id: str, events: Event | Sequence[Event]) -> list[str]:
        """Send one or more events, once: a re-executed run never sends them twice.

        Returns the ids of the events sent.
        """
        return await self._engine.send_step(step_id, events)


class Context:
    """What a function receives: its event(s), its run, its steps and a logger.

    Attributes:
        event: the event that started the run.
        events: all the events of the run (one, unless the run came from a batch).
        run_id: the run's id.
        function_id: the function's full id (``{app}-{fn}``).
        attempt: how many times the function body has failed and been retried (0 at first).
        step: the step API (`Step`).
        logger: a structlog logger bound to the run (and to the step inside a step handler);
            it stays silent while memoized steps replay, so each line is logged once.
    """

    def __init__(
        self,
        *,
        events: Sequence[Event],
        run_id: str,
        function_id: str,
        attempt: int,
        step: Step,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.event = events[0]
        self.events = list(events)
        self.run_id = run_id
        self.function_id = function_id
        self.attempt = attempt
        self.step = step
        self.logger = logger
