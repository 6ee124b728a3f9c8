"""Identifiers: ULIDs, run ids, step hashes, and the rules for app and function ids.

Invariants:

- A ULID is 26 characters of Crockford base32 (upper case): a 48-bit millisecond timestamp then
  80 bits of entropy, big-endian, so ULIDs from different milliseconds sort by time as strings.
- `run_id_for` and `ulid_from` are deterministic: the same inputs give the same id, which lets a
  redelivered trigger map to the run it already started.
- Step hashes match Inngest: sha1 of the step id for its first use, of `"{id}:{n}"` for the n-th
  repeat, so a loop that reuses one id still gets one distinct, replay-stable hash per call.
- App and function ids are safe NATS subject tokens and consumer names.
- Pure: no I/O; only `new_ulid` reads the clock and the OS random source, and only when asked.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

from meshflow.errors import ConfigError

__all__ = [
    "MAX_ULID_TIME_MS",
    "ULID_ALPHABET",
    "StepCounter",
    "is_ulid",
    "new_ulid",
    "run_id_for",
    "step_hash",
    "ulid_from",
    "ulid_time_ms",
    "validate_id",
]

ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAX_ULID_TIME_MS = 2**48 - 1
_ENTROPY_BYTES = 10

_DECODE = {char: index for index, char in enumerate(ULID_ALPHABET)}
# 26 base32 digits hold 130 bits; a ULID has 128, so the first digit is at most 7.
_ULID_RE = re.compile(rf"[0-7][{ULID_ALPHABET}]{{25}}")

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ID_HINT = "use 1-64 letters, digits, '-' or '_', starting with a letter or digit"


def ulid_from(ts_ms: int, entropy: bytes) -> str:
    """Build a ULID from a timestamp and entropy, deterministically.

    Args:
        ts_ms: milliseconds since the Unix epoch, 0 to 2**48 - 1.
        entropy: exactly 10 bytes.

    Returns:
        The 26-character ULID.

    Raises:
        ConfigError: `ts_ms` is out of range or `entropy` is not 10 bytes.
    """
    if isinstance(ts_ms, bool) or not 0 <= ts_ms <= MAX_ULID_TIME_MS:
        raise ConfigError(f"invalid ULID timestamp {ts_ms!r}: use milliseconds from 0 to 2**48 - 1")
    if len(entropy) != _ENTROPY_BYTES:
        raise ConfigError(f"invalid ULID entropy {entropy!r}: use exactly {_ENTROPY_BYTES} bytes")
    number = (ts_ms << 80) | int.from_bytes(entropy, "big")
    # Most significant digit first, so string order is numeric order.
    return "".join(ULID_ALPHABET[(number >> shift) & 0x1F] for shift in range(125, -1, -5))


def new_ulid(now_ms: int | None = None) -> str:
    """A fresh ULID with 80 bits of OS randomness.

    Args:
        now_ms: the timestamp to embed, in Unix milliseconds; the current time when `None`.

    Returns:
        The 26-character ULID.
    """
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    return ulid_from(now_ms, secrets.token_bytes(_ENTROPY_BYTES))


def is_ulid(value: str) -> bool:
    """Whether `value` is a ULID in canonical (upper case) form.

    Args:
        value: the text to check.

    Returns:
        True for 26 Crockford base32 characters that fit in 128 bits.
    """
    return isinstance(value, str) and _ULID_RE.fullmatch(value) is not None


def ulid_time_ms(value: str) -> int:
    """The millisecond timestamp a ULID carries.

    Args:
        value: a canonical ULID.

    Returns:
        Milliseconds since the Unix epoch.

    Raises:
        ConfigError: `value` is not a canonical ULID.
    """
    if not is_ulid(value):
        raise ConfigError(f"invalid ULID {value!r}: use 26 characters of {ULID_ALPHABET}, the first one 0-7")
    # The first 10 digits hold 50 bits: 2 zero pad bits, then the 48-bit timestamp.
    number = 0
    for char in value[:10]:
        number = (number << 5) | _DECODE[char]
    return number


def run_id_for(function_id: str, key: str, ts_ms: int) -> str:
    """The run id for one trigger of one function: time-sortable and deterministic.

    The same function and key (usually the triggering event's id) always give the same entropy,
    so a trigger delivered twice at the same timestamp names the same run.

    Args:
        function_id: the function's id.
        key: what makes this run unique for the function, usually the event id.
        ts_ms: the timestamp to embed, usually the event's; clamped to 0..2**48 - 1.

    Returns:
        The run id, a ULID.
    """
    entropy = hashlib.sha256(f"{function_id}\n{key}".encode()).digest()[:_ENTROPY_BYTES]
    return ulid_from(min(max(ts_ms, 0), MAX_ULID_TIME_MS), entropy)


def step_hash(step_id: str, n: int = 0) -> str:
    """The hash that identifies the `n`-th repeat of a step id within a run, as Inngest does.

    Args:
        step_id: the id the function gave the step.
        n: how many times the id was used before in this run.

    Returns:
        Hex sha1 of `step_id` when `n` is 0, else of `f"{step_id}:{n}"`.
    """
    text = step_id if n == 0 else f"{step_id}:{n}"
    # An identity hash compatible with Inngest, not a security measure.
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


class StepCounter:
    """Hands out step hashes during one execution, counting repeats of each step id.

    Replay runs the function from the top, so a fresh counter per execution yields the same
    hashes in the same order every time.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        """Start with no step ids seen."""
        self._seen: dict[str, int] = {}

    def next(self, step_id: str) -> str:
        """The hash for this use of `step_id`.

        Args:
            step_id: the id the function gave the step.

        Returns:
            `step_hash(step_id)` the first time, then `step_hash(step_id, 1)`, `(step_id, 2)`, ...
        """
        n = self._seen.get(step_id, 0)
        self._seen[step_id] = n + 1
        return step_hash(step_id, n)


def validate_id(value: str, *, what: str) -> str:
    """Check an app or function id, which becomes a NATS subject token and consumer name.

    Args:
        value: the id.
        what: what it is, for the error message (`"function id"`, `"app id"`).

    Returns:
        `value`, unchanged.

    Raises:
        ConfigError: the id is empty, longer than 64 characters, or has a character other than
            ASCII letters, digits, `-` and `_` (dots, `*` and `>` would change subject matching).
    """
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise ConfigError(f"invalid {what} {value!r}: {_ID_HINT}")
    return value
