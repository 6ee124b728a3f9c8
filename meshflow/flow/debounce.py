"""``debounce``: one run ``period`` after the last event of a key, at most ``timeout`` after the first.

Pure: when the window's run starts, given when the window opened and when its last event came.
"""

from __future__ import annotations


def start_at(first_ms: int, last_ms: int, *, period_ms: int, timeout_ms: int | None) -> int:
    """The run starts ``period`` after the last event, but no later than ``timeout`` after the first."""
    due = last_ms + period_ms
    return due if timeout_ms is None else min(due, first_ms + timeout_ms)
