"""The fault-injection run at a small scale (``tests.faults.chaos``): kill -9 of workers, a worker
stopped past the ack wait and a kill -9 of the nats-server, under a steady stream of events with
resends. No acknowledged event is left without a finished run, no run finishes twice, no
committed step runs again, no sleep wakes early, and every re-execution is explained by harm."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from .chaos import Config, run


@pytest.mark.slow
async def test_under_kills_stalls_and_a_server_kill_nothing_is_lost_repeated_or_stuck(tmp_path: Path) -> None:
    report = await run(Config(events=120, load_s=7.0, kills=2, stalls=1, server_kills=1), tmp_path)
    print(json.dumps(dataclasses.asdict(report), indent=2))  # the figures, with -s
    assert report.acknowledged_events == 120
    assert report.broken == []
    assert report.runs_expected == 240
    assert len([h for h in report.nemesis if "resumed" not in h]) == 4  # all the harm was done
