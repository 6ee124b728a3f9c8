"""Flow-control settings are checked when a function is registered."""

from __future__ import annotations

import pytest

import meshflow


def register(**config: object) -> meshflow.Function:
    app = meshflow.App("flow")

    async def handler(ctx: meshflow.Context) -> None:
        return None

    return app.function("fn", trigger="a/b", **config)(handler)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rate_limit": meshflow.RateLimit(limit=0, period="1h")}, "rate_limit limit must be a whole number"),
        ({"rate_limit": meshflow.RateLimit(limit=5000, period="1h")}, "from 1 to 1000"),
        ({"throttle": meshflow.Throttle(limit=5, period="soon")}, "throttle period"),
        ({"throttle": meshflow.Throttle(limit=5, period="1m", burst=0)}, "throttle burst"),
        ({"throttle": meshflow.Throttle(limit=5, period="1m", key="event.")}, "throttle key"),
        ({"singleton": meshflow.Singleton(mode="queue")}, "mode must be 'skip' or 'cancel'"),
        (
            {"batch": meshflow.Batch(max_size=10, timeout="5s"), "idempotency": "event.data.id"},
            "batch cannot be combined with idempotency",
        ),
        (
            {"singleton": meshflow.Singleton(), "concurrency": meshflow.Concurrency(limit=2)},
            "singleton already allows one run",
        ),
        ({"concurrency": meshflow.Concurrency(limit=2, scope="env")}, "scope='env' needs a key"),
        ({"debounce": meshflow.Debounce(period="5m", timeout="1m")}, "timeout must be at least the period"),
    ],
)
def test_bad_flow_control_is_refused_at_registration_naming_the_function(
    config: dict[str, object], message: str
) -> None:
    with pytest.raises(meshflow.ConfigError) as info:
        register(**config)
    assert "function 'fn'" in str(info.value)
    assert message in str(info.value)


def test_valid_flow_control_is_kept_in_checked_form() -> None:
    fn = register(
        rate_limit=meshflow.RateLimit(limit=2, period="1h", key="event.data.account"),
        throttle=meshflow.Throttle(limit=10, period="1m", burst=2),
        singleton=meshflow.Singleton(key="event.data.team", mode="cancel"),
    )
    assert fn.flow.rate_limit is not None
    assert fn.flow.rate_limit.period_ms == 3_600_000
    assert fn.flow.throttle is not None
    assert fn.flow.throttle.burst == 2
    assert fn.flow.singleton is not None
    assert fn.flow.singleton[1] == "cancel"
    assert fn.flow.gated


def test_flow_control_is_described_for_the_dashboard() -> None:
    fn = register(
        rate_limit=meshflow.RateLimit(limit=2, period="1h", key="event.data.account"),
        singleton=meshflow.Singleton(mode="skip"),
    )
    assert fn.flow.describe() == ["rate limit 2 per 3600000 ms per event.data.account", "singleton (skip)"]
