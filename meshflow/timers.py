"""Local timers: near deadlines fire from inside the worker, backed by the durable schedule.

The server's scheduler re-arms no sooner than every 250 ms, too coarse for short sleeps and
retry backoffs. So a deadline due within ``HORIZON_MS`` also gets a timer in the worker that
suspended the run. Rules:

1. The durable schedule always stays armed. Whichever fires first resumes the run; the other
   finds the item no longer pending and is acked. A worker crash falls back to the schedule.
2. A local timer never fires early: it is armed 1 ms past the deadline (the loop's clock may
   round down), and the engine checks the deadline again before it lets the run go on.
3. Bounded: at most ``MAX_TIMERS`` handles, and *warm state* (the record, its revision and the
   memos the worker wrote when it suspended the run, so the wake resumes it without a message,
   a re-read and a memo load) only for runs of at most ``WARM_STATE_BYTES`` and
   ``WARM_TOTAL_BYTES`` in all. Past the bounds, runs rely on the schedule and the stream.
4. Warm state is a hint: the resume takes the lease by compare-and-set on the stored revision,
   so any change since (another worker, a cancel) makes it fall back to the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from .durations import now_ms
from .runs import RunRecord, StepMemo, encode_record

HORIZON_MS = 60_000
MAX_TIMERS = 10_000
WARM_STATE_BYTES = 16 * 1024
WARM_TOTAL_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WarmRun:
    """What a worker wrote when it suspended a run: enough to resume it without reading."""

    record: RunRecord
    revision: int
    memos: dict[str, StepMemo]
    size: int


class LocalTimers:
    """A worker's timers for near deadlines, and the warm state of the runs they will wake."""

    def __init__(self) -> None:
        self._handles: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._warm: dict[str, WarmRun] = {}
        self._warm_bytes = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._handles)

    def arm(self, run_id: str, key: str, until: int, fire: Callable[[], None]) -> bool:
        """Call ``fire`` just after ``until`` (epoch ms), if it is near and room is left."""
        delay_ms = until - now_ms()
        if self._closed or delay_ms > HORIZON_MS or len(self._handles) >= MAX_TIMERS:
            return False
        old = self._handles.pop((run_id, key), None)
        if old is not None:
            old.cancel()

        def fired() -> None:
            self._handles.pop((run_id, key), None)
            if not self._closed:
                fire()

        self._handles[(run_id, key)] = asyncio.get_running_loop().call_later(
            max(0, delay_ms + 1) / 1000, fired
        )
        return True

    def keep_warm(self, record: RunRecord, revision: int, memos: dict[str, StepMemo]) -> None:
        """Remember the state just written for a run with a local timer, within the bounds."""
        size = len(encode_record(record)) + sum(len(m.output) + len(m.input) + 200 for m in memos.values())
        self.take_warm(record.id)
        if size <= WARM_STATE_BYTES and self._warm_bytes + size <= WARM_TOTAL_BYTES:
            self._warm[record.id] = WarmRun(record, revision, memos, size)
            self._warm_bytes += size

    def take_warm(self, run_id: str) -> WarmRun | None:
        """The run's warm state, removed (it is good for one wake at most)."""
        warm = self._warm.pop(run_id, None)
        if warm is not None:
            self._warm_bytes -= warm.size
        return warm

    def close(self) -> None:
        """Cancel every local timer (their durable schedules remain) and drop warm state."""
        self._closed = True
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
        self._warm.clear()
        self._warm_bytes = 0
