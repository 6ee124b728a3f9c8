"""Record the run histories in ``histories/`` (``python -m tests.unit.record_histories``).

Without arguments it records only the cases that have no file yet; name cases to re-record them
(``python -m tests.unit.record_histories signup-woken``). Re-record only when a stored format
changes on purpose: a changed golden file in a diff means runs in flight may replay differently
after an upgrade. Files recorded before a stored struct gained a field lack that field; they are
kept as they are, because they stand for records already in KV.

A history's top level holds the run as the worker hands it to the engine: ``events``,
``attempt``, ``now`` (the clock), ``memos`` and ``pending`` in their stored JSON form,
``step_failures``, and, since waits, ``seq`` and ``created_at`` (the run record's fields) and
``cancelled`` (whether a cancel was asked for); absent, those three are 0, 0 and false.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from meshflow import replay
from meshflow.events import Event
from meshflow.expressions import match_key
from meshflow.ids import run_id_for, step_hash
from meshflow.runs import (
    ErrorInfo,
    InvokeSpec,
    Pending,
    PendingKind,
    StepKind,
    StepMemo,
    StepStatus,
    WaitSpec,
)
from meshflow.testing import MemoryEffects

from .history_functions import FUNCTIONS

HERE = Path(__file__).parent / "histories"
T0 = 1_795_000_000_000  # a fixed "now" (epoch ms)
RUN_ID = "run-1"
HOUR = 3_600_000
DAY = 24 * HOUR


def done(step_id: str, value: Any, *, n: int = 0, kind: StepKind = StepKind.RUN, seq: int = 0) -> StepMemo:
    raw = msgspec.Raw(msgspec.json.encode(value))
    return StepMemo(
        id=step_id,
        hash=step_hash(step_id, n),
        kind=kind,
        status=StepStatus.COMPLETED,
        output=raw,
        started_at=T0 - 1000,
        ended_at=T0 - 900,
        seq=seq,
    )


def failed(
    step_id: str,
    error_type: str,
    message: str,
    *,
    kind: StepKind = StepKind.RUN,
    attempts: int = 5,
    child: str | None = None,
) -> StepMemo:
    return StepMemo(
        id=step_id,
        hash=step_hash(step_id),
        kind=kind,
        status=StepStatus.FAILED,
        error=ErrorInfo(type=error_type, message=message, retriable=False),
        attempts=attempts,
        started_at=T0 - 1000,
        ended_at=T0 - 900,
        child=child,
    )


ACCOUNT = {"id": "acc-1", "email": "a@b.c"}
SLEEP_UNTIL = T0 - 10 + 3 * 86_400_000

# Runs triggered from the events stream: the trigger's sequence and the run's creation time.
SEQ = 4242
CREATED = T0 - 60_000

REQUEST = {"requestId": "req-7", "amount": 120}
DECISION = Event(
    name="expense/decided",
    id="ev-decision",
    data={"requestId": "req-7", "approved": True, "by": "boss"},
    ts=T0 + 3 * HOUR - 100,
)
# What the "approval-waiting" pass suspends with; the later approval histories start from it.
APPROVAL_WAIT = Pending(
    kind=PendingKind.WAIT,
    key=step_hash("await-decision"),
    step_id="await-decision",
    until=T0 + 2 * DAY,
    since=T0,
    waits=[
        WaitSpec(
            event="expense/decided", match="data.requestId", match_token=match_key("req-7"), floor_seq=SEQ
        )
    ],
)
FILED = done("file-request", {"request": "req-7", "amount": 120})

CHARGE_CHILD = run_id_for("histories-charge-card", f"{RUN_ID}:{step_hash('charge')}", CREATED)
CHARGE_INVOKE = Pending(
    kind=PendingKind.INVOKE,
    key=step_hash("charge"),
    step_id="charge",
    until=T0 + HOUR,
    since=T0,
    invoke=InvokeSpec(function="histories-charge-card", run_id=CHARGE_CHILD, data={"amount": 120}),
)

CASES: dict[str, dict[str, Any]] = {
    "signup-sleeping": {
        "function": "signup",
        "memos": [done("create-account", ACCOUNT), done("send-welcome", {"sent": "welcome", "to": "a@b.c"})],
        "pending": [
            Pending(
                kind=PendingKind.SLEEP,
                key=step_hash("wait-for-onboarding"),
                step_id="wait-for-onboarding",
                until=SLEEP_UNTIL,
                since=T0 - 10,
            )
        ],
        "now": T0,
    },
    "signup-woken": {
        "function": "signup",
        "memos": [done("create-account", ACCOUNT), done("send-welcome", {"sent": "welcome", "to": "a@b.c"})],
        "pending": [
            Pending(
                kind=PendingKind.SLEEP,
                key=step_hash("wait-for-onboarding"),
                step_id="wait-for-onboarding",
                until=SLEEP_UNTIL,
                since=T0 - 10,
            )
        ],
        "now": SLEEP_UNTIL + 5,
    },
    "loop-half-done": {
        "function": "loop",
        "memos": [done("square", i * i, n=i) for i in range(3)],
        "now": T0,
    },
    "flaky-retry-due": {
        "function": "flaky",
        "pending": [
            Pending(
                kind=PendingKind.STEP_RETRY,
                key=step_hash("call"),
                step_id="call",
                until=T0 - 1,
                since=T0 - 2001,
                attempt=2,
                error=ErrorInfo(type="ConnectionError", message="down"),
            )
        ],
        "step_failures": {step_hash("call"): 2},
        "now": T0,
    },
    "fallback-after-failure": {
        "function": "fallback",
        "memos": [failed("charge", "ValueError", "card declined")],
        "now": T0,
    },
    "fan-parallel-then-sleep": {
        "function": "fan",
        "memos": [done("left", "L")],
        "now": T0,
    },
    "approval-waiting": {
        "function": "approval",
        "event": "expense/submitted",
        "data": REQUEST,
        "seq": SEQ,
        "created_at": CREATED,
        "memos": [FILED],
        "now": T0,
    },
    "approval-decided": {
        "function": "approval",
        "event": "expense/submitted",
        "data": REQUEST,
        "seq": SEQ,
        "created_at": CREATED,
        # The router took the decision: it committed the wait's memo, then resumed the run.
        "memos": [FILED, done("await-decision", DECISION, kind=StepKind.WAIT, seq=SEQ + 17)],
        "pending": [APPROVAL_WAIT],
        "now": T0 + 3 * HOUR,
    },
    "approval-timed-out": {
        "function": "approval",
        "event": "expense/submitted",
        "data": REQUEST,
        "seq": SEQ,
        "created_at": CREATED,
        "memos": [FILED],
        "pending": [APPROVAL_WAIT],
        "now": APPROVAL_WAIT.until + 5,
    },
    "any-of-two": {
        "function": "order-outcome",
        "event": "shop/order.placed",
        "data": {"orderId": 7, "amount": 30},
        "seq": SEQ,
        "created_at": CREATED,
        "now": T0,
    },
    "invoke-waiting": {
        "function": "checkout",
        "event": "shop/checkout",
        "data": {"amount": 120},
        "seq": SEQ,
        "created_at": CREATED,
        "now": T0,
    },
    "invoke-failed-child": {
        "function": "checkout",
        "event": "shop/checkout",
        "data": {"amount": 120},
        "seq": SEQ,
        "created_at": CREATED,
        # The child failed: its end committed the invoke's memo with the child's error.
        "memos": [
            failed(
                "charge",
                "CardDeclined",
                "insufficient funds",
                kind=StepKind.INVOKE,
                attempts=1,
                child=CHARGE_CHILD,
            )
        ],
        "pending": [CHARGE_INVOKE],
        "now": T0 + 10 * 60_000,
    },
    "send-done": {
        "function": "notify",
        "event": "shop/order.shipped",
        "seq": SEQ,
        "created_at": CREATED,
        "memos": [done("request-mail", [f"{RUN_ID}:mail"], kind=StepKind.SEND)],
        "now": T0,
    },
    "cancelled-between-steps": {
        "function": "signup",
        "memos": [done("create-account", ACCOUNT)],
        "cancelled": True,
        "now": T0,
    },
}


async def record(name: str, case: dict[str, Any]) -> dict[str, Any]:
    memos: list[StepMemo] = case.get("memos", [])
    pending: list[Pending] = case.get("pending", [])
    trigger = Event(
        name=case.get("event", "x/y"),
        data=case.get("data", {"email": "a@b.c"}),
        id=f"ev-{name}",
        ts=T0 - 5000,
    )
    history = {
        "function": case["function"],
        "events": [msgspec.to_builtins(trigger)],
        "attempt": 0,
        "now": case["now"],
        "seq": case.get("seq", 0),
        "created_at": case.get("created_at", 0),
        "cancelled": case.get("cancelled", False),
        "memos": [json.loads(msgspec.json.encode(m)) for m in memos],
        "pending": [json.loads(msgspec.json.encode(p)) for p in pending],
        "step_failures": case.get("step_failures", {}),
    }
    history["expect"] = await replay_history(history)
    return history


async def replay_pass(history: dict[str, Any], effects: MemoryEffects) -> replay.Outcome:
    """Run one engine pass over a recorded history, as a worker would hand it over."""
    from meshflow.runs import decode_memo

    events = [msgspec.convert(e, Event) for e in history["events"]]
    memos = [decode_memo(json.dumps(m).encode()) for m in history["memos"]]
    pending = [msgspec.convert(p, Pending) for p in history["pending"]]
    cancelled = bool(history.get("cancelled", False))
    return await replay.execute(
        replay.Activation(
            function=FUNCTIONS[history["function"]],
            run_id=RUN_ID,
            events=events,
            attempt=history["attempt"],
            memos={m.hash: m for m in memos},
            pending=pending,
            step_failures=history["step_failures"],
            clock=lambda: history["now"],
            random=lambda: 0.0,
            seq=history.get("seq", 0),
            created_at=history.get("created_at", 0),
            cancelled=lambda: cancelled,
        ),
        effects,
    )


def describe(outcome: replay.Outcome, effects: MemoryEffects) -> dict[str, Any]:
    """What came of a replay: the part the test compares.

    Keys and row fields that only the newer step kinds produce (a wait's floors, an invoke's
    child, events sent) appear only when there is something to show, so histories recorded
    before those kinds existed describe themselves as they did when they were recorded.
    """
    described: dict[str, Any] = {
        "outcome": type(outcome).__name__,
        "committed": [_committed_row(m) for m in effects.commits],
    }
    if effects.sent:
        described["sent"] = [[[e.id for e in events], msg_ids] for events, msg_ids in effects.sent]
    if isinstance(outcome, replay.Completed):
        described["output"] = json.loads(bytes(outcome.output))
    elif isinstance(outcome, replay.Failed):
        described["error"] = [outcome.error.type, outcome.error.message]
    elif isinstance(outcome, replay.Suspended):
        described["pending"] = sorted([p.kind, p.step_id, p.until, p.attempt] for p in outcome.pending)
        waits = {p.step_id: msgspec.to_builtins(p.waits) for p in outcome.pending if p.waits}
        if waits:
            described["waits"] = waits
        invokes = {p.step_id: msgspec.to_builtins(p.invoke) for p in outcome.pending if p.invoke}
        if invokes:
            described["invokes"] = invokes
    return described


def _committed_row(memo: StepMemo) -> list[Any]:
    row = [memo.id, memo.kind, memo.status, json.loads(bytes(memo.output)), memo.attempts]
    if memo.kind is StepKind.WAIT:
        row.append(memo.seq)  # the taken event's sequence (0 for a timeout): the next wait's floor
    elif memo.kind is StepKind.INVOKE:
        row.append(memo.child)
    return row


async def replay_history(history: dict[str, Any]) -> dict[str, Any]:
    """Replay a recorded history and describe what came of it."""
    effects = MemoryEffects()
    return describe(await replay_pass(history, effects), effects)


def main(names: Sequence[str] = ()) -> None:
    """Record the named cases, or, with no names, the cases that have no file yet."""
    unknown = set(names) - set(CASES)
    if unknown:
        raise SystemExit(f"no such case: {', '.join(sorted(unknown))}")
    HERE.mkdir(exist_ok=True)
    wanted = set(names) or {name for name in CASES if not (HERE / f"{name}.json").exists()}
    for name, case in CASES.items():
        if name not in wanted:
            continue
        path = HERE / f"{name}.json"
        history = asyncio.run(record(name, case))
        path.write_text(json.dumps(history, indent=2, sort_keys=True) + "\n")
        print(name, history["expect"]["outcome"])


if __name__ == "__main__":
    main(sys.argv[1:])
