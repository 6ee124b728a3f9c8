"""NATS names (`meshflow.names`): event subjects, trigger filters, consumer filter overlap, message
ids and JetStream API subjects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshflow import names
from meshflow.bus import _minimal_subjects
from meshflow.names import Names


@pytest.mark.parametrize(
    ("event_name", "subject"),
    [
        ("user/signup", "mf.ev.user.signup"),
        ("app/user.created", "mf.ev.app.user.created"),
        ("a/b/c", "mf.ev.a.b.c"),
    ],
)
def test_event_subject_turns_slashes_into_subject_tokens(event_name: str, subject: str) -> None:
    assert Names().event_subject(event_name) == subject


def test_names_follow_the_namespace() -> None:
    names = Names("prod")

    assert names.event_subject("user/signup") == "prod.ev.user.signup"
    assert names.events_stream == "PROD_EVENTS"
    assert names.runs_stream == "PROD_RUNS"
    assert names.steps_bucket == "prod_steps"


@pytest.mark.parametrize(
    ("trigger", "subject"),
    [
        ("user/signup", "mf.ev.user.signup"),
        ("app/*", "mf.ev.app.>"),
        ("app/user.*", "mf.ev.app.user.>"),
    ],
)
def test_trigger_subject_is_the_event_subject_or_a_wildcard_for_prefixes(trigger: str, subject: str) -> None:
    assert Names().trigger_subject(trigger) == subject


def test_trigger_subject_of_a_wildcard_covers_the_subjects_of_the_events_it_matches() -> None:
    names = Names()
    prefix = names.trigger_subject("app/*").removesuffix(">")

    assert names.event_subject("app/user.created").startswith(prefix)
    assert not names.event_subject("apple/x").startswith(prefix)


def test_minimal_subjects_drops_duplicates_and_subjects_covered_by_a_wildcard() -> None:
    subjects = ["mf.ev.app.>", "mf.ev.app.user.created", "mf.ev.app.user.>", "mf.ev.b.c", "mf.ev.b.c"]

    assert _minimal_subjects(subjects) == ["mf.ev.app.>", "mf.ev.b.c"]


def test_minimal_subjects_keeps_subjects_that_only_share_a_prefix_of_characters() -> None:
    subjects = ["mf.ev.app.>", "mf.ev.apple.x", "mf.ev.ap"]

    assert _minimal_subjects(subjects) == sorted(subjects)


def test_minimal_subjects_keeps_a_single_subject() -> None:
    assert _minimal_subjects(["mf.ev.user.signup"]) == ["mf.ev.user.signup"]


# Every message id meshflow dedupes on, as stored: changing one makes messages in flight during an
# upgrade act twice, so each format is pinned here.
MESSAGE_IDS = [
    (names.finished_event_id("R"), "R:finished"),
    (names.failed_event_id("R"), "R:failed"),
    (names.cancelled_event_id("R"), "R:cancelled"),
    (names.sent_event_id("R", "h", 2), "R:h:2"),
    (names.cron_event_id("app-fn", "c0ffee", 1700), "cron:app-fn:c0ffee:1700"),
    (names.invoked_event_id("P", "h"), "P:h"),
    (names.start_message_id("R"), "R:start"),
    (names.cancel_message_id("R"), "R:cancel"),
    (names.cancel_message_id("R", 7), "R:cancel:7"),
    (names.timer_wake_id("R", "h", 1700), "R:h:1700"),
    (names.event_wake_id("R", "h"), "R:h:event"),
    (names.invoke_wake_id("P", "h"), "P:h:invoke"),
    (names.batch_full_id("R"), "R:full"),
    (names.slot_wake_id("R", "n1"), "R:slot:n1"),
    (names.sweep_wake_id("R", "h", 1700), "R:sweep:h:1700"),
]


@pytest.mark.parametrize(("built", "expected"), MESSAGE_IDS, ids=[e for _, e in MESSAGE_IDS])
def test_every_message_id_keeps_its_stored_format(built: str, expected: str) -> None:
    assert built == expected


def test_every_jetstream_api_subject_is_built_here() -> None:
    assert names.direct_get_subject("S") == "$JS.API.DIRECT.GET.S"
    assert names.stream_info_subject("S") == "$JS.API.STREAM.INFO.S"
    assert names.stream_purge_subject("S") == "$JS.API.STREAM.PURGE.S"
    assert names.consumer_info_subject("S", "c") == "$JS.API.CONSUMER.INFO.S.c"


def test_no_other_module_spells_a_jetstream_api_subject_or_a_message_id() -> None:
    root = Path(names.__file__).parent
    spelled = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        if path.name != "names.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "$JS.API" in line or re.search(r"msg_id=f\"|id=f\"\{", line)
    ]
    assert spelled == []
