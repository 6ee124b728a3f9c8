"""Recorded run histories keep replaying to the same outcome.

Each file in ``histories/`` holds a run as it is stored (events, step memos, pending items, in
their JSON form) and what replaying it produced when it was recorded. A failure here means a run
in flight during an upgrade would behave differently: a changed stored format, step hashing or
engine rule. Re-record (``python -m tests.unit.record_histories``) only when that is intended.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .record_histories import CASES, replay_history

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_every_case_has_a_recorded_history() -> None:
    assert {p.stem for p in HISTORIES} == set(CASES)


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_a_recorded_history_replays_to_the_same_outcome(path: Path) -> None:
    history = json.loads(path.read_text())  # noqa: ASYNC240 - a small fixture file, read once
    assert await replay_history(history) == history["expect"]
