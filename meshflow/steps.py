"""The step API a function sees: ``ctx.step.run``, ``ctx.step.sleep``, ``ctx.step.sleep_until``.

This module is thin on purpose: every call is handed to the replay engine (``meshflow.replay``),
which decides whether the step's result is already committed (return it), or whether to execute
it, or to suspend the run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog

from .events import Event


class _Engine(Protocol):
    async def run_step(
        self,
        step_id: str,
        handler: Callable[..., Any],
        args: tuple[Any, ...],
        type_: Any,
        retries: int | None,
    ) -> Any: ...

    async def sleep_step(self, step_id: str, duration: object, *, until: bool) -> None: ...


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
        retries: int | None = None,
    ) -> Any:
        """Run ``handler(*args)`` once, durably, and return its (JSON) result.

        A sync handler runs in a thread; an async one on the worker's loop. The result must be
        JSON data, a msgspec Struct, a dataclass or a pydantic model; the function gets it back
        as decoded JSON (or as ``type``, when given) on the first run and every replay alike.

        Args:
            step_id: the step's name within the run.
            handler: what to run.
            *args: positional arguments for the handler (JSON-friendly values are best).
            type: decode the result into this type (a Struct, dataclass, ...).
            retries: this step's own retry count, instead of the function's.

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
