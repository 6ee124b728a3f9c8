"""JSON encoding of user values: step outputs and inputs, run outputs, event data.

Stored values are JSON. Besides plain JSON values, msgspec Structs, dataclasses, attrs classes,
datetimes, UUIDs, enums and pydantic models (through ``model_dump(mode="json")``) are encoded.
A value is always handed back to the function as decoded JSON (or as ``type`` when one is given),
the first time and on every replay alike, so a function cannot behave differently on replay.

A step's inputs (its arguments) are kept for people to read, never handed back to code: they are
bounded (`MAX_INPUT`) and never fail the step. Arguments that are not JSON, or too large, are
kept as a JSON string marking why (`encode_input`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import SerializationError


def _enc_hook(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)  # pydantic v2 models
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"cannot encode a value of type {type(obj).__module__}.{type(obj).__qualname__}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_any_decoder = msgspec.json.Decoder()


def encode_value(value: Any, *, what: str, limit: int | None = None) -> msgspec.Raw:
    """Encode ``value`` as JSON, or raise `SerializationError` naming ``what`` (a step, a run),
    also when its JSON is over ``limit`` bytes (what one stored record may hold)."""
    try:
        raw = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # RecursionError: a cycle
        raise SerializationError(
            f"{what} returned a value meshflow cannot store as JSON ({exc}); return JSON data, "
            "a msgspec Struct, a dataclass or a pydantic model"
        ) from None
    if limit is not None and len(raw) > limit:
        raise SerializationError(
            f"{what} returned {len(raw)} bytes of JSON, more than one stored value may hold "
            f"({limit} bytes: the NATS server's max_payload less room for the record around it); "
            "store large data elsewhere and return a reference to it"
        )
    return msgspec.Raw(raw)


def decode_value(raw: msgspec.Raw | bytes | None, type: Any = None) -> Any:
    """Decode a stored value; as plain JSON data unless ``type`` is given.

    ``type`` is anything msgspec decodes into (Structs, dataclasses, TypedDicts, ...) or a
    pydantic model class.
    """
    if raw is None:
        return None
    data = bytes(raw)
    if type is None:
        return _any_decoder.decode(data)
    validate = getattr(type, "model_validate_json", None)  # pydantic models validate themselves
    if callable(validate):
        return validate(data)
    return msgspec.json.decode(data, type=type)


#: The most JSON a step's arguments keep on record; larger ones leave a marker instead.
MAX_INPUT = 64 * 1024
#: The input of a step with no arguments (or of a step that takes none: a sleep, a wait).
NO_INPUT = msgspec.Raw(b"null")
#: The input of a retrying step left out of its run's record, which would be too large with it.
INPUT_NO_ROOM = "<not stored: no room for it in the run's record>"
_MAX_REASON = 512


def encode_input(args: tuple[Any, ...], *, limit: int = MAX_INPUT) -> msgspec.Raw:
    """A step's arguments as kept on record: their JSON list, or `NO_INPUT` for none.

    Never raises. Arguments that cannot be encoded are kept as the JSON string
    ``"<not JSON: TypeError: cannot encode a value of type builtins.object>"``, and ones over
    ``limit`` bytes of JSON as ``"<not stored: 70,123 bytes of JSON, over the 64 KiB limit>"``.
    """
    if not args:
        return NO_INPUT
    try:
        raw = _encoder.encode(args)  # a tuple is a JSON list
    except Exception as exc:  # a user's model_dump may raise anything; the step runs regardless
        return _marker(f"not JSON: {_reason(exc)}")
    if len(raw) > limit:
        return _marker(f"not stored: {len(raw):,} bytes of JSON, over the {_size(limit)} limit")
    return msgspec.Raw(raw)


def input_beside(given: msgspec.Raw, room: int | None, output: int = 0) -> msgspec.Raw:
    """``given`` (from `encode_input`), or a marker when it and ``output`` bytes (the step's
    result) are more than ``room``, what one stored value may hold (None: no limit)."""
    if room is None or len(given) + output <= room:
        return given
    return _marker(f"not stored: {len(given):,} bytes of JSON, no room beside the step's result")


def _marker(text: str) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(f"<{text}>"))


def _reason(exc: Exception) -> str:
    try:
        reason = f"{type(exc).__name__}: {exc}"
    except Exception:  # a user's __str__ may raise too
        reason = type(exc).__name__
    return reason if len(reason) <= _MAX_REASON else f"{reason[:_MAX_REASON]}…"


def _size(limit: int) -> str:
    return f"{limit // 1024} KiB" if limit % 1024 == 0 else f"{limit:,} bytes"
