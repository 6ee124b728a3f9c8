"""Local timers: fire after their deadline (never before), bounded, closed without firing."""

from __future__ import annotations

import asyncio
import time

import msgspec

from meshflow import timers
from meshflow.runs import RunRecord, RunStatus, StepKind, StepMemo, StepStatus


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def record(run_id: str = "r1") -> RunRecord:
    t = now_ms()
    return RunRecord(
        id=run_id,
        app="a",
        function="a-f",
        fn="f",
        status=RunStatus.SLEEPING,
        events=[],
        created_at=t,
        updated_at=t,
    )


def memo(size: int) -> StepMemo:
    t = now_ms()
    return StepMemo(
        id="s",
        hash="h",
        kind=StepKind.RUN,
        status=StepStatus.COMPLETED,
        output=msgspec.Raw(b'"' + b"x" * size + b'"'),
        started_at=t,
        ended_at=t,
    )


async def test_a_local_timer_never_fires_before_its_deadline() -> None:
    local = timers.LocalTimers()
    fired: list[int] = []
    done = asyncio.Event()
    deadlines = [now_ms() + d for d in (5, 20, 40)]

    for i, until in enumerate(deadlines):

        def fire(until: int = until) -> None:
            fired.append(now_ms() - until)
            if len(fired) == len(deadlines):
                done.set()

        assert local.arm("run", f"k{i}", until, fire)
    await asyncio.wait_for(done.wait(), 5)
    assert all(late >= 0 for late in fired), fired


async def test_deadlines_beyond_the_horizon_or_the_cap_are_left_to_the_schedule() -> None:
    local = timers.LocalTimers()
    assert not local.arm("run", "far", now_ms() + timers.HORIZON_MS + 1000, lambda: None)
    local.close()
    assert not local.arm("run", "after-close", now_ms() + 10, lambda: None)


async def test_rearming_the_same_key_replaces_the_timer_and_close_cancels_all() -> None:
    local = timers.LocalTimers()
    fired: list[str] = []
    local.arm("run", "k", now_ms() + 10_000, lambda: fired.append("first"))
    local.arm("run", "k", now_ms() + 10_000, lambda: fired.append("second"))
    assert len(local) == 1
    local.close()
    assert len(local) == 0
    assert fired == []


def test_warm_state_is_taken_once_and_bounded_in_size() -> None:
    local = timers.LocalTimers()
    local.keep_warm(record("small"), 7, {"h": memo(100)})
    warm = local.take_warm("small")
    assert warm is not None
    assert warm.revision == 7
    assert local.take_warm("small") is None  # good for one wake only
    local.keep_warm(record("big"), 1, {"h": memo(timers.WARM_STATE_BYTES)})
    assert local.take_warm("big") is None  # too large to keep
