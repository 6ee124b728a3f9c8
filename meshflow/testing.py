"""Helpers that users' tests and ours share."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline is what this helper is for
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that value.

    Raises:
        TimeoutError: with ``message`` and the last value seen, when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        last = value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout}s (last value: {last!r})")
        await asyncio.sleep(interval)
