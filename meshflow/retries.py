"""Retry policy: how many times a failed step or function is tried again, and how long to wait.

Invariants:

- A policy that came out of `retry_policy` has 0..20 retries, a non-empty backoff table of
  positive `timedelta`s, and a jitter fraction in [0, 1]. Everything else in meshflow takes a
  policy for granted, so `retry_policy` is the one place that checks.
- `retries=N` means N + 1 attempts in all.
- The delay after the k-th failure is `backoff[k - 1]`, or the last entry once past the end, plus
  up to `jitter` of itself at random. Jitter only ever lengthens a delay.
- Pure: the random number comes in as an argument, so the same inputs give the same delay.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

import msgspec

from meshflow.durations import ms_at, parse_duration, parse_when, to_ms
from meshflow.errors import (
    ConfigError,
    EventError,
    MeshflowError,
    NestedStepError,
    NonDeterminismError,
    NonRetriableError,
    RetryAfterError,
    SerializationError,
    StepError,
)

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_JITTER",
    "DEFAULT_RETRIES",
    "MAX_RETRIES",
    "Retry",
    "attempts_left",
    "backoff_delay",
    "retry_policy",
]

DEFAULT_BACKOFF: tuple[dt.timedelta, ...] = tuple(
    dt.timedelta(seconds=s) for s in (15, 30, 60, 2 * 60, 5 * 60, 10 * 60, 20 * 60, 40 * 60, 3_600, 2 * 3_600)
)
DEFAULT_RETRIES = 4
MAX_RETRIES = 20
DEFAULT_JITTER = 0.1


class Retry(msgspec.Struct, frozen=True, kw_only=True):
    """How a step or function is retried after it fails.

    Pass it through `retry_policy` before use: msgspec does not check fields on construction,
    and `retry_policy` also turns backoff entries like `"1s"` into `timedelta`s.

    Attributes:
        retries: attempts after the first one, 0 to 20.
        backoff: the delay after the 1st, 2nd, ... failure; past the end the last entry repeats.
        jitter: up to this fraction of each delay is added at random, 0 to 1.
    """

    retries: int = DEFAULT_RETRIES
    backoff: tuple[dt.timedelta, ...] = DEFAULT_BACKOFF
    jitter: float = DEFAULT_JITTER


def _check_retries(value: object, what: str) -> int:
    # bool is an int subclass, and `retries=True` is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise ConfigError(f"invalid retries {value!r} for {what}: use a whole number from 0 to {MAX_RETRIES}")
    return value


def _check_backoff(value: object, what: str) -> tuple[dt.timedelta, ...]:
    # A lone string is a Sequence too, and would be read one character at a time.
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"invalid backoff {value!r} for {what}: "
            'use a non-empty list of durations, like ("1s", "30s", "5m")'
        )
    delays = tuple(parse_duration(item, what=f"backoff of {what}") for item in value)
    for item, delay in zip(value, delays, strict=True):
        if delay <= dt.timedelta(0):
            # Zero would retry in a tight loop against whatever just failed.
            raise ConfigError(f"invalid backoff {item!r} for {what}: each delay must be more than zero")
    return delays


def _check_jitter(value: object, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ConfigError(f"invalid jitter {value!r} for {what}: use a fraction from 0 to 1, like 0.1")
    return float(value)


def retry_policy(value: int | Retry | None, *, what: str = "function") -> Retry:
    """Check a user's retry setting and return it as a normalised `Retry`.

    Args:
        value: `None` for the defaults, a number of retries, or a `Retry` whose backoff entries
            may be anything `parse_duration` accepts (`"30s"`, seconds, `timedelta`).
        what: what the policy is for, named in error messages (`"function 'send-email'"`).

    Returns:
        A `Retry` with an int `retries`, a tuple of positive `timedelta`s and a float `jitter`.

    Raises:
        ConfigError: retries, backoff or jitter is out of range or of the wrong type
            (a bad backoff entry raises `DurationError`, a `ConfigError`).
    """
    obj: object = value  # typed callers cannot pass anything else; config files and untyped code can
    if obj is None:
        return Retry()
    if isinstance(obj, Retry):
        return Retry(
            retries=_check_retries(obj.retries, what),
            backoff=_check_backoff(obj.backoff, what),
            jitter=_check_jitter(obj.jitter, what),
        )
    if isinstance(obj, int):  # bool included, so `True` gets the retries message
        return Retry(retries=_check_retries(obj, what))
    raise ConfigError(
        f"invalid retry setting {obj!r} for {what}: use a number of retries from 0 to {MAX_RETRIES} "
        "or a meshflow Retry"
    )


def attempts_left(policy: Retry, failures: int) -> bool:
    """Whether another attempt is allowed after `failures` failed attempts.

    Args:
        policy: a policy from `retry_policy`.
        failures: how many attempts have failed so far.

    Returns:
        True while `failures <= policy.retries`; `retries=4` allows 5 attempts in all.
    """
    return failures <= policy.retries


def backoff_delay(policy: Retry, failures: int, rnd: float) -> dt.timedelta:
    """How long to wait before the next attempt, after `failures` failed attempts.

    Args:
        policy: a policy from `retry_policy`.
        failures: how many attempts have failed so far, 1 or more.
        rnd: a random number in [0, 1), from the caller, so this function stays deterministic.

    Returns:
        `backoff[failures - 1]` (the last entry once past the end), plus `jitter * rnd` of it.

    Raises:
        ValueError: `failures` is below 1 or `rnd` is outside [0, 1); both are caller bugs.
    """
    if failures < 1:
        raise ValueError(f"backoff_delay needs failures >= 1, got {failures!r}")
    if not 0 <= rnd < 1:
        raise ValueError(f"backoff_delay needs rnd in [0, 1), got {rnd!r}")
    base = policy.backoff[min(failures, len(policy.backoff)) - 1]
    # The jitter term is >= 0 and timedelta rounds it to whole microseconds, so the result never
    # drops below the table value.
    return base + base * (policy.jitter * rnd)


def never_retried(exc: BaseException) -> bool:
    """Whether an error fails its step (or run) at once, whatever attempts are left: a
    `NonRetriableError`, a step that failed for good, a misuse of meshflow, or a non-``Exception``
    (``SystemExit``...)."""
    return (
        not isinstance(exc, Exception)
        or isinstance(exc, NonRetriableError | StepError | ConfigError | SerializationError)
        or isinstance(exc, NestedStepError | NonDeterminismError | EventError)
    )


def retry_delay_ms(exc: BaseException, policy: Retry, failures: int, now: int, rnd: float) -> int:
    """Milliseconds until the next attempt after ``failures`` failures: what a `RetryAfterError`
    asks for (a delay, or a point in time), else the policy's backoff (``rnd`` its jitter)."""
    if isinstance(exc, RetryAfterError):
        try:
            if isinstance(exc.delay, dt.datetime) or (
                isinstance(exc.delay, str) and exc.delay[:1].isdigit() and "T" in exc.delay
            ):
                when = parse_when(exc.delay)
                return max(0, ms_at(when) - now)
            return to_ms(parse_duration(exc.delay, what="RetryAfterError delay"))
        except MeshflowError:
            pass  # an unusable delay falls back to the backoff table
    return to_ms(backoff_delay(policy, failures, rnd))
