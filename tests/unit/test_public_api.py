"""The public surface of `meshflow`: pinned, so it never changes by accident."""

from __future__ import annotations

import meshflow

PUBLIC_API = [
    "App",
    "Attempt",
    "Batch",
    "Cancel",
    "Client",
    "Concurrency",
    "ConfigError",
    "Context",
    "Debounce",
    "DurationError",
    "Event",
    "EventError",
    "Function",
    "LogRecord",
    "MeshflowError",
    "NatsAuth",
    "NatsError",
    "NestedStepError",
    "NonDeterminismError",
    "NonRetriableError",
    "Priority",
    "RateLimit",
    "Retry",
    "RetryAfterError",
    "Run",
    "RunNotFoundError",
    "RunStatus",
    "RunTimeoutError",
    "SerializationError",
    "Singleton",
    "StateError",
    "Step",
    "StepError",
    "StepInfo",
    "Throttle",
    "Timeouts",
    "TriggerCron",
    "TriggerEvent",
    "WaitFor",
    "Worker",
    "connect",
]


def test_the_public_api_is_exactly_the_pinned_list() -> None:
    assert meshflow.__all__ == PUBLIC_API


def test_the_public_api_is_sorted() -> None:
    assert meshflow.__all__ == sorted(meshflow.__all__)


def test_every_public_name_is_importable() -> None:
    missing = [name for name in meshflow.__all__ if not hasattr(meshflow, name)]

    assert missing == []
