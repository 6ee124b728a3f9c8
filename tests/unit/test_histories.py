"""Recorded run histories keep replaying to the same outcome.

Each file in ``histories/`` holds a run as it is stored (events, step memos, pending items, in
their JSON form) and what replaying it produced when it was recorded. A failure here means a run
in flight during an upgrade would behave differently: a changed stored format, step hashing or
engine rule. Re-record (``python -m tests.unit.record_histories NAME``) only when that is intended.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshflow.replay import Completed
from meshflow.runs import StepKind
from meshflow.testing import MemoryEffects

from .record_histories import CASES, replay_history, replay_pass

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
WITH_A_SEND_MEMO = [
    p for p in HISTORIES if any(m["kind"] == StepKind.SEND for m in json.loads(p.read_text())["memos"])
]


def test_every_case_has_a_recorded_history() -> None:
    assert {p.stem for p in HISTORIES} == set(CASES)


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_a_recorded_history_replays_to_the_same_outcome(path: Path) -> None:
    history = json.loads(path.read_text())  # noqa: ASYNC240 - a small fixture file, read once
    assert await replay_history(history) == history["expect"]


@pytest.mark.parametrize("path", WITH_A_SEND_MEMO, ids=[p.stem for p in WITH_A_SEND_MEMO])
async def test_a_recorded_send_event_is_not_sent_again_when_its_run_replays(path: Path) -> None:
    history = json.loads(path.read_text())  # noqa: ASYNC240 - a small fixture file, read once
    effects = MemoryEffects()

    outcome = await replay_pass(history, effects)

    assert isinstance(outcome, Completed)
    assert effects.sent == []
    assert StepKind.SEND not in {m.kind for m in effects.commits}
