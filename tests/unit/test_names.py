"""NATS names (`meshflow.names`): event subjects, trigger filters, and consumer filter overlap."""

from __future__ import annotations

import pytest

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
