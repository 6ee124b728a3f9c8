"""JSON encoding of user values: step outputs, run outputs, event data.

Stored values are JSON. Besides plain JSON values, msgspec Structs, dataclasses, attrs classes,
datetimes, UUIDs, enums and pydantic models (through ``model_dump(mode="json")``) are encoded.
A value is always handed back to the function as decoded JSON (or as ``type`` when one is given),
the first time and on every replay alike, so a function cannot behave differently on replay.
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
