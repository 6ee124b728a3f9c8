"""Waiters: runs suspended in ``wait_for_event`` / ``wait_for_any``, and which events they accept.

A waiting run is written to the ``{ns}_waits`` bucket once per event it accepts, under a key the
router can find from the event alone:

- with ``match="data.userId"``: ``{name}.m.{field}.{value}.{run}.{step}.{i}``, where ``value`` is a
  hash of the triggering event's ``data.userId``. An event is routed with one lookup per match
  field in use for its name (the ``{name}.f.*`` markers), whatever the number of waiters;
- without ``match``: ``{name}.x.{run}.{step}.{i}``, checked against every event of that name.

An event is accepted when it lies in the waiter's window (stream sequence above ``floor_seq``, or
stored at or after ``floor_time``), has the exact name (two names can share a subject), matches,
and passes ``if_``. Whoever accepts it first commits the step's memo (``create``: first writer
wins), so an event and a timeout, or two events, resolve a wait exactly once.

Pure: no I/O; the router (``meshflow.router``) does the reading and writing.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from typing import Any

import msgspec

from .durations import parse_duration, to_ms
from .errors import ConfigError, EventError
from .events import Event, validate_event_name
from .expressions import Expression, compile_expression, compile_match, lookup, match_key
from .names import Names
from .runs import StepKind, StepMemo, WaitSpec


class Waiter(msgspec.Struct, frozen=True, kw_only=True):
    """One event one waiting run accepts, as stored in the waits bucket."""

    v: int = 1
    run_id: str
    app: str
    fn: str
    key: str  # the step hash
    step_id: str
    since: int  # when the wait began, epoch ms
    until: int  # its timeout, epoch ms
    spec: WaitSpec
    trigger: Event | None = None  # the run's triggering event, when ``spec.if_`` needs it
    keys: list[str] = msgspec.field(default_factory=list)  # every key of this wait (wait_for_any)
    kind: str = "wait"  # or "cancel": a cancel_on, which cancels the run instead


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Waiter)


def encode_waiter(waiter: Waiter) -> bytes:
    return _encoder.encode(waiter)


def decode_waiter(raw: bytes) -> Waiter:
    return _decoder.decode(raw)


@functools.lru_cache(maxsize=1024)
def _condition(source: str) -> Expression:
    return compile_expression(source, variables=("event", "async"), what="if_")


@functools.lru_cache(maxsize=1024)
def _path(source: str) -> tuple[str, ...]:
    return compile_match(source, what="match")


def match_token(obj: dict[str, Any], path: str) -> str | None:
    """The index token of the value at a match path like ``data.userId`` (None: there is none)."""
    found, value = lookup(obj, _path(path))
    return match_key(value) if found else None


def _token(text: str, size: int) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:size]


def name_token(event_name: str) -> str:
    return _token(event_name, 20)


def field_token(path: str) -> str:
    return _token(path, 12)


def waiter_keys(names: Names, run_id: str, step: str, specs: list[WaitSpec]) -> list[str | None]:
    """The waits-bucket key of each spec (None: a match the trigger has no value for never fires)."""
    keys: list[str | None] = []
    for i, spec in enumerate(specs):
        ntok = name_token(spec.event)
        if spec.match is None:
            keys.append(names.wait_scan_key(ntok, run_id, step, i))
        elif spec.match_token is None:
            keys.append(None)
        else:
            keys.append(
                names.wait_match_key(ntok, field_token(spec.match), spec.match_token, run_id, step, i)
            )
    return keys


def in_window(spec: WaitSpec, seq: int, stored_ms: int) -> bool:
    """Whether an event at stream ``seq``, stored at ``stored_ms``, is in the wait's window."""
    if seq == spec.not_seq:
        return False
    if spec.floor_seq > 0:
        return seq > spec.floor_seq
    return stored_ms >= spec.floor_time


def accepts(spec: WaitSpec, trigger: Event | None, event: Event) -> bool:
    """Whether ``event`` satisfies the spec's name, match and condition (not its window)."""
    if event.name != spec.event:
        return False
    candidate: dict[str, Any] | None = None
    if spec.match is not None:
        if spec.match_token is None:
            return False
        candidate = msgspec.to_builtins(event)
        if match_token(candidate, spec.match) != spec.match_token:
            return False
    if spec.if_ is not None:
        expr = _condition(spec.if_)
        bindings = {
            "event": msgspec.to_builtins(trigger) if trigger is not None else {},
            "async": candidate if candidate is not None else msgspec.to_builtins(event),
        }
        return expr.test(bindings)
    return True


def wait_spec(
    spec: tuple[object, object, object],
    *,
    trigger: Event,
    seq: int,
    created_at: int,
    memos: Iterable[StepMemo],
    now: int,
    lookback: object,
    since: object,
    what: str,
) -> WaitSpec:
    """The window and match of one event a ``wait_for_event`` accepts: ``(name, match, if_)``
    checked (`ConfigError` naming ``what``), the trigger's match value hashed, and the window
    opened after the run's trigger (stream ``seq``), or by time (``lookback``, ``since="wait"``),
    and after the last event of that name the run took (its WAIT ``memos``).
    """
    name, match, condition = spec
    try:
        validate_event_name(name)
    except EventError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    assert isinstance(name, str)
    token: str | None = None
    if match is not None:
        compile_match(match, what=what)  # a bad path is the user's error, named here
        token = match_token(msgspec.to_builtins(trigger), str(match))
    if condition is not None:
        compile_expression(condition, variables=("event", "async"), what=f"{what} if_")
    if since not in ("trigger", "wait"):
        raise ConfigError(f"{what}: since must be 'trigger' (the default) or 'wait', got {since!r}")
    back = None if lookback is None else to_ms(parse_duration(lookback, what=f"{what} lookback"))  # type: ignore[arg-type]
    floor_seq, floor_time = 0, 0
    if since == "wait":
        floor_time = now
    else:
        if seq > 0 and lookback is None:
            floor_seq = seq
        else:
            floor_time = created_at or now
        if back is not None:
            floor_time = max(0, floor_time - back)
        # never the same event twice: after the last one this run took under this name
        taken = [m.seq for m in memos if m.kind is StepKind.WAIT and m.seq > 0 and _name_of(m) == name]
        if taken:
            floor_seq, floor_time = max(max(taken), floor_seq), 0
    return WaitSpec(
        event=name,
        match=match if isinstance(match, str) else None,
        match_token=token,
        if_=condition if isinstance(condition, str) else None,
        floor_seq=floor_seq,
        floor_time=floor_time,
        not_seq=seq if floor_seq == 0 else 0,  # a time window must not take the trigger
    )


def _name_of(memo: StepMemo) -> str:
    """The event name a WAIT memo took ("" for a timeout)."""
    try:
        data = msgspec.json.decode(memo.output)
    except msgspec.DecodeError:
        return ""
    return str(data.get("name", "")) if isinstance(data, dict) else ""
