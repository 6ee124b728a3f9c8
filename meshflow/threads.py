"""The threads a worker runs plain ``def`` step handlers on.

A handler that blocks must not block the event loop, so it runs in a thread; and a worker that
stops must not wait for a handler that blocks for minutes (the interpreter joins the threads of
`concurrent.futures.ThreadPoolExecutor`, and ``asyncio.run`` its default executor, at exit). So
these threads are daemon threads: a stopping worker leaves a handler that is still running to
die with the process, and the step to be run again by another worker (counted as an attempt).

Threads are started as work needs them, up to ``max_threads``, and then reused. `call_handler` is
the one place a step handler is called.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import queue
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

_STOP = object()


async def call_handler(
    handler: Callable[..., Any],
    args: tuple[Any, ...],
    run_sync: Callable[..., Awaitable[Any]] | None = None,
) -> Any:
    """Call a step's handler: a coroutine function on the loop, a plain ``def`` in a thread
    (``run_sync``, by default asyncio's), so that it cannot block the loop."""
    if inspect.iscoroutinefunction(handler):
        return await handler(*args)
    result = await (run_sync or asyncio.to_thread)(handler, *args)
    return (await result) if inspect.isawaitable(result) else result


class DaemonThreads:
    """A pool of daemon threads for sync step handlers (`run`)."""

    def __init__(self, max_threads: int = 64, name: str = "meshflow-step") -> None:
        self.max_threads = max_threads
        self.name = name
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0  # work queued or running
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in one of the threads, with the caller's context variables."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker's step threads are closed")
            self._work.put((future, call))
            self._in_flight += 1
            if self._in_flight > len(self._threads) and len(self._threads) < self.max_threads:
                name = f"{self.name}-{len(self._threads)}"
                thread = threading.Thread(target=self._serve, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()
        return await asyncio.wrap_future(future)

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            future, call = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:  # the handler's failure is the step's, reported there
                    future.set_exception(exc)
            with self._lock:
                self._in_flight -= 1

    def close(self) -> None:
        """No more work; idle threads end, busy ones end when their handler returns (or with the
        process: nobody waits for them)."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._work.put(_STOP)
