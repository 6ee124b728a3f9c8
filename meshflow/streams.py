"""Streams read the way the dashboard pages them: newest first, with a bounded read per page;
a subject's messages oldest first (a run's logs); a stream's first and last sequence; a
consumer's backlog. Over the fast request path
(`requests.Requester`); nats-py errors never leave this module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import msgspec

from .durations import epoch_ms
from .errors import NatsError
from .names import HDR_KV_OPERATION, consumer_info_subject, stream_info_subject
from .requests import NATS_ERRORS, ApiError, Requester

_BATCH = 1024  # the most messages one batched direct get returns
_TIMEOUT = 10.0
_READ_ERRORS: tuple[type[BaseException], ...] = (ApiError, *NATS_ERRORS)


class StreamState(msgspec.Struct, frozen=True):
    """First and last sequence of a stream (what paging backwards needs)."""

    messages: int = 0
    first_seq: int = 0
    last_seq: int = 0


class _StreamInfo(msgspec.Struct, frozen=True):
    state: StreamState = StreamState()


class _SeqPair(msgspec.Struct, frozen=True):
    consumer_seq: int = 0
    stream_seq: int = 0


class _ConsumerInfo(msgspec.Struct, frozen=True):
    num_pending: int = 0
    num_ack_pending: int = 0
    ack_floor: _SeqPair = _SeqPair()
    error: dict[str, Any] | None = None


_consumer_info_decoder = msgspec.json.Decoder(_ConsumerInfo)
_stream_info_decoder = msgspec.json.Decoder(_StreamInfo)


class Streams:
    """Reads streams a page at a time, newest first."""

    def __init__(self, requests: Requester) -> None:
        self.requests = requests

    async def stream_state(self, stream: str) -> StreamState:
        try:
            msg = await self.requests.request(stream_info_subject(stream), b"", None, _TIMEOUT)
        except _READ_ERRORS as exc:
            raise NatsError(f"cannot read stream {stream}: {exc!r}") from exc
        return _stream_info_decoder.decode(msg.data).state

    async def newest(
        self,
        stream: str,
        subject: str,
        *,
        before: int | None,
        want: int,
        keep: Callable[[bytes], bool] = lambda _: True,
        budget: int = 10_000,
    ) -> tuple[list[tuple[int, bytes, int]], int | None]:
        """The newest ``want`` messages on ``subject`` below sequence ``before`` that ``keep``
        accepts, newest first, as (sequence, data, stored time in epoch ms), and the cursor for
        the next page (None: nothing older).

        Reads windows of the stream backwards; at most ``budget`` messages are examined per call,
        so a page with a rare filter costs a bounded read, never a scan of the whole stream (it
        may then come back short, with a cursor to go on).
        """
        state = await self.stream_state(stream)
        cursor = min(before or state.last_seq + 1, state.last_seq + 1)
        found: list[tuple[int, bytes, int]] = []
        examined = 0
        window = max(want * 2, 64)
        while cursor > state.first_seq and len(found) < want and examined < budget:
            start = max(state.first_seq, cursor - window)
            page: list[tuple[int, bytes, dict[str, str]]] = []
            seq = start
            while seq < cursor:
                try:
                    batch = await self.requests.direct_batch(
                        stream, {"seq": seq, "next_by_subj": subject, "batch": min(_BATCH, cursor - seq)}
                    )
                except _READ_ERRORS as exc:
                    raise NatsError(f"cannot read {stream}: {exc!r}") from exc
                got = [(int(h.get("Nats-Sequence", "0")), d, h) for h, d in batch]
                page.extend(
                    (n, d, h) for n, d, h in got if n < cursor and d and h.get(HDR_KV_OPERATION) is None
                )
                if len(batch) < min(_BATCH, cursor - seq) or not got:
                    break
                seq = got[-1][0] + 1
            examined += cursor - start
            for n, data, headers in reversed(page):
                if keep(data):
                    found.append((n, data, stored_ms(headers)))
                    if len(found) == want:
                        return found, n
            cursor = start
            window = min(window * 2, _BATCH * 4)
        return found, (cursor if cursor > state.first_seq else None)

    async def oldest(self, stream: str, subject: str) -> list[tuple[int, bytes]]:
        """Every message on ``subject``, oldest first, as (sequence, data): batched direct gets
        (a run's log records)."""
        out: list[tuple[int, bytes]] = []
        seq = 1
        try:
            while True:
                request = {"seq": seq, "next_by_subj": subject, "batch": _BATCH}
                page = await self.requests.direct_batch(stream, request, _TIMEOUT)
                out.extend((int(h.get("Nats-Sequence", "0")), data) for h, data in page)
                if len(page) < _BATCH:
                    return out
                seq = out[-1][0] + 1
        except _READ_ERRORS as exc:
            raise NatsError(f"cannot read {subject} in stream {stream}: {exc!r}") from exc

    async def consumer_backlog(self, stream: str, consumer: str) -> tuple[int, int] | None:
        """(messages not yet delivered, delivered but not acknowledged) of a consumer, or None."""
        info = await self._consumer_info(stream, consumer)
        return None if info is None else (info.num_pending, info.num_ack_pending)

    async def consumer_done(self, stream: str, consumer: str) -> int | None:
        """How many messages a consumer has had acknowledged (its ack floor), or None."""
        info = await self._consumer_info(stream, consumer)
        return None if info is None else info.ack_floor.consumer_seq

    async def _consumer_info(self, stream: str, consumer: str) -> _ConsumerInfo | None:
        try:
            msg = await self.requests.request(consumer_info_subject(stream, consumer), b"", None, _TIMEOUT)
        except _READ_ERRORS as exc:
            raise NatsError(f"cannot read consumer {consumer}: {exc!r}") from exc
        info = _consumer_info_decoder.decode(msg.data)
        return None if info.error is not None else info


def stored_ms(headers: dict[str, str]) -> int:
    """When the stream stored a message read by a direct get (its ``Nats-Time-Stamp``), epoch ms."""
    stamp = headers.get("Nats-Time-Stamp")
    if not stamp:
        return 0
    try:
        return epoch_ms(dt.datetime.fromisoformat(stamp))
    except ValueError:
        return 0
