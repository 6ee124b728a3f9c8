"""``throttle``: limits how fast runs *start*, by GCRA (the generic cell rate algorithm).

A limit of ``limit`` per ``period`` is an emission interval ``I = period / limit`` and a tolerance
``tau = I * (burst - 1)``; the state is one number, the theoretical arrival time ``tat``. A run
decided at ``now`` starts at ``max(now, tat - tau)`` and moves ``tat`` to ``max(tat, start) + I``:
it reserves its slot at once, so runs start in the order they were decided, none is dropped,
``burst`` of them may start together and then one every ``I``.

Pure: times are epoch milliseconds passed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """When the run starts (epoch ms) and the state to store."""

    start_at: int
    tat: int


def interval(period_ms: int, limit: int) -> int:
    return max(1, -(-period_ms // limit))  # rounded up: never more than `limit` per period


def decide(tat: int, now: int, *, period_ms: int, limit: int, burst: int = 1) -> Decision:
    step = interval(period_ms, limit)
    start = max(now, tat - step * (burst - 1))
    return Decision(start_at=start, tat=max(tat, start) + step)
