"""Logging: structlog setup for workers and the CLI (one line per event, key=value or JSON), and
the logger a function sees as ``ctx.logger`` (`RunLogger`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import structlog


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    """Configure structlog (and stdlib logging) for a meshflow process."""
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class RunLogger:
    """``ctx.logger``: a structlog logger bound to the run, silent while memoized steps replay (a
    resumed run does not log its past again), and bound to the step it logs from, if any."""

    def __init__(self, base: Any, *, replaying: Callable[[], bool], step: Callable[[], str | None]) -> None:
        self._base = base
        self._replaying = replaying
        self._step = step

    def bind(self, **kw: Any) -> RunLogger:
        return RunLogger(self._base.bind(**kw), replaying=self._replaying, step=self._step)

    def _log(self, level: str, event: str, *args: Any, **kw: Any) -> None:
        if self._replaying():
            return
        step = self._step()
        if step is not None:
            kw.setdefault("step", step)
        getattr(self._base, level)(event, *args, **kw)

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("debug", event, *args, **kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("info", event, *args, **kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("warning", event, *args, **kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("error", event, *args, **kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("exception", event, *args, **kw)
