"""Events (`meshflow.events`): valid names, default ids and timestamps, and refusing non-JSON data."""

from __future__ import annotations

import time
from typing import Any

import pytest

from meshflow.errors import EventError
from meshflow.events import MAX_NAME_LENGTH, Event, decode_event, encode_event, validate_event_name
from meshflow.ids import is_ulid, ulid_time_ms


@pytest.mark.parametrize(
    "name", ["user/signup", "app/user.created", "billing/invoice.paid-late", "a", "x" * MAX_NAME_LENGTH]
)
def test_validate_event_name_accepts_names_that_map_to_subject_tokens(name: str) -> None:
    assert validate_event_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", " ", "a b", "user/\tsignup", "a*", "app/*", "a>", "a//b", "a..b", "a/.b", ".a", "a.", "/a", "a/"],
)
def test_validate_event_name_rejects_empty_segments_whitespace_and_wildcards(name: str) -> None:
    with pytest.raises(EventError, match="invalid event name"):
        validate_event_name(name)


def test_validate_event_name_rejects_names_over_256_characters() -> None:
    with pytest.raises(EventError, match="longer than 256"):
        validate_event_name("x" * (MAX_NAME_LENGTH + 1))


@pytest.mark.parametrize("name", [None, 42, b"user/signup", ["user/signup"]])
def test_validate_event_name_rejects_non_strings(name: Any) -> None:
    with pytest.raises(EventError, match="non-empty string"):
        validate_event_name(name)


def test_an_event_gets_a_fresh_ulid_id_and_a_millisecond_timestamp_by_default() -> None:
    before = time.time_ns() // 1_000_000
    first, second = Event(name="user/signup"), Event(name="user/signup")
    after = time.time_ns() // 1_000_000

    assert is_ulid(first.id)
    assert first.id != second.id
    assert before <= first.ts <= after
    assert before <= ulid_time_ms(first.id) <= after
    assert first.data == {}
    assert first.v is None


def test_an_event_round_trips_through_its_wire_form() -> None:
    event = Event(name="app/user.created", data={"id": 7, "tags": ["a"]}, id="evt-1", ts=123, v="2")

    assert decode_event(encode_event(event)) == event


class Socket:
    """Not JSON data."""


def cyclic() -> dict[str, Any]:
    data: dict[str, Any] = {}
    data["self"] = data
    return data


@pytest.mark.parametrize(
    "data",
    [{"conn": Socket()}, {"at": object()}, {"key": {(1, 2): 3}}, cyclic()],
    ids=["socket", "object", "tuple-key", "cycle"],
)
def test_encode_event_refuses_non_json_data_naming_the_event(data: dict[str, Any]) -> None:
    event = Event(name="user/signup", data=data, id="evt-1")

    with pytest.raises(EventError, match=r"event 'user/signup' \(id evt-1\): data is not JSON-serializable"):
        encode_event(event)


def test_encode_event_refuses_an_invalid_name_before_encoding() -> None:
    with pytest.raises(EventError, match="invalid event name"):
        encode_event(Event(name="user signup"))


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (Event(name="a/b", id=""), "id must be"),
        (Event(name="a/b", id="x" * 257), "id must be"),
        (Event(name="a/b", data=[1, 2]), "data must be a JSON object"),  # type: ignore[arg-type]
        (Event(name="a/b", ts=-1), "ts must be epoch milliseconds"),
        (Event(name="a/b", ts=True), "ts must be epoch milliseconds"),
    ],
    ids=["empty-id", "long-id", "list-data", "negative-ts", "bool-ts"],
)
def test_encode_event_refuses_bad_ids_data_and_timestamps(event: Event, message: str) -> None:
    with pytest.raises(EventError, match=message):
        encode_event(event)
