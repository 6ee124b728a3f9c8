"""What a pass does and writes (`meshflow.settle`), as tables: every outcome x status x cancel
request, what each delivery means for its run, and what a pass arms, drops and forgets."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from meshflow import App, Cancel, RunStatus, Timeouts
from meshflow.events import Event
from meshflow.names import cancelled_event_id, failed_event_id, finished_event_id
from meshflow.replay import Cancelled, Completed, Failed, Outcome, Suspended
from meshflow.runs import (
    NEVER,
    NULL,
    TRANSITIONS,
    CancelInfo,
    ErrorInfo,
    IllegalTransition,
    Lease,
    ParentRef,
    Pending,
    PendingKind,
    RunRecord,
    StepKind,
    StepMemo,
    StepStatus,
    can_transition,
    new_run,
    transition,
)
from meshflow.settle import (
    TRIGGER,
    PassFacts,
    Triage,
    Wake,
    opened_before,
    settle,
    to_open,
    triage,
)

NOW = 1_800_000_000_000
LATER = NOW + 60_000
app = App("t")


@app.function("plain", trigger="t/e")
async def plain(ctx: object) -> None: ...


@app.function(
    "guarded",
    trigger="t/e",
    cancel_on=[Cancel(event="t/stop", match="data.id")],
    timeouts=Timeouts(finish="1h"),
)
async def guarded(ctx: object) -> None: ...


def item(kind: PendingKind, key: str = "k1", until: int = LATER) -> Pending:
    return Pending(kind=kind, key=key, step_id=key, until=until, since=NOW - 1000)


def record(status: RunStatus = RunStatus.RUNNING, **fields: object) -> RunRecord:
    base = new_run("run-1", app="t", fn="plain", events=[Event(name="t/e", data={"id": 1})], now=NOW - 5000)
    fields.setdefault(
        "lease", Lease(worker="w1", until=NOW + 30_000) if status is RunStatus.RUNNING else None
    )
    return msgspec.structs.replace(base, status=status, **fields)


def facts(
    *, wake: Wake = TRIGGER, redelivered: bool = False, memos: dict[str, StepMemo] | None = None
) -> PassFacts:
    return PassFacts(now=NOW, wake=wake, redelivered=redelivered, memos=memos or {})


def suspended(*items: Pending) -> Suspended:
    return Suspended(pending=list(items), step_failures={}, attempt=0)


# --- the transition table ---------------------------------------------------------------------

TERMINAL = [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.SKIPPED]
SUSPENDED = [RunStatus.SLEEPING, RunStatus.WAITING, RunStatus.RETRYING]
ALLOWED = {
    RunStatus.QUEUED: {RunStatus.RUNNING, RunStatus.CANCELLED},
    RunStatus.RUNNING: set(RunStatus) - {RunStatus.QUEUED},
    **{s: {RunStatus.RUNNING, RunStatus.CANCELLED} for s in SUSPENDED},
    **{s: set() for s in TERMINAL},
}


@pytest.mark.parametrize(("old", "new"), list(itertools.product(RunStatus, RunStatus)))
def test_the_transition_table_allows_exactly_these_moves(old: RunStatus, new: RunStatus) -> None:
    assert can_transition(old, new) is (new in ALLOWED[old])
    assert (new in TRANSITIONS[old]) is (new in ALLOWED[old])


@pytest.mark.parametrize("old", TERMINAL)
def test_a_terminal_run_never_changes_status_again(old: RunStatus) -> None:
    for new in RunStatus:
        with pytest.raises(IllegalTransition, match="may not become"):
            transition(record(old), new)


def test_a_move_the_table_allows_changes_the_status_and_the_fields_given() -> None:
    moved = transition(record(RunStatus.SLEEPING), RunStatus.RUNNING, updated_at=NOW)
    assert (moved.status, moved.updated_at) == (RunStatus.RUNNING, NOW)


# --- triage: what a delivery means ------------------------------------------------------------

MINE = Lease(worker="w1", until=NOW + 10_000)
THEIRS = Lease(worker="w2", until=NOW + 10_000)
THEIRS_EXPIRED = Lease(worker="w2", until=NOW - 1)
SLEEP_K1 = [item(PendingKind.SLEEP, "k1")]

TRIAGE = [
    # (what is stored, the wake, redelivered, busy here, expected)
    (None, Wake("timer", "k1"), False, False, Triage.UNKNOWN),
    (record(RunStatus.COMPLETED), Wake("timer", "k1"), False, False, Triage.DONE),
    (record(RunStatus.FAILED), Wake("start"), True, False, Triage.EMIT_AGAIN),
    (record(RunStatus.SLEEPING, pending=SLEEP_K1), Wake("timer", "timeout"), False, False, Triage.TIMED_OUT),
    (record(RunStatus.QUEUED), Wake("timer", "start-timeout"), False, False, Triage.TIMED_OUT),
    (record(RunStatus.QUEUED, not_before=LATER), Wake("start"), False, False, Triage.DONE),
    (
        record(RunStatus.QUEUED, not_before=LATER, cancel=CancelInfo(reason="x", at=NOW)),
        Wake("cancel"),
        False,
        False,
        Triage.ADVANCE,
    ),
    (record(RunStatus.QUEUED), Wake("start"), False, False, Triage.ADVANCE),
    (record(RunStatus.SLEEPING, pending=SLEEP_K1), TRIGGER, False, False, Triage.DONE),
    (record(RunStatus.SLEEPING, pending=SLEEP_K1), Wake("timer", "k2"), False, False, Triage.DONE),
    (record(RunStatus.SLEEPING, pending=SLEEP_K1), Wake("timer", "k1"), False, False, Triage.ADVANCE),
    (record(RunStatus.SLEEPING, pending=SLEEP_K1), Wake("cancel"), False, False, Triage.ADVANCE),
    (record(RunStatus.SLEEPING, pending=SLEEP_K1), Wake("timer", "k1"), False, True, Triage.BUSY),
    (record(RunStatus.RUNNING, lease=THEIRS), Wake("start"), True, False, Triage.BUSY),
    (record(RunStatus.RUNNING, lease=THEIRS_EXPIRED), Wake("start"), True, False, Triage.ADVANCE),
    (record(RunStatus.RUNNING, lease=MINE), TRIGGER, True, False, Triage.ADVANCE),
]


@pytest.mark.parametrize(("stored", "wake", "redelivered", "busy_here", "expected"), TRIAGE)
def test_triage_tells_what_a_delivery_means_for_its_run(
    stored: RunRecord | None, wake: Wake, redelivered: bool, busy_here: bool, expected: Triage
) -> None:
    got = triage(stored, wake, now=NOW, worker="w1", redelivered=redelivered, busy_here=busy_here)
    assert got is expected


# --- settle: every outcome x status before the pass x cancel request ---------------------------

ERROR = ErrorInfo(type="ValueError", message="boom")
OUTCOMES: dict[str, Outcome] = {
    "completed": Completed(output=msgspec.Raw(b'{"ok":1}')),
    "failed": Failed(error=ERROR),
    "cancelled": Cancelled(),
    "sleeping": suspended(item(PendingKind.SLEEP)),
    "waiting for an event": suspended(item(PendingKind.SLEEP, "s"), item(PendingKind.WAIT, "w")),
    "waiting for a child": suspended(item(PendingKind.INVOKE, "i", NEVER)),
    "retrying a step": suspended(item(PendingKind.STEP_RETRY)),
    "retrying the function": suspended(item(PendingKind.RUN_RETRY, "run")),
}
EXPECTED = {
    "completed": RunStatus.COMPLETED,
    "failed": RunStatus.FAILED,
    "cancelled": RunStatus.CANCELLED,
    "sleeping": RunStatus.SLEEPING,
    "waiting for an event": RunStatus.WAITING,
    "waiting for a child": RunStatus.WAITING,
    "retrying a step": RunStatus.RETRYING,
    "retrying the function": RunStatus.RETRYING,
}
BEFORE = [RunStatus.QUEUED, RunStatus.RUNNING, *SUSPENDED]
ASKED = CancelInfo(reason="stop it", at=NOW - 100)


@pytest.mark.parametrize("asked", [None, ASKED], ids=["no cancel", "cancel asked"])
@pytest.mark.parametrize("before_status", BEFORE)
@pytest.mark.parametrize("outcome_name", OUTCOMES)
def test_every_outcome_settles_to_its_status_whatever_the_run_was_and_a_cancel_stops_a_suspension(
    outcome_name: str, before_status: RunStatus, asked: CancelInfo | None
) -> None:
    outcome = OUTCOMES[outcome_name]
    before = record(before_status)
    current = record(RunStatus.RUNNING, cancel=asked)
    settled = settle(plain, before, current, outcome, facts())
    expected = EXPECTED[outcome_name]
    if asked is not None and isinstance(outcome, Suspended):
        expected = RunStatus.CANCELLED  # stopped before its next step
    run = settled.record
    assert run.status is expected
    assert run.lease is None
    assert run.updated_at == NOW
    assert run.cancel == asked
    if expected.terminal:
        assert settled.ended
        assert run.pending == []
        assert run.ended_at == NOW
        ids = [e.id for e in settled.emit]
        assert ids[0] == finished_event_id("run-1")
        assert (failed_event_id("run-1") in ids) is (expected is RunStatus.FAILED)
        assert (cancelled_event_id("run-1") in ids) is (expected is RunStatus.CANCELLED)
        assert settled.arm == []
    else:
        assert not settled.ended
        assert isinstance(outcome, Suspended)
        assert run.pending == outcome.pending
        assert run.ended_at is None
        assert settled.emit == []
        assert settled.arm == [p for p in outcome.pending if p.until < NEVER]


def test_an_ended_run_carries_its_output_or_error() -> None:
    done = settle(plain, record(), record(), OUTCOMES["completed"], facts()).record
    assert (done.output, done.error) == (msgspec.Raw(b'{"ok":1}'), None)
    failed = settle(plain, record(), record(), OUTCOMES["failed"], facts()).record
    assert (failed.output, failed.error) == (NULL, ERROR)
    cancelled = settle(plain, record(), record(cancel=ASKED), OUTCOMES["cancelled"], facts()).record
    assert cancelled.error == ErrorInfo(type="Cancelled", message="stop it", retriable=False)


def test_settling_a_run_its_pass_does_not_hold_is_refused() -> None:
    with pytest.raises(IllegalTransition):
        settle(plain, record(), record(RunStatus.COMPLETED), OUTCOMES["sleeping"], facts())


def test_an_invoked_run_that_ends_notifies_its_parent_and_one_that_suspends_does_not() -> None:
    parent = ParentRef(run_id="p", app="t", fn="plain", key="k", step_id="s")
    child = record(parent=parent)
    assert settle(plain, child, child, OUTCOMES["completed"], facts()).notify_parent
    assert not settle(plain, child, child, OUTCOMES["sleeping"], facts()).notify_parent


# --- timers: what a suspending pass arms -------------------------------------------------------


def test_only_new_or_moved_items_get_a_timer_plus_the_one_that_woke_the_pass() -> None:
    kept, moved, woke = (
        item(PendingKind.SLEEP, "a"),
        item(PendingKind.SLEEP, "b"),
        item(PendingKind.SLEEP, "c"),
    )
    before = record(RunStatus.SLEEPING, pending=[kept, moved, woke])
    fresh = item(PendingKind.STEP_RETRY, "d")
    later = msgspec.structs.replace(moved, until=LATER + 1)
    outcome = suspended(kept, later, woke, fresh)
    settled = settle(plain, before, record(), outcome, facts(wake=Wake("timer", "c")))
    assert [p.key for p in settled.arm] == ["b", "c", "d"]


def test_after_a_redelivery_every_timer_is_armed_again_but_never_one_without_a_deadline() -> None:
    sleep, child = item(PendingKind.SLEEP, "a"), item(PendingKind.INVOKE, "b", NEVER)
    before = record(RunStatus.WAITING, pending=[sleep, child])
    settled = settle(plain, before, record(), suspended(sleep, child), facts(redelivered=True))
    assert [p.key for p in settled.arm] == ["a"]


# --- tidying: waits and invokes that ended, and a run that ended -------------------------------


def wait_memo(key: str, seq: int) -> StepMemo:
    return StepMemo(
        id=key,
        hash=key,
        kind=StepKind.WAIT,
        status=StepStatus.COMPLETED,
        started_at=NOW,
        ended_at=NOW,
        seq=seq,
    )


def test_a_wait_that_timed_out_has_its_entries_forgotten_and_one_resolved_in_time_its_timer_dropped() -> None:
    timed_out = item(PendingKind.WAIT, "w1", until=NOW - 1)
    resolved = item(PendingKind.WAIT, "w2", until=LATER)
    child_done = item(PendingKind.INVOKE, "i1", until=LATER)
    child_no_deadline = item(PendingKind.INVOKE, "i2", until=NEVER)
    sleep = item(PendingKind.SLEEP, "s1", until=NOW - 1)
    still = item(PendingKind.SLEEP, "s2", until=LATER)
    before = record(
        RunStatus.WAITING, pending=[timed_out, resolved, child_done, child_no_deadline, sleep, still]
    )
    memos = {"w1": wait_memo("w1", 0), "w2": wait_memo("w2", 42)}
    settled = settle(plain, before, record(), suspended(still), facts(memos=memos))
    assert settled.forget_waits == [timed_out]
    assert settled.drop_timers == ["w2", "i1"]
    assert not settled.forget_cancels


def test_a_wait_resolved_by_an_event_after_its_deadline_needs_no_tidying() -> None:
    late = item(PendingKind.WAIT, "w1", until=NOW - 1)
    settled = settle(
        plain, record(pending=[late]), record(), suspended(), facts(memos={"w1": wait_memo("w1", 7)})
    )
    assert (settled.forget_waits, settled.drop_timers) == ([], [])


def test_a_cancelled_run_drops_every_timer_and_wait_it_had_and_its_cancel_on_and_finish_timeout() -> None:
    wait, sleep, retry = (
        item(PendingKind.WAIT, "w"),
        item(PendingKind.SLEEP, "s"),
        item(PendingKind.STEP_RETRY, "r"),
    )
    child = item(PendingKind.INVOKE, "i")
    before = record(RunStatus.WAITING, pending=[wait, sleep, retry, child])
    settled = settle(guarded, before, record(cancel=ASKED), Cancelled(), facts())
    assert settled.forget_waits == [wait]
    assert sorted(settled.drop_timers) == sorted(["w", "i", "timeout", "s", "r"])
    assert settled.forget_cancels


def test_a_run_that_completes_drops_its_finish_timeout_and_cancel_on_but_nothing_else() -> None:
    settled = settle(guarded, record(), record(), OUTCOMES["completed"], facts())
    assert (settled.drop_timers, settled.forget_waits, settled.forget_cancels) == (["timeout"], [], True)
    settled = settle(plain, record(), record(), OUTCOMES["completed"], facts())
    assert (settled.drop_timers, settled.forget_waits, settled.forget_cancels) == ([], [], False)


# --- waits to register and children to start ----------------------------------------------------


def test_waits_and_children_are_opened_once_and_again_only_after_a_redelivery() -> None:
    wait, child, sleep = (
        item(PendingKind.WAIT, "w"),
        item(PendingKind.INVOKE, "i"),
        item(PendingKind.SLEEP, "s"),
    )
    before = record(RunStatus.WAITING, pending=[wait])
    assert opened_before(before, redelivered=False) == {"w"}
    assert opened_before(before, redelivered=True) == set()
    assert to_open([wait, child, sleep], opened_before(before, redelivered=False)) == [child]
    assert to_open([wait, child, sleep], opened_before(before, redelivered=True)) == [wait, child]
