"""``rate_limit``: at most ``limit`` runs start in any window of ``period``; the rest are skipped.

Exact, not smoothed (GCRA would let up to ``2 * limit - 1`` through in an unlucky window): the
state is the start times of the last ``limit`` runs. A run is allowed when fewer than ``limit`` of
them lie within ``period`` before ``now``; a skipped run leaves the state unchanged.

Pure: times are epoch milliseconds passed in.
"""

from __future__ import annotations

#: The state grows with the limit; larger limits are better served by ``throttle``.
MAX_LIMIT = 1000


def decide(starts: list[int], now: int, *, period_ms: int, limit: int) -> tuple[bool, list[int]]:
    """Whether a run may start now, and the start log to store."""
    recent = [t for t in starts if t > now - period_ms][-limit:]
    if len(recent) >= limit:
        return False, recent
    return True, [*recent, now]
