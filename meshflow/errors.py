"""Every error meshflow raises, in one tree.

    MeshflowError
    ├── ConfigError            bad function config: duration, retries, trigger, ids (at registration)
    │   └── DurationError      a duration or a point in time that cannot be parsed
    ├── EventError             an event that cannot be sent: bad name, bad data, too large
    ├── SerializationError     a value that cannot be stored as JSON (step output, run output)
    ├── ExpressionError        a CEL expression failed to evaluate (a missing field, mixed types)
    ├── StepError              a step failed for good; raised at the `step.run` call site, catchable
    ├── NestedStepError        a step was called inside another step's handler
    ├── NonDeterminismError    on replay, a step id came back as a different kind of step
    ├── RunNotFoundError       the client asked for a run that does not exist
    ├── RunTimeoutError        `wait_for_run` gave up before the run finished
    ├── StateError             a stored run record or step result cannot be read (edited by hand,
    │                          or written by an incompatible meshflow)
    └── NatsError              NATS could not be reached or refused a request (wraps nats-py errors)

Errors a step handler raises to steer retries (they are not failures of meshflow itself):

    NonRetriableError          fail this step (or run) now, no more attempts
    RetryAfterError            retry, but not before the given delay or time

Engine control flow (suspending a run at a sleep, say) uses private `BaseException` subclasses in
`meshflow.replay`, so a user's `except Exception:` can never swallow it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


class MeshflowError(Exception):
    """Base class of every error meshflow raises."""


class ConfigError(MeshflowError, ValueError):
    """A function, trigger or option was configured wrongly; raised when it is registered."""


class DurationError(ConfigError):
    """A duration (`"30s"`, `"3 days"`) or a point in time could not be parsed."""


class EventError(MeshflowError, ValueError):
    """An event was refused before anything was published: bad name, bad data or too large."""


class SerializationError(MeshflowError, TypeError):
    """A value could not be encoded as JSON for storage."""


class ExpressionError(MeshflowError):
    """A CEL expression could not be evaluated for an event (a missing field, mixed types...).

    Conditions (trigger and wait ``if_``) treat it as false; an idempotency key that fails to
    evaluate starts the run without a key.
    """


class StepError(MeshflowError):
    """A step failed for good (its retries are exhausted, or it raised `NonRetriableError`).

    Raised at the `ctx.step.run(...)` call site, so a function may catch it and go on.

    Attributes:
        step_id: the id the function gave the step.
        error_type: the class name of the error the step's handler raised.
        error_message: that error's message.
        traceback: the handler's formatted traceback, when there was one.
    """

    def __init__(self, step_id: str, error_type: str, error_message: str, traceback: str = "") -> None:
        super().__init__(f"step {step_id!r} failed: {error_type}: {error_message}")
        self.step_id = step_id
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback


class RunNotFoundError(MeshflowError, LookupError):
    """No run has this id."""


class RunTimeoutError(MeshflowError, TimeoutError):
    """A run did not reach a terminal status within the time the caller allowed."""


class StateError(MeshflowError):
    """A stored run record or step result cannot be read: it was edited by hand, or written by a
    meshflow that stores it differently. The decoding error is the `__cause__`."""


class NatsError(MeshflowError):
    """NATS could not be reached or refused a request; the nats-py error is the `__cause__`."""


class NonRetriableError(Exception):
    """Raise from a step (or a function) to fail it at once, without further attempts."""


class RetryAfterError(Exception):
    """Raise from a step (or a function) to be retried after `delay` instead of the backoff table.

    Args:
        message: what went wrong.
        delay: how long to wait: a `timedelta`, seconds, a duration string like `"30s"`,
            or an aware `datetime` to retry at.
    """

    def __init__(self, message: str, delay: Any) -> None:
        super().__init__(message)
        self.delay: dt.timedelta | dt.datetime | float | int | str = delay


class NestedStepError(MeshflowError):
    """A step was called from inside another step's handler; steps must be called from the function."""


class NonDeterminismError(MeshflowError):
    """On replay the function called a different kind of step under an id that already has a result."""
