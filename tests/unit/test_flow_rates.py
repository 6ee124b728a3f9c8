"""Start-rate decisions: throttle (GCRA: delay, never drop) and rate limit (exact: skip)."""

from __future__ import annotations

from meshflow.flow import concurrency, ratelimit, throttle

MINUTE = 60_000


def test_rate_limit_never_lets_more_than_limit_start_in_any_period() -> None:
    log: list[int] = []
    allowed = []
    for now in range(0, 10 * MINUTE, 5_000):  # a request every 5 s for 10 minutes
        ok, log = ratelimit.decide(log, now, period_ms=MINUTE, limit=3)
        if ok:
            allowed.append(now)
    assert all(sum(1 for t in allowed if s <= t < s + MINUTE) <= 3 for s in range(-MINUTE, 10 * MINUTE, 1000))
    assert len(allowed) == 30  # and exactly 3 a minute: nothing skipped that could run
    assert allowed[:4] == [0, 5_000, 10_000, 60_000]


def test_a_skipped_request_leaves_the_log_unchanged() -> None:
    ok1, log1 = ratelimit.decide([], 0, period_ms=MINUTE, limit=1)
    ok2, log2 = ratelimit.decide(log1, 1000, period_ms=MINUTE, limit=1)
    assert ok1
    assert not ok2
    assert log2 == log1 == [0]
    assert ratelimit.decide(log1, MINUTE, period_ms=MINUTE, limit=1)[0]


def test_throttle_spaces_starts_evenly_in_order_and_drops_nothing() -> None:
    tat, starts = 0, []
    for _ in range(10):  # ten requests at the same instant
        d = throttle.decide(tat, 1_000, period_ms=MINUTE, limit=5)
        tat = d.tat
        starts.append(d.start_at)
    assert starts == [1_000 + i * 12_000 for i in range(10)]


def test_throttle_burst_lets_that_many_start_together() -> None:
    tat, starts = 0, []
    for _ in range(6):
        d = throttle.decide(tat, 0, period_ms=MINUTE, limit=5, burst=3)
        tat = d.tat
        starts.append(d.start_at)
    assert starts == [0, 0, 0, 12_000, 24_000, 36_000]


def test_throttle_after_a_quiet_spell_starts_at_once() -> None:
    d = throttle.decide(5_000, 100_000, period_ms=MINUTE, limit=5)
    assert d.start_at == 100_000
    assert d.tat == 112_000


def test_concurrency_counts_live_holders_and_frees_expired_leases() -> None:
    state = concurrency.State()
    ok, state = concurrency.acquire(state, "r1.a", "r1", 0, limit=2, lease_ms=1000)
    assert ok
    ok, state = concurrency.acquire(state, "r2.a", "r2", 10, limit=2, lease_ms=1000)
    assert ok
    ok, state = concurrency.acquire(state, "r3.a", "r3", 20, limit=2, lease_ms=1000)
    assert not ok  # full: r3 waits
    assert set(state.waiting) == {"r3"}
    ok, state = concurrency.acquire(state, "r3.b", "r3", 1005, limit=2, lease_ms=1000)
    assert ok  # r1's lease ran out (its worker died): the slot is free again
    assert set(state.holders) == {"r2.a", "r3.b"}
    assert state.waiting == {}


def test_a_free_slot_goes_to_the_first_waiting_run_unless_priority_says_otherwise() -> None:
    state = concurrency.State()
    _, state = concurrency.acquire(state, "h.x", "h", 0, limit=1, lease_ms=60_000)
    for i, run in enumerate(["a", "b", "c"]):  # a, b, c queue up one second apart
        ok, state = concurrency.acquire(state, f"{run}.x", run, 1000 * (i + 1), limit=1, lease_ms=60_000)
        assert not ok
    ok, state = concurrency.acquire(state, "v.x", "v", 3500, limit=1, lease_ms=60_000, priority_ms=2000)
    assert not ok  # "v" waited 2 s less than "b" and "c", but has 2 s of priority
    state, wake = concurrency.release(state, "h.x", 4000, limit=1)
    assert wake == "a"  # first come, first served
    ok, _ = concurrency.acquire(state, "c.y", "c", 4001, limit=1, lease_ms=60_000)
    assert not ok  # "c" may not jump the queue
    ok, state = concurrency.acquire(state, "a.y", "a", 4002, limit=1, lease_ms=60_000)
    assert ok
    state, wake = concurrency.release(state, "a.y", 5000, limit=1)
    assert wake == "v"  # its score (3500 - 2000) is lower than b's (2000) and c's (3000)


def test_an_extra_step_slot_is_taken_only_when_free_and_nobody_waits_and_never_queues() -> None:
    state = concurrency.State()
    _, state = concurrency.acquire(state, "r1.p", "r1", 0, limit=2, lease_ms=60_000)
    ok, state = concurrency.acquire(state, "r1.p.x1", "r1", 1, limit=2, lease_ms=60_000, queue=False)
    assert ok  # a free slot: the run's second parallel step takes it
    ok, state = concurrency.acquire(state, "r1.p.x2", "r1", 2, limit=2, lease_ms=60_000, queue=False)
    assert not ok
    assert state.waiting == {}  # going without is not waiting: nothing queued
    state, _ = concurrency.release(state, "r1.p.x1", 3, limit=2)
    ok, state = concurrency.acquire(state, "r2.p", "r2", 4, limit=1, lease_ms=60_000)
    assert not ok
    assert "r2" in state.waiting  # a run waits for the slot...
    ok, state = concurrency.acquire(state, "r1.p.x3", "r1", 5, limit=2, lease_ms=60_000, queue=False)
    assert not ok  # ...so no extra step slot goes ahead of it
