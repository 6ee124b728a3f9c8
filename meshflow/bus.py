"""Publishing, consuming and scheduling on JetStream.

- Events go to ``{ns}.ev.{name}`` with ``Nats-Msg-Id = event.id`` (the stream dedupes resends).
- "Advance run X" messages go to ``{ns}.run.{app}.{fn}``; they carry a TTL so the limits-retention
  runs stream does not grow forever, while the *schedules* on ``{ns}.timer.>`` carry none, so a
  30-day sleep is never dropped (a fired ``@at`` schedule is removed by the server).
- Timers are JetStream message schedules (``Nats-Schedule: @at …``) targeting the function's run
  subject; one subject per pending timer, so publishing again replaces it.

nats-py errors never leave this module: they become `NatsError` (or `EventError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from enum import StrEnum
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)

from .connection import close_nats
from .durations import epoch_ms, from_ms, rfc3339
from .errors import EventError, NatsError
from .functions import Function
from .names import (
    HDR_MSG_ID,
    HDR_SCHEDULE,
    HDR_SCHEDULE_TARGET,
    HDR_SCHEDULE_TTL,
    HDR_TTL,
    Names,
    stream_purge_subject,
)
from .requests import (
    API_ERRORS,
    NATS_ERRORS,
    RETRY_FOR,
    ApiError,
    PubAck,
    Requester,
    TooLarge,
    retry_pauses,
)

#: How long an un-consumed "advance run" message is kept. Runs whose workers are all gone for
#: longer than this need their queued messages re-published (a sweeper; not built yet).
RUN_MESSAGE_TTL = dt.timedelta(days=7)
#: Consumers redeliver an unacknowledged message after this; workers send in-progress acks
#: (and renew their run lease) well within it while a long step runs.
ACK_WAIT = 30.0
MAX_ACK_PENDING = 10_000
PUBLISH_DEADLINE = RETRY_FOR
PUBLISH_ATTEMPT_TIMEOUT = 3.0
#: ``publish_many`` keeps at most this many publishes in flight.
PUBLISH_WINDOW = 1024

log = structlog.get_logger("meshflow.nats")


class RunMessage(msgspec.Struct, frozen=True, kw_only=True):
    """'Advance this run': why (start, timer) and, for a timer, which pending item fired."""

    v: int = 1
    run_id: str
    reason: str = "start"
    key: str = ""


_run_msg_encoder = msgspec.json.Encoder()
_run_msg_decoder = msgspec.json.Decoder(RunMessage)


def decode_run_message(raw: bytes) -> RunMessage:
    return _run_msg_decoder.decode(raw)


class Source(StrEnum):
    """Where a delivery comes from."""

    EVENT = "event"  # a function's trigger consumer on the events stream
    RUN = "run"  # a function's run consumer on the runs stream
    ROUTE = "route"  # a route consumer: events some run waits for
    LOCAL = "local"  # a local timer of this worker: no message behind it


class Delivery:
    """One message handed to the worker, as the rest of meshflow sees it (never a nats-py object).

    ``delivered`` counts deliveries of the message (1 the first time). Settling it: `ack` (done),
    `nak` (again, after ``delay`` seconds), `in_progress` (not yet: restart the ack wait), `term`
    (never again). A local delivery (``Source.LOCAL``, a worker's own timer) has no message: its
    acks do nothing, and its `nak` hands the work to the stream instead (``fallback``).
    """

    __slots__ = ("_fallback", "_msg", "data", "delivered", "headers", "seq", "source", "stored_ms", "subject")

    def __init__(
        self,
        source: Source,
        subject: str,
        data: bytes,
        *,
        headers: dict[str, str] | None = None,
        delivered: int = 1,
        seq: int = 0,
        stored_ms: int = 0,
        msg: Any = None,
        fallback: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.source = source
        self.subject = subject
        self.data = data
        self.headers = headers or {}
        self.delivered = delivered
        self.seq = seq  # the message's sequence in its stream (0: none)
        self.stored_ms = stored_ms  # when the stream stored it, epoch ms (0: unknown)
        self._msg = msg
        self._fallback = fallback

    @classmethod
    def of(cls, msg: Any, source: Source) -> Delivery:
        meta = msg.metadata
        return cls(
            source,
            msg.subject,
            msg.data,
            headers=msg.headers,
            delivered=int(meta.num_delivered),
            seq=int(meta.sequence.stream),
            stored_ms=epoch_ms(meta.timestamp),
            msg=msg,
        )

    @classmethod
    def local(cls, subject: str, fallback: Callable[[], Awaitable[None]]) -> Delivery:
        """A delivery with no message behind it; `nak` calls ``fallback``."""
        return cls(Source.LOCAL, subject, b"", fallback=fallback)

    @property
    def redelivered(self) -> bool:
        """Delivered before: whoever had it may have died (or stalled) on the way."""
        return self.delivered > 1

    async def ack(self) -> None:
        if self._msg is not None:
            await self._settle("ack", self._msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        if self._msg is not None:
            await self._settle("nak", self._msg.nak(delay=delay))
        elif self._fallback is not None:
            await self._fallback()

    async def abandon(self) -> None:
        """Give the message back at once (the worker is stopping); a local delivery leaves its
        work to the durable schedule behind it."""
        if self._msg is not None:
            await self._settle("nak", self._msg.nak())

    async def in_progress(self) -> None:
        if self._msg is not None:
            await self._settle("in-progress ack", self._msg.in_progress())

    async def term(self) -> None:
        if self._msg is not None:
            await self._settle("term", self._msg.term())

    async def _settle(self, what: str, call: Awaitable[Any]) -> None:
        try:
            await call
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot {what} a message on {self.subject}: {exc!r}") from exc


class ConsumerUnavailable(NatsError):
    """A consumer had no leader to answer a fetch (just created, or an election): routine for a
    few seconds. Never leaves the worker."""


class Pull:
    """A pull subscription bound to a durable consumer (`Bus.pull`)."""

    def __init__(self, sub: Any, source: Source, consumer: str) -> None:
        self._sub = sub
        self.source = source
        self.consumer = consumer

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:  # noqa: ASYNC109 - a long poll's length
        """Up to ``batch`` deliveries, waiting up to ``timeout`` seconds for the first; [] if none."""
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.js.errors.ServiceUnavailableError as exc:
            raise ConsumerUnavailable(f"consumer {self.consumer}: {exc!r}") from exc
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot fetch from consumer {self.consumer}: {exc!r}") from exc
        return [Delivery.of(msg, self.source) for msg in msgs]


class Notice:
    """A core NATS message (a signal or a request; see `Bus.listen`)."""

    __slots__ = ("_msg", "data", "subject")

    def __init__(self, msg: Any) -> None:
        self._msg = msg
        self.subject: str = msg.subject
        self.data: bytes = msg.data

    @property
    def wants_reply(self) -> bool:
        return bool(self._msg.reply)

    async def respond(self, data: bytes) -> None:
        try:
            await self._msg.respond(data)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot answer a request on {self.subject}: {exc!r}") from exc


class Listening:
    """A core subscription (`Bus.listen`)."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def close(self) -> None:
        with contextlib.suppress(*NATS_ERRORS):
            await self._sub.unsubscribe()


T = TypeVar("T")


async def through_elections(what: str, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``call(*args)``, a JetStream API request (``what`` names it in the log), retried for up to
    30 s while the stream (or the cluster's meta layer) has no leader: right after a stream is
    created by another process, during a failover. Those answer 503 or not at all; any other
    error is raised at once."""
    pauses = retry_pauses()
    while True:
        try:
            return await call(*args)
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            pause = next(pauses)
            if pause is None:
                raise
            log.info("JetStream has no leader to answer yet; retrying", request=what, error=repr(exc))
            await asyncio.sleep(pause)


class Bus:
    """Streams, consumers, publishing and timers of one namespace."""

    def __init__(self, nc: NatsClient, names: Names, requester: Requester | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10)
        # Reads that get no answer at all while a stream has no leader yet (just created by
        # another process): retried sooner (`through_elections`).
        self.js_quick = nc.jetstream(timeout=2)
        self.names = names
        self.requests = requester or Requester(nc)

    def default_replicas(self) -> int:
        """3 when the server is part of a cluster of three or more (it advertises the others'
        client URLs), else 1."""
        info = getattr(self.nc, "_server_info", None) or {}
        peers = len(info.get("connect_urls") or [])
        return 3 if info.get("cluster") and peers + 1 >= 3 else 1

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        """Flush what is buffered (for up to 5 s) and close the connection."""
        await close_nats(self.nc)

    async def ensure_consumers(self, fn: Function, *, ack_wait: float = ACK_WAIT) -> None:
        """Create or update the function's trigger and run consumers."""
        n = self.names
        subjects = _minimal_subjects([n.trigger_subject(t) for t in fn.triggers])
        configs = []
        if subjects:  # a function with cron triggers only reads no events
            configs.append((n.events_stream, self._trigger_consumer(fn, subjects, ack_wait)))
        runs = ConsumerConfig(
            name=n.run_consumer(fn.app_id, fn.id),
            durable_name=n.run_consumer(fn.app_id, fn.id),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
            filter_subject=n.run_subject(fn.app_id, fn.id),
        )
        configs.append((n.runs_stream, runs))
        for stream, config in configs:
            try:
                await through_elections(f"consumer {config.name}", self.js.add_consumer, stream, config)
            except NATS_ERRORS as exc:
                raise NatsError(f"cannot create consumer {config.name} on {stream}: {exc!r}") from exc

    def _trigger_consumer(self, fn: Function, subjects: list[str], ack_wait: float) -> ConsumerConfig:
        n = self.names
        return ConsumerConfig(
            name=n.trigger_consumer(fn.app_id, fn.id),
            durable_name=n.trigger_consumer(fn.app_id, fn.id),
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
            **({"filter_subject": subjects[0]} if len(subjects) == 1 else {"filter_subjects": subjects}),
        )

    async def ensure_route(self, event_name: str, name_token: str, *, ack_wait: float = ACK_WAIT) -> None:
        """Create the consumer that routes events named ``event_name`` to waiting runs (idempotent)."""
        n = self.names
        config = ConsumerConfig(
            name=n.route_consumer(name_token),
            durable_name=n.route_consumer(name_token),
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
            filter_subject=n.event_subject(event_name),
        )
        try:
            await through_elections(f"consumer {config.name}", self.js.add_consumer, n.events_stream, config)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot create consumer {config.name} on {n.events_stream}: {exc!r}") from exc

    async def pull(self, stream: str, consumer: str, source: Source) -> Pull:
        """A pull subscription bound to an existing durable consumer; its messages are
        deliveries from ``source``."""
        try:
            sub = await self.js.pull_subscribe_bind(consumer, stream)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot bind consumer {consumer} on {stream}: {exc!r}") from exc
        return Pull(sub, source, consumer)

    async def listen(
        self, subject: str, handle: Callable[[Notice], Awaitable[None]], *, queue: str = ""
    ) -> Listening:
        """Call ``handle`` with every core message on ``subject`` (one member of ``queue`` each,
        when it is given) until `Listening.close`."""

        async def on_msg(msg: Any) -> None:
            await handle(Notice(msg))

        try:
            sub = await self.nc.subscribe(subject, queue=queue, cb=on_msg)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot subscribe to {subject}: {exc!r}") from exc
        return Listening(sub)

    async def follow(self, subject: str) -> Following:
        """The messages published on ``subject`` from the moment this returns. A plain
        subscription, not a JetStream consumer, so an identity that may not create consumers (the
        dashboard's) can follow events; what is published while disconnected is missed."""
        try:
            sub = await self.nc.subscribe(subject)
            await self.nc.flush(timeout=5)  # the server has the subscription before we return
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot follow {subject}: {exc!r}") from exc
        return Following(sub)

    async def announce_start(self, fn: Function) -> None:
        """Tell whoever counts (the dashboard's metrics) that a run of ``fn`` started: a core
        message, no ack awaited; lost if nobody listens or the connection is down."""
        with contextlib.suppress(*NATS_ERRORS):
            await self.nc.publish(self.names.started_subject(fn.app_id, fn.id), fn.full_id.encode())

    # --- publishing ---------------------------------------------------------------------------
    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> PubAck:
        """Publish to a stream and wait for its ack; `NatsError` if it is not stored in time.

        Every publish meshflow makes is idempotent (a ``Nats-Msg-Id``, or a timer subject that
        replaces itself), so a timeout or a server that is restarting is retried with the same
        message until ``PUBLISH_DEADLINE`` passes.
        """
        acks: list[PubAck] = await self.publish_many([(subject, payload, headers)])
        return acks[0]

    async def emit(self, subject: str, payload: bytes) -> None:
        """Publish without waiting for an ack (buffered by the connection; lost if it is closed)."""
        try:
            await self.nc.publish(subject, payload)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot publish to {subject}: {exc!r}") from exc

    async def publish_many(self, items: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> list[Any]:
        """Publish several messages pipelined, ``PUBLISH_WINDOW`` in flight at a time; acks in order.

        Each window has its own ack timeout and retry deadline, so a large list to a slow
        (fsync-every-write) server makes progress instead of timing out as a whole.
        """
        try:
            for subject, payload, headers in items:
                self.requests.check_size(subject, payload, headers)
        except TooLarge as exc:
            raise EventError(f"{exc}; nothing was sent") from None
        results: list[Any] = []
        for start in range(0, len(items), PUBLISH_WINDOW):
            results.extend(await self._publish_window(items[start : start + PUBLISH_WINDOW]))
        return results

    async def _publish_window(self, items: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        pauses = retry_pauses(PUBLISH_DEADLINE)
        while todo:
            try:
                replies = await self.requests.publish_batch([items[i] for i in todo], PUBLISH_ATTEMPT_TIMEOUT)
            except NATS_ERRORS as exc:  # not even sent (disconnected): retry them all
                replies = [exc] * len(todo)
            failed: list[int] = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, ApiError) and reply.code < 500:
                    raise NatsError(f"publish to {items[i][0]} refused: {reply.description}") from reply
                if isinstance(reply, BaseException):
                    failed.append(i)
                else:
                    results[i] = reply
            if failed:  # idempotent: the same messages again (message ids deduplicate)
                pause = next(pauses)
                if pause is None:
                    raise NatsError(
                        f"{len(failed)} of {len(items)} publishes failed for {PUBLISH_DEADLINE:.0f}s"
                    )
                await asyncio.sleep(pause)
            todo = failed
        return results

    def run_message(
        self, app_id: str, fn_id: str, msg: RunMessage, *, msg_id: str | None
    ) -> tuple[str, bytes, dict[str, str]]:
        headers = {HDR_TTL: str(int(RUN_MESSAGE_TTL.total_seconds()))}
        if msg_id:
            headers[HDR_MSG_ID] = msg_id
        return self.names.run_subject(app_id, fn_id), _run_msg_encoder.encode(msg), headers

    async def publish_run(
        self, app_id: str, fn_id: str, msg: RunMessage, *, msg_id: str | None = None
    ) -> None:
        """Have a worker of function ``{app_id}-{fn_id}`` advance a run (deduplicated by ``msg_id``)."""
        await self.publish(*self.run_message(app_id, fn_id, msg, msg_id=msg_id))

    async def cancel_timer(self, run_id: str, key: str) -> None:
        """Drop a pending timer (purging its schedule's subject); a timer that fired is gone anyway."""
        request = msgspec.json.encode({"filter": self.names.timer_subject(run_id, key)})
        try:
            await self.requests.request(stream_purge_subject(self.names.runs_stream), request, None, 10)
        except API_ERRORS as exc:
            raise NatsError(f"cannot cancel timer {key} of run {run_id}: {exc!r}") from exc

    async def schedule_cron(self, fn: Function, cron_key: str, tick_ms: int) -> None:
        """Arm a function's next cron tick (replacing the pending one of the same cron)."""
        msg = RunMessage(run_id="", reason="cron", key=f"{cron_key}:{tick_ms}")
        headers = {
            HDR_SCHEDULE: f"@at {rfc3339(from_ms(tick_ms))}",
            HDR_SCHEDULE_TARGET: self.names.run_subject(fn.app_id, fn.id),
            HDR_SCHEDULE_TTL: str(int(RUN_MESSAGE_TTL.total_seconds())),
        }
        await self.publish(
            self.names.cron_subject(fn.app_id, fn.id, cron_key), _run_msg_encoder.encode(msg), headers
        )

    async def schedule(self, fn: Function, run_id: str, key: str, until_ms: int) -> None:
        """Have the server publish 'advance run' for ``run_id`` at ``until_ms`` (never earlier).

        Publishing again for the same (run, key) replaces the pending schedule.
        """
        msg = RunMessage(run_id=run_id, reason="timer", key=key)
        headers = {
            HDR_SCHEDULE: f"@at {rfc3339(from_ms(until_ms))}",
            HDR_SCHEDULE_TARGET: self.names.run_subject(fn.app_id, fn.id),
            HDR_SCHEDULE_TTL: str(int(RUN_MESSAGE_TTL.total_seconds())),
        }
        await self.publish(self.names.timer_subject(run_id, key), _run_msg_encoder.encode(msg), headers)


class Following:
    """The messages of a subject from some point on; see `Bus.follow`."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def __aiter__(self) -> AsyncGenerator[bytes, None]:
        try:
            async for msg in self._sub.messages:
                yield msg.data
        except NATS_ERRORS as exc:
            raise NatsError(f"following {self._sub.subject} failed: {exc!r}") from exc

    async def close(self) -> None:
        with contextlib.suppress(*NATS_ERRORS):
            await self._sub.unsubscribe()


def _minimal_subjects(subjects: list[str]) -> list[str]:
    """Drop duplicates and subjects covered by another's ``>`` wildcard (NATS rejects overlaps)."""
    unique = sorted(set(subjects))
    prefixes = [s[:-1] for s in unique if s.endswith(">")]
    return [s for s in unique if not any(s != p + ">" and s.startswith(p) for p in prefixes)]
