"""``concurrency``: at most ``limit`` runs of a key execute steps at once, across all workers.

A slot is held while a worker advances a run — executes its steps — and is released when the
pass ends (the run suspends, sleeps, waits, or finishes), so a sleeping or waiting run holds none.
The state of a key is its holders, each with a lease expiry; a holder whose worker died stops
counting when its lease runs out, so a killed worker's slot frees within the lease.

Pure: the decision over the holders, with times passed in.
"""

from __future__ import annotations


def acquire(
    holders: dict[str, int], run_id: str, now: int, *, limit: int, lease_ms: int
) -> dict[str, int] | None:
    """The holders with ``run_id`` added (or renewed), or None if all ``limit`` slots are taken."""
    live = {r: until for r, until in holders.items() if until > now}
    if run_id not in live and len(live) >= limit:
        return None
    live[run_id] = now + lease_ms
    return live


def release(holders: dict[str, int], run_id: str, now: int) -> dict[str, int]:
    return {r: until for r, until in holders.items() if until > now and r != run_id}
