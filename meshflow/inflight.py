"""A worker's in-flight work: at most ``concurrency`` deliveries handled at once, each in a task.

Pull loops take a place per message received (never across a long-poll fetch, so an idle consumer
does not sit on the places a busy one needs), and so does a local timer's wake. A handler that
fails with a NATS error, or is cancelled as the worker stops, leaves its message for redelivery
(`Delivery.nak`); a local delivery hands its work to the stream instead. One that fails in a way
nothing foresaw (a bug, poison input) is redelivered with a growing delay, then given up on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from .bus import Delivery
from .errors import MeshflowError, NatsError

log = structlog.get_logger("meshflow.worker")

Handler = Callable[[Delivery], Awaitable[None]]

#: How often a message whose handling fails unexpectedly (not a NATS error) is delivered before
#: it is given up on.
POISON_DELIVERIES = 5


class InFlight:
    """The tasks handling deliveries now, bounded by ``concurrency``."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._places = asyncio.Semaphore(concurrency)
        self._count = 0
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def free(self) -> int:
        """How many more deliveries may be handled now (at least 1 for a fetch to ask for)."""
        return max(1, self.concurrency - self._count)

    async def room(self) -> None:
        """Wait until at least one place is free (without taking it)."""
        await self._places.acquire()
        self._places.release()

    async def start(self, label: str, delivery: Delivery, handle: Handler) -> None:
        """Take a place (waiting for one), then handle ``delivery`` in a task of its own."""
        await self._places.acquire()
        self._count += 1
        task = asyncio.create_task(self._guard(label, delivery, handle))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def spawn(self, label: str, delivery: Delivery, handle: Handler) -> None:
        """`start` from a plain callback (a timer): the place is taken in the task."""
        task = asyncio.ensure_future(self.start(label, delivery, handle))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _guard(self, label: str, delivery: Delivery, handle: Handler) -> None:
        try:
            await handle(delivery)
        except asyncio.CancelledError:
            with contextlib.suppress(MeshflowError):
                await delivery.abandon()
            raise
        except NatsError as exc:  # NATS trouble mid-way: leave the message for redelivery
            log.warning("message left for redelivery", consumer=label, error=repr(exc))
            with contextlib.suppress(MeshflowError):
                await delivery.nak(delay=1.0)
        except Exception:  # a bug, or input nothing foresaw: bounded, never a loop forever
            await self._poisoned(label, delivery)
        finally:
            self._count -= 1
            self._places.release()

    async def _poisoned(self, label: str, delivery: Delivery) -> None:
        """A message whose handling failed unexpectedly: redelivered later, a few times, then
        given up on (and said so), so one bad message never busies a worker forever."""
        if delivery.delivered >= POISON_DELIVERIES:
            log.exception(
                f"message given up on after {delivery.delivered} failed deliveries",
                consumer=label,
                subject=delivery.subject,
            )
            with contextlib.suppress(MeshflowError):
                await delivery.term()
            return
        log.exception(
            "message failed unexpectedly; left for redelivery", consumer=label, subject=delivery.subject
        )
        with contextlib.suppress(MeshflowError):
            await delivery.nak(delay=min(2.0**delivery.delivered, 30.0))

    async def drain(self, grace: float, now: asyncio.Event | None = None) -> None:
        """Wait up to ``grace`` seconds (or until ``now`` is set) for the tasks to end, then cancel
        those left."""
        if not self.tasks:
            return
        waiting: list[asyncio.Future[object]] = [asyncio.ensure_future(asyncio.wait(set(self.tasks)))]
        if now is not None:
            waiting.append(asyncio.ensure_future(now.wait()))
        await asyncio.wait(waiting, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiting:
            waiter.cancel()
        still = [task for task in self.tasks if not task.done()]
        for task in still:
            task.cancel()
        await asyncio.gather(*still, return_exceptions=True)
