"""Unit tests for meshflow.retries: the retry policy, its validation, and backoff delays."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from meshflow.errors import ConfigError, DurationError
from meshflow.retries import (
    DEFAULT_BACKOFF,
    DEFAULT_RETRIES,
    MAX_RETRIES,
    Retry,
    attempts_left,
    backoff_delay,
    retry_policy,
)

S = dt.timedelta(seconds=1)
MIN = dt.timedelta(minutes=1)
H = dt.timedelta(hours=1)


def test_default_backoff_is_the_documented_table() -> None:
    assert DEFAULT_BACKOFF == (
        15 * S,
        30 * S,
        MIN,
        2 * MIN,
        5 * MIN,
        10 * MIN,
        20 * MIN,
        40 * MIN,
        H,
        2 * H,
    )


def test_defaults_are_four_retries_ten_percent_jitter_and_at_most_twenty_retries() -> None:
    assert DEFAULT_RETRIES == 4
    assert MAX_RETRIES == 20
    assert Retry() == Retry(retries=4, backoff=DEFAULT_BACKOFF, jitter=0.1)


def test_retry_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Retry().retries = 3  # type: ignore[misc]


def test_retry_round_trips_through_msgspec_json() -> None:
    policy = retry_policy(Retry(retries=2, backoff=(S, 90 * S), jitter=0.5))
    assert msgspec.json.decode(msgspec.json.encode(policy), type=Retry) == policy


def test_retry_policy_gives_the_defaults_for_none() -> None:
    assert retry_policy(None) == Retry()


@pytest.mark.parametrize("retries", [0, 1, 4, 20])
def test_retry_policy_accepts_a_number_of_retries_from_0_to_20(retries: int) -> None:
    assert retry_policy(retries) == Retry(retries=retries)


@pytest.mark.parametrize("retries", [-1, 21, 100])
def test_retry_policy_rejects_retry_counts_out_of_range(retries: int) -> None:
    with pytest.raises(ConfigError) as info:
        retry_policy(retries, what="function 'send-email'")
    assert str(info.value) == (
        f"invalid retries {retries!r} for function 'send-email': use a whole number from 0 to 20"
    )


@pytest.mark.parametrize("retries", [True, False])
def test_retry_policy_rejects_bool_retry_counts(retries: bool) -> None:
    with pytest.raises(ConfigError, match=f"invalid retries {retries} for function"):
        retry_policy(retries)


@pytest.mark.parametrize("value", ["3", 2.0, [1, 2]])
def test_retry_policy_rejects_settings_of_the_wrong_type(value: object) -> None:
    with pytest.raises(ConfigError, match="invalid retry setting") as info:
        retry_policy(value, what="step 'charge'")  # type: ignore[arg-type]
    assert repr(value) in str(info.value)
    assert "step 'charge'" in str(info.value)


def test_retry_policy_converts_backoff_strings_and_numbers_to_timedeltas() -> None:
    raw = Retry(retries=3, backoff=("1s", 2, 2.5, "1m30s", dt.timedelta(hours=1)))  # type: ignore[arg-type]
    policy = retry_policy(raw)
    assert policy.backoff == (S, 2 * S, 2500 * dt.timedelta(milliseconds=1), 90 * S, H)
    assert all(type(d) is dt.timedelta for d in policy.backoff)
    assert policy.retries == 3


def test_retry_policy_accepts_a_backoff_list_and_returns_a_tuple() -> None:
    policy = retry_policy(Retry(backoff=["5s", "10s"]))  # type: ignore[arg-type]
    assert policy.backoff == (5 * S, 10 * S)


def test_retry_policy_returns_jitter_as_a_float() -> None:
    policy = retry_policy(Retry(jitter=1))
    assert policy.jitter == 1.0
    assert type(policy.jitter) is float


@pytest.mark.parametrize("backoff", [(), [], "1s", None, 5])
def test_retry_policy_rejects_a_backoff_that_is_not_a_non_empty_list(backoff: object) -> None:
    with pytest.raises(ConfigError, match="use a non-empty list of durations") as info:
        retry_policy(Retry(backoff=backoff), what="function 'f'")  # type: ignore[arg-type]
    assert f"invalid backoff {backoff!r} for function 'f'" in str(info.value)


@pytest.mark.parametrize("entry", ["0s", 0, dt.timedelta(0)])
def test_retry_policy_rejects_zero_backoff_entries(entry: object) -> None:
    with pytest.raises(ConfigError, match="each delay must be more than zero"):
        retry_policy(Retry(backoff=("1s", entry)))  # type: ignore[arg-type]


def test_retry_policy_reports_unparseable_backoff_entries_as_duration_errors() -> None:
    with pytest.raises(DurationError) as info:
        retry_policy(Retry(backoff=("1s", "3 fortnights")), what="function 'f'")  # type: ignore[arg-type]
    assert "'3 fortnights'" in str(info.value)
    assert "backoff of function 'f'" in str(info.value)


@pytest.mark.parametrize("jitter", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_retry_policy_rejects_jitter_outside_0_to_1(jitter: object) -> None:
    with pytest.raises(ConfigError, match="use a fraction from 0 to 1") as info:
        retry_policy(Retry(jitter=jitter))  # type: ignore[arg-type]
    assert f"invalid jitter {jitter!r} for function" in str(info.value)


def test_retry_policy_validates_the_retries_of_a_retry_struct() -> None:
    with pytest.raises(ConfigError, match="invalid retries 21"):
        retry_policy(Retry(retries=21))


def test_attempts_left_allows_retries_plus_one_attempts_in_total() -> None:
    policy = Retry(retries=4)
    assert [attempts_left(policy, failures) for failures in range(1, 7)] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]


def test_attempts_left_with_zero_retries_allows_only_the_first_attempt() -> None:
    policy = Retry(retries=0)
    assert attempts_left(policy, 0)
    assert not attempts_left(policy, 1)


def test_backoff_delay_follows_the_table_without_jitter() -> None:
    policy = Retry()
    delays = [backoff_delay(policy, failures, 0.0) for failures in range(1, len(DEFAULT_BACKOFF) + 1)]
    assert tuple(delays) == DEFAULT_BACKOFF


def test_backoff_delay_repeats_the_last_entry_past_the_end_of_the_table() -> None:
    policy = Retry()
    assert backoff_delay(policy, 11, 0.0) == 2 * H
    assert backoff_delay(policy, 50, 0.0) == 2 * H
    short = retry_policy(Retry(backoff=("1s", "5s")))  # type: ignore[arg-type]
    assert [backoff_delay(short, f, 0.0) for f in (1, 2, 3, 4)] == [S, 5 * S, 5 * S, 5 * S]


def test_backoff_delay_adds_jitter_as_a_fraction_of_the_delay() -> None:
    policy = Retry(backoff=(10 * S,), jitter=0.5)
    assert backoff_delay(policy, 1, 0.5) == 12.5 * S


@pytest.mark.parametrize("rnd", [0.0, 0.25, 0.5, 0.999999])
@pytest.mark.parametrize("failures", [1, 3, 10, 12])
def test_backoff_delay_stays_within_the_jitter_bounds(rnd: float, failures: int) -> None:
    policy = Retry()
    base = DEFAULT_BACKOFF[min(failures, len(DEFAULT_BACKOFF)) - 1]
    delay = backoff_delay(policy, failures, rnd)
    assert base <= delay <= base * (1 + policy.jitter)


def test_backoff_delay_is_never_less_than_the_table_value_for_tiny_delays() -> None:
    policy = Retry(backoff=(dt.timedelta(microseconds=1),), jitter=1.0)
    assert backoff_delay(policy, 1, 0.4) >= dt.timedelta(microseconds=1)


def test_backoff_delay_without_jitter_ignores_the_random_number() -> None:
    policy = Retry(jitter=0.0)
    assert backoff_delay(policy, 2, 0.9) == 30 * S


@pytest.mark.parametrize("failures", [0, -1])
def test_backoff_delay_rejects_fewer_than_one_failure(failures: int) -> None:
    with pytest.raises(ValueError, match="failures >= 1"):
        backoff_delay(Retry(), failures, 0.0)


@pytest.mark.parametrize("rnd", [-0.1, 1.0, float("nan")])
def test_backoff_delay_rejects_a_random_number_outside_0_to_1(rnd: float) -> None:
    with pytest.raises(ValueError, match=r"rnd in \[0, 1\)"):
        backoff_delay(Retry(), 1, rnd)
