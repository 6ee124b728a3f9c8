"""Request/reply to JetStream on one wildcard inbox: the fast path for publishes, KV writes and
reads (`Requester`), and the errors JetStream answers with (`ApiError`).

Split out of ``bus`` (publishing, consuming, scheduling), which builds on it; ``store`` uses it
for KV reads and writes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient

from .names import HDR_KV_OPERATION, direct_get_subject

#: How long a request is retried through a leader election (5-7 s when a node dies) or lost
#: replies before giving up.
RETRY_FOR = 30.0


def retry_pauses(within: float = RETRY_FOR) -> Iterator[float | None]:
    """The pauses between attempts of a request that may be retried: 50 ms doubling to 1 s,
    until ``within`` seconds have passed since this was called; then None (give up)."""
    return _pauses(time.monotonic() + within)


def _pauses(deadline: float) -> Iterator[float | None]:
    pause = 0.05
    while time.monotonic() + pause < deadline:
        yield pause
        pause = min(pause * 2, 1.0)
    yield None


NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, asyncio.TimeoutError, OSError)


class ApiError(Exception):
    """JetStream refused a request (its JSON error), or answered with a status like 503."""

    def __init__(self, code: int, err_code: int = 0, description: str = "") -> None:
        super().__init__(f"{code} {err_code} {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


API_ERRORS: tuple[type[BaseException], ...] = (ApiError, *NATS_ERRORS)

_HEADER_BLOCK = len(b"NATS/1.0\r\n\r\n")


def message_size(payload: bytes, headers: dict[str, str] | None) -> int:
    """The bytes a message counts against the server's ``max_payload``: its payload and its header
    block as nats-py writes it (``NATS/1.0``, then ``Key: Value`` lines). Not its subject, which
    the server limits separately. A message over the limit makes the server close the connection."""
    if headers is None:
        return len(payload)
    return (
        len(payload) + _HEADER_BLOCK + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    )


class TooLarge(Exception):
    """A message over the server's ``max_payload`` (payload and headers): refused here, before the
    server would close the connection for it. No retry can help; it never leaves meshflow."""

    def __init__(self, subject: str, size: int, limit: int) -> None:
        super().__init__(
            f"a message of {size} bytes (payload and headers) on {subject} is over the NATS server's "
            f"max_payload of {limit} bytes"
        )
        self.subject = subject
        self.size = size
        self.limit = limit


class _ErrorBody(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    """The stream's answer to a publish: where it stored the message, or why it did not."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ErrorBody | None = None


_puback_decoder = msgspec.json.Decoder(PubAck)


class Requester:
    """Request/reply over one wildcard inbox: the fast path for publishes, KV writes and gets.

    nats-py's ``js.publish`` makes a random token, a response future and a timeout task per
    request and parses the ack into a dataclass; on the engine's hot path that was a third of the
    worker's CPU. Here a request is a counter, a future and a timer handle, and acks are decoded by
    msgspec. The subscription survives reconnects (nats-py re-subscribes).
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self._prefix = ""
        self._pending: dict[str, asyncio.Future[Any]] = {}
        # Batched direct gets: several replies per request, collected until a status reply.
        self._batches: dict[str, tuple[list[tuple[dict[str, str], bytes]], asyncio.Future[None]]] = {}
        self._next = 0
        self._starting = asyncio.Lock()

    def check_size(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
        """`TooLarge` if the message is over the server's ``max_payload``."""
        size = message_size(payload, headers)
        if size > self.nc.max_payload:
            raise TooLarge(subject, size, self.nc.max_payload)

    async def start(self) -> None:
        """Subscribe the reply inbox, once, however many first requests race to it."""
        async with self._starting:
            if not self._prefix:
                prefix = self.nc.new_inbox()
                await self.nc.subscribe(prefix + ".*", cb=self._on_reply)
                self._prefix = prefix

    async def _on_reply(self, msg: Any) -> None:
        token = msg.subject[len(self._prefix) + 1 :]
        batch = self._batches.get(token)
        if batch is not None:
            self._on_batch_reply(batch, msg)
            return
        fut = self._pending.pop(token, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    @staticmethod
    def _on_batch_reply(
        batch: tuple[list[tuple[dict[str, str], bytes]], asyncio.Future[None]], msg: Any
    ) -> None:
        out, done = batch
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            out.append((headers, msg.data))
        elif not done.done():
            if status in ("204", "404"):  # end of batch / nothing matched
                done.set_result(None)
            else:  # 413: more subjects match than one request may return
                done.set_exception(ApiError(int(status), 0, headers.get("Description", "")))

    def _expire(self, token: str) -> None:
        fut = self._pending.pop(token, None)
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError())

    def _expire_all(self, tokens: list[str]) -> None:
        for token in tokens:
            self._expire(token)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - one timer handle per request, cheaper than a scope
    ) -> Any:
        """Send and wait for the reply message; `ApiError` for a status reply (e.g. 503)."""
        self.check_size(subject, payload, headers)
        if not self._prefix:
            await self.start()
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[token] = fut
        timer = loop.call_later(timeout, self._expire, token)
        try:
            await self.nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
            msg = await fut
        finally:
            timer.cancel()
            self._pending.pop(token, None)
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and status not in ("404",):
            raise ApiError(int(status), 0, _status_text(status, msg.headers.get("Description", "")))
        return msg

    async def publish_batch(
        self,
        items: Sequence[tuple[str, bytes, dict[str, str] | None]],
        timeout: float = 5.0,  # noqa: ASYNC109 - one timer handle for the whole batch
    ) -> list[PubAck | BaseException]:
        """Publish every item with all of them in flight at once; an ack or an error for each.

        No coroutine per message: the requests go out back to back and one gather waits for the
        replies, which is what lets a client ingest near the server's limit.
        """
        for subject, payload, headers in items:  # none is sent if one is too large
            self.check_size(subject, payload, headers)
        if not self._prefix:
            await self.start()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        tokens: list[str] = []
        for subject, payload, headers in items:
            self._next += 1
            token = str(self._next)
            fut: asyncio.Future[Any] = loop.create_future()
            self._pending[token] = fut
            futures.append(fut)
            tokens.append(token)
            await self.nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
        timer = loop.call_later(timeout, self._expire_all, tokens)
        try:
            replies = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            timer.cancel()
            for token in tokens:
                self._pending.pop(token, None)
        out: list[PubAck | BaseException] = []
        for reply in replies:
            if isinstance(reply, BaseException):
                out.append(reply)
                continue
            status = reply.headers.get("Status") if reply.headers else None
            if status is not None:
                out.append(
                    ApiError(int(status), 0, _status_text(status, reply.headers.get("Description", "")))
                )
                continue
            ack = _puback_decoder.decode(reply.data)
            err = ack.error
            out.append(ack if err is None else ApiError(err.code, err.err_code, err.description))
        return out

    async def publish(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - passed down to `request`
    ) -> PubAck:
        """Publish to a stream and return its ack; `ApiError` when the stream refused it."""
        msg = await self.request(subject, payload, headers, timeout)
        ack = _puback_decoder.decode(msg.data)
        if ack.error is not None:
            raise ApiError(ack.error.code, ack.error.err_code, ack.error.description)
        return ack

    async def direct_batch(
        self,
        stream: str,
        request: dict[str, Any],
        timeout: float = 10.0,  # noqa: ASYNC109 - one timer handle per request
    ) -> list[tuple[dict[str, str], bytes]]:
        """A batched direct get (``batch``, ``multi_last``, ``next_by_subj``...): (headers, data) each.

        Raises `ApiError` when the server refuses (413: more subjects match than it returns).
        """
        if not self._prefix:
            await self.start()
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        out: list[tuple[dict[str, str], bytes]] = []
        done: asyncio.Future[None] = loop.create_future()
        self._batches[token] = (out, done)
        timer = loop.call_later(timeout, _fail_if_pending, done)
        try:
            await self.nc.publish(
                direct_get_subject(stream), msgspec.json.encode(request), reply=f"{self._prefix}.{token}"
            )
            await done
        finally:
            timer.cancel()
            self._batches.pop(token, None)
        return out

    async def direct_get(
        self,
        stream: str,
        subject: str,
        timeout: float = 5.0,  # noqa: ASYNC109 - passed to `request`
    ) -> tuple[bytes, int, str] | None:
        """The last message on ``subject`` as (data, sequence, KV operation), or None if none.

        The operation is ``""`` for a value, ``"DEL"`` or ``"PURGE"`` for a deleted KV key.
        """
        msg = await self.request(f"{direct_get_subject(stream)}.{subject}", b"", None, timeout)
        headers = msg.headers or {}
        if headers.get("Status") == "404":
            return None
        return msg.data, int(headers.get("Nats-Sequence", "0")), headers.get(HDR_KV_OPERATION, "")


def _status_text(status: str, description: str) -> str:
    """A status reply's description, or what the status means when it has none we can show."""
    text = description.strip().splitlines()[0].strip() if description.strip() else ""
    if text and ":" not in text:
        return text
    return {"503": "no responders: the stream has no leader, or no server serves it"}.get(
        status, f"status {status}"
    )


def _fail_if_pending(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())
