"""Functions (`meshflow.functions`): registration checks, trigger matching, on_failure, run ids."""

from __future__ import annotations

from typing import Any

import pytest

import meshflow
from meshflow.errors import ConfigError
from meshflow.events import Event
from meshflow.functions import App, trigger_matches
from meshflow.ids import is_ulid, ulid_time_ms
from meshflow.names import EVENT_FUNCTION_FAILED
from meshflow.retries import Retry
from meshflow.steps import Context


async def handler(ctx: Context) -> None:
    return None


async def on_failure(ctx: Context) -> None:
    return None


def test_a_registered_function_has_its_config_and_full_id() -> None:
    app = App("shop")

    @app.function("send-email", trigger=["user/signup", "user/invited"], retries=2, name="Send email")
    async def send_email(ctx: Context) -> None:
        return None

    assert send_email.full_id == "shop-send-email"
    assert send_email.triggers == ("user/signup", "user/invited")
    assert send_email.retry == Retry(retries=2)
    assert send_email.name == "Send email"
    assert send_email.handler.__name__ == "send_email"
    assert app.functions == [send_email]


def test_functions_get_four_retries_by_default() -> None:
    fn = App("shop").function("f", trigger="a/b")(handler)

    assert fn.retry.retries == 4


@pytest.mark.parametrize("bad_id", ["", "a.b", "a b", "a*", "a>", "-f", "_f", "f/g", "x" * 65, 7])
def test_a_bad_function_id_is_refused(bad_id: Any) -> None:
    with pytest.raises(ConfigError, match="invalid function id"):
        App("shop").function(bad_id, trigger="a/b")


@pytest.mark.parametrize("bad_id", ["", "a.b", "my app"])
def test_a_bad_app_id_is_refused(bad_id: str) -> None:
    with pytest.raises(ConfigError, match="invalid app id"):
        App(bad_id)


@pytest.mark.parametrize("trigger", ["app*", "*", "/*", "app/**", "app/*/x", "a b", "a//b", "", 42])
def test_a_bad_trigger_is_refused_naming_the_function(trigger: Any) -> None:
    with pytest.raises(ConfigError, match="function 'send-email'"):
        App("shop").function("send-email", trigger=trigger)


def test_a_function_needs_at_least_one_trigger() -> None:
    with pytest.raises(ConfigError, match="function 'send-email': needs at least one trigger"):
        App("shop").function("send-email", trigger=[])


def test_a_non_async_handler_is_refused_naming_the_function() -> None:
    def sync_handler(ctx: Context) -> None:
        return None

    with pytest.raises(ConfigError, match="function 'send-email': must be an `async def`"):
        App("shop").function("send-email", trigger="a/b")(sync_handler)  # type: ignore[arg-type]


def test_a_non_async_on_failure_handler_is_refused_naming_the_function() -> None:
    def sync_handler(ctx: Context) -> None:
        return None

    with pytest.raises(ConfigError, match="on_failure of function 'send-email'"):
        App("shop").function("send-email", trigger="a/b", on_failure=sync_handler)(handler)  # type: ignore[arg-type]


def test_registering_a_function_id_twice_is_refused() -> None:
    app = App("shop")
    app.function("send-email", trigger="a/b")(handler)

    with pytest.raises(ConfigError, match="function id 'send-email' is registered twice"):
        app.function("send-email", trigger="c/d")(handler)


def test_two_apps_may_use_the_same_function_id() -> None:
    first = App("shop").function("f", trigger="a/b")(handler)
    second = App("billing").function("f", trigger="a/b")(handler)

    assert first.full_id != second.full_id


@pytest.mark.parametrize("retries", [-1, 21, True, 2.5, "3", Retry(retries=21), Retry(backoff=())])
def test_retries_out_of_range_are_refused_naming_the_function(retries: Any) -> None:
    with pytest.raises(ConfigError, match="function 'send-email'"):
        App("shop").function("send-email", trigger="a/b", retries=retries)


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("user/signup", "user/signup", True),
        ("user/signup", "user/signup.v2", False),
        ("user/signup", "user/sign", False),
        ("app/*", "app/user.created", True),
        ("app/*", "app/x", True),
        ("app/*", "app/", False),
        ("app/*", "apple/x", False),
        ("app/*", "other/app/x", False),
        ("app/user.*", "app/user.created", True),
        ("app/user.*", "app/users.created", False),
    ],
)
def test_trigger_matches_exact_names_and_prefix_wildcards(pattern: str, name: str, matches: bool) -> None:
    assert trigger_matches(pattern, name) is matches


def test_a_function_matches_events_of_any_of_its_triggers() -> None:
    fn = App("shop").function("f", trigger=["user/signup", "billing/*"])(handler)

    assert fn.matches(Event(name="user/signup"))
    assert fn.matches(Event(name="billing/invoice.paid"))
    assert not fn.matches(Event(name="user/login"))


def test_on_failure_registers_a_failure_function_for_failed_runs_of_its_function() -> None:
    app = App("shop")
    fn = app.function("send-email", trigger="user/signup", on_failure=on_failure)(handler)

    failure = fn.on_failure
    assert failure is not None
    assert failure.id == "send-email-failure"
    assert failure.full_id == "shop-send-email-failure"
    assert failure.failure_of == "shop-send-email"
    assert failure.triggers == (EVENT_FUNCTION_FAILED,)
    assert failure.handler is on_failure
    assert app.functions == [fn, failure]


def test_a_failure_function_matches_only_failed_events_of_its_own_function() -> None:
    app = App("shop")
    failure = app.function("send-email", trigger="user/signup", on_failure=on_failure)(handler).on_failure
    other = app.function("bill", trigger="user/signup", on_failure=on_failure)(handler).on_failure
    assert failure is not None
    assert other is not None
    failed = Event(name=EVENT_FUNCTION_FAILED, data={"function_id": "shop-send-email", "run_id": "r"})

    assert failure.matches(failed)
    assert not other.matches(failed)
    assert not failure.matches(Event(name=EVENT_FUNCTION_FAILED, data={"function_id": "shop-bill"}))
    assert not failure.matches(Event(name=EVENT_FUNCTION_FAILED))
    assert not failure.matches(Event(name="user/signup", data={"function_id": "shop-send-email"}))


def test_an_on_failure_id_that_clashes_with_a_function_is_refused() -> None:
    app = App("shop")
    app.function("send-email-failure", trigger="a/b")(handler)

    with pytest.raises(ConfigError, match="'send-email-failure' is registered twice"):
        app.function("send-email", trigger="a/b", on_failure=on_failure)(handler)


def test_run_id_for_is_deterministic_and_the_same_for_an_event_or_its_id() -> None:
    fn = App("shop").function("f", trigger="user/signup")(handler)
    event = Event(name="user/signup")

    run_id = fn.run_id_for(event)

    assert run_id == fn.run_id_for(event)
    assert run_id == fn.run_id_for(event.id)
    assert is_ulid(run_id)
    assert ulid_time_ms(run_id) == ulid_time_ms(event.id)  # runs sort by their event's time


def test_run_id_for_differs_per_function_and_per_event() -> None:
    app = App("shop")
    f = app.function("f", trigger="user/signup")(handler)
    g = app.function("g", trigger="user/signup")(handler)
    first, second = Event(name="user/signup"), Event(name="user/signup")

    assert len({f.run_id_for(first), f.run_id_for(second), g.run_id_for(first)}) == 3


def test_run_id_for_accepts_event_ids_that_are_not_ulids() -> None:
    fn = App("shop").function("f", trigger="user/signup")(handler)

    run_id = fn.run_id_for("order-42")

    assert run_id == fn.run_id_for(Event(name="user/signup", id="order-42"))
    assert ulid_time_ms(run_id) == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"trigger": meshflow.TriggerEvent("order/created", if_="event.data.")}, "trigger if_ expression"),
        ({"trigger": meshflow.TriggerEvent("order/created", if_="async.x > 1")}, "unknown variable"),
        ({"trigger": meshflow.TriggerCron("61 * * * *")}, "minute 61 is out of range 0-59"),
        ({"trigger": meshflow.TriggerCron("@reboot")}, "@reboot"),
        ({"trigger": meshflow.TriggerCron("0 0 9 * * MON 2026")}, "it has 7 fields"),
        ({"trigger": meshflow.TriggerCron("TZ=Mars/Olympus 0 9 * * *")}, "unknown time zone"),
        (
            {"trigger": "a/b", "cancel_on": [meshflow.Cancel(event="x/y", if_="event.data.")]},
            "cancel_on[0] if_",
        ),
        ({"trigger": "a/b", "cancel_on": [meshflow.Cancel(event="x/y", match="id")]}, "cancel_on[0]"),
        ({"trigger": "a/b", "cancel_on": [meshflow.Cancel(event="x/y", timeout="soon")]}, "soon"),
        ({"trigger": "a/b", "timeouts": meshflow.Timeouts(finish="forever")}, "timeouts.finish"),
        ({"trigger": "a/b", "idempotency": "event.data."}, "idempotency"),
    ],
    ids=[
        "cel-syntax",
        "cel-variable",
        "cron-range",
        "cron-reboot",
        "cron-7-fields",
        "cron-tz",
        "cancel-if",
        "cancel-match",
        "cancel-timeout",
        "timeout",
        "idempotency",
    ],
)
def test_bad_trigger_and_control_config_is_refused_at_registration_naming_the_function(
    config: dict[str, object], message: str
) -> None:
    app = meshflow.App("shop")
    with pytest.raises(meshflow.ConfigError) as info:
        app.function("digest", **config)  # type: ignore[arg-type]
    assert "function 'digest'" in str(info.value)
    assert message in str(info.value)


def test_a_function_may_mix_event_and_cron_triggers() -> None:
    app = meshflow.App("shop")

    @app.function(
        "digest",
        trigger=[
            "digest/requested",
            meshflow.TriggerCron("TZ=Europe/Paris 0 9 * * MON"),
            meshflow.TriggerEvent("order/created", if_="event.data.total > 100"),
        ],
    )
    async def digest(ctx: meshflow.Context) -> None:
        return None

    assert digest.triggers == ("digest/requested", "order/created")
    assert [c.tz for c in digest.crons] == ["Europe/Paris"]
    assert digest.matches(meshflow.Event(name="order/created", data={"total": 101}))
    assert not digest.matches(meshflow.Event(name="order/created", data={"total": 99}))
    assert digest.matches(meshflow.Event(name="digest/requested"))
