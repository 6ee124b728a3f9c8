"""``concurrency``: at most ``limit`` runs of a key execute steps at once, across all workers.

A slot is held while a worker advances a run — executes its steps — and is released when the
pass ends (the run suspends, sleeps, waits, or finishes), so a sleeping or waiting run holds none.
The state of a key is its holders, each with a lease expiry (a holder whose worker died stops
counting when its lease runs out), and the runs waiting for a slot, each with a score: when it
first waited, minus its priority in milliseconds. A free slot goes to the waiting run with the
lowest score, so waiting runs are served first come, first served, and a run with priority
``p`` seconds goes ahead of those that started waiting less than ``p`` seconds before it.

Pure: the decisions over the state, with times passed in.
"""

from __future__ import annotations

import msgspec

#: A key's state holds at most this many waiting runs (its record must stay small); more wait
#: unordered, retrying on their own.
MAX_WAITING = 5_000
#: A waiting run that stops asking (its worker died, or a stray message of a run that went on
#: queued it) leaves the queue after this. Waiting runs ask again at least every 3 s.
WAIT_LEASE_MS = 5_000


class State(msgspec.Struct, kw_only=True):
    holders: dict[str, int] = msgspec.field(default_factory=dict)  # owner -> lease expiry (ms)
    waiting: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)  # run -> (score, expiry)


def _live(state: State, now: int) -> State:
    return State(
        holders={o: until for o, until in state.holders.items() if until > now},
        waiting={r: w for r, w in state.waiting.items() if w[1] > now},
    )


def acquire(
    state: State,
    owner: str,
    run_id: str,
    now: int,
    *,
    limit: int,
    lease_ms: int,
    priority_ms: int = 0,
    queue: bool = True,
) -> tuple[bool, State]:
    """Take a slot for ``owner`` (a pass of ``run_id``), or queue the run (unless ``queue`` is
    off: an extra slot for a step beside another, which goes without rather than wait); and the
    state to store."""
    live = _live(state, now)
    score = live.waiting.get(run_id, (now - priority_ms, 0))[0]
    ahead = any(s < score for r, (s, _) in live.waiting.items() if r != run_id)
    if owner in live.holders or (len(live.holders) < limit and not ahead):
        live.holders[owner] = now + lease_ms
        live.waiting.pop(run_id, None)
        return True, live
    if queue and (run_id in live.waiting or len(live.waiting) < MAX_WAITING):
        live.waiting[run_id] = (score, now + WAIT_LEASE_MS)
    return False, live


def release(state: State, owner: str, now: int, *, limit: int) -> tuple[State, str | None]:
    """Free ``owner``'s slot; and the waiting run to wake for it (the lowest score), if any."""
    live = _live(state, now)
    live.holders.pop(owner, None)
    live.waiting.pop(owner.rpartition(".")[0], None)  # the run is served; a stray entry must not block
    if len(live.holders) >= limit or not live.waiting:
        return live, None
    return live, min(live.waiting.items(), key=lambda item: item[1][0])[0]
