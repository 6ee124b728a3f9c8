"""Events: what services send and what triggers functions.

An event is ``{name, data, id, ts, v}``. ``id`` defaults to a ULID and is the dedupe key: sending
the same id twice yields the runs of one event. ``ts`` is epoch milliseconds. Names look like
``user/signup`` or ``app/user.created``; they become NATS subject tokens (see ``names``), so they
may not contain whitespace, ``*``, ``>``, empty segments, or exceed 256 characters.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from .durations import now_ms
from .errors import EventError
from .ids import MAX_ULID_TIME_MS, new_ulid, ulid_from

MAX_NAME_LENGTH = 256
_FORBIDDEN = frozenset("*>")


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """An event. Build one with ``Event(name="user/signup", data={"email": "a@b.c"})``.

    Attributes:
        name: what happened, like ``user/signup``.
        data: a JSON object with the event's payload.
        id: unique id and dedupe key (a ULID unless given).
        ts: when it happened, epoch milliseconds (now unless given).
        v: an optional schema version of the payload.
    """

    name: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str = msgspec.field(default_factory=new_ulid)
    ts: int = msgspec.field(default_factory=now_ms)
    v: str | None = None


def validate_event_name(name: object) -> str:
    """Return ``name`` if it is a valid event name, else raise `EventError` saying why."""
    if not isinstance(name, str) or not name:
        raise EventError(f"invalid event name {name!r}: a non-empty string like 'user/signup' is needed")
    if len(name) > MAX_NAME_LENGTH:
        raise EventError(f"invalid event name {name[:40]!r}...: longer than {MAX_NAME_LENGTH} characters")
    bad = next((c for c in name if c.isspace() or c in _FORBIDDEN or not c.isprintable()), None)
    if bad is not None:
        raise EventError(
            f"invalid event name {name!r}: it contains {bad!r}; whitespace, '*' and '>' are not allowed"
        )
    if any(segment == "" for segment in name.replace("/", ".").split(".")):
        raise EventError(
            f"invalid event name {name!r}: empty segment (names look like 'app/user.created', "
            "with no leading, trailing or doubled '/' or '.')"
        )
    return name


def validate_event(event: object) -> Event:
    """Check an event before sending: its type, name, id and data."""
    if not isinstance(event, Event):
        raise EventError(f"expected a meshflow.Event, got {type(event).__name__}")
    validate_event_name(event.name)
    if not isinstance(event.id, str) or not event.id or len(event.id) > 256:
        raise EventError(f"event {event.name!r}: id must be a non-empty string of at most 256 characters")
    if not isinstance(event.data, dict):
        raise EventError(
            f"event {event.name!r}: data must be a JSON object (dict), got {type(event.data).__name__}"
        )
    if not isinstance(event.ts, int) or isinstance(event.ts, bool) or event.ts < 0:
        raise EventError(f"event {event.name!r}: ts must be epoch milliseconds (a non-negative int)")
    return event


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    """Validate and encode an event as JSON; raise `EventError` when its data is not JSON."""
    validate_event(event)
    try:
        return _encoder.encode(event)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # RecursionError: a cycle
        raise EventError(
            f"event {event.name!r} (id {event.id}): data is not JSON-serializable: {exc}"
        ) from exc


def events_to_send(events: object, *, what: str, limit: int | None = None) -> list[Event]:
    """``events`` (an Event, or a non-empty list of them) as a list, every one checked, encodable
    and at most ``limit`` bytes before any is sent; `EventError` naming ``what`` otherwise."""
    batch = [events] if isinstance(events, Event) else events
    if not isinstance(batch, list | tuple) or not batch or not all(isinstance(e, Event) for e in batch):
        raise EventError(f"{what} takes an Event or a non-empty list of Events")
    for event in batch:
        check_event_size(event, len(encode_event(event)), limit)
    return list(batch)


#: What an event leaves of the server's max_payload for the other fields of its runs' records.
RECORD_ROOM = 8 * 1024


def event_limit(max_payload: int) -> int:
    """The largest event (encoded) that a server with this ``max_payload`` can store and run."""
    return max_payload - RECORD_ROOM


def check_event_size(event: Event, size: int, limit: int | None) -> None:
    """`EventError` if an event of ``size`` encoded bytes is over ``limit``."""
    if limit is not None and size > limit:
        raise EventError(
            f"event {event.name!r} (id {event.id}) is {size} bytes; an event may be at most {limit} "
            f"bytes (the NATS server's max_payload less {RECORD_ROOM} bytes its runs' records need "
            "beside it); nothing was sent"
        )


def decode_event(raw: bytes) -> Event:
    """Decode an event meshflow stored itself (a memo's, a record's): it always has id and ts."""
    return _decoder.decode(raw)


class _Published(msgspec.Struct, frozen=True, kw_only=True):
    """An event as any publisher may have written it: ``id`` and ``ts`` are optional."""

    name: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str | None = None
    ts: int | None = None
    v: str | None = None


_published_decoder = msgspec.json.Decoder(_Published)


def stream_event_id(stream: str, seq: int, stored_ms: int) -> str:
    """The id of an event published without one: a ULID of the time the stream stored it, with
    entropy from where it is stored (``sha256("MF_EVENTS:4242")``), the same however often it is
    read, so every redelivery maps to the same runs (and they sort by time like any others)."""
    entropy = hashlib.sha256(f"{stream}:{seq}".encode()).digest()[:10]
    return ulid_from(min(max(stored_ms, 0), MAX_ULID_TIME_MS), entropy)


def decode_stored_event(raw: bytes, *, stream: str, seq: int, stored_ms: int) -> Event:
    """Decode an event read from the events stream at sequence ``seq``. One published without an
    ``id`` gets `stream_event_id`; one without a ``ts``, the time the stream stored it.

    Raises:
        msgspec.DecodeError: the message is not an event (not JSON, no name, data not an object).
    """
    got = _published_decoder.decode(raw)
    return Event(
        name=got.name,
        data=got.data,
        id=got.id if got.id else stream_event_id(stream, seq, stored_ms),
        ts=got.ts if got.ts is not None else stored_ms,
        v=got.v,
    )
