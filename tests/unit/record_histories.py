"""Record the run histories in ``histories/`` (``python -m tests.unit.record_histories``).

Run it only to add a history or when a stored format changes on purpose; a changed golden file
in a diff means runs in flight may replay differently after an upgrade.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec

from meshflow import replay
from meshflow.events import Event
from meshflow.ids import step_hash
from meshflow.runs import ErrorInfo, Pending, PendingKind, StepKind, StepMemo, StepStatus

from .history_functions import FUNCTIONS

HERE = Path(__file__).parent / "histories"
T0 = 1_795_000_000_000  # a fixed "now" (epoch ms)


class Effects:
    def __init__(self) -> None:
        self.committed: list[StepMemo] = []

    async def commit(self, memo: StepMemo) -> StepMemo:
        self.committed.append(memo)
        return memo


def done(step_id: str, value: Any, *, n: int = 0, kind: StepKind = StepKind.RUN) -> StepMemo:
    raw = msgspec.Raw(msgspec.json.encode(value))
    return StepMemo(
        id=step_id,
        hash=step_hash(step_id, n),
        kind=kind,
        status=StepStatus.COMPLETED,
        output=raw,
        started_at=T0 - 1000,
        ended_at=T0 - 900,
    )


def failed(step_id: str, error_type: str, message: str) -> StepMemo:
    return StepMemo(
        id=step_id,
        hash=step_hash(step_id),
        kind=StepKind.RUN,
        status=StepStatus.FAILED,
        error=ErrorInfo(type=error_type, message=message, retriable=False),
        attempts=5,
        started_at=T0 - 1000,
        ended_at=T0 - 900,
    )


ACCOUNT = {"id": "acc-1", "email": "a@b.c"}
SLEEP_UNTIL = T0 - 10 + 3 * 86_400_000

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
}


async def record(name: str, case: dict[str, Any]) -> dict[str, Any]:
    memos: list[StepMemo] = case.get("memos", [])
    pending: list[Pending] = case.get("pending", [])
    history = {
        "function": case["function"],
        "events": [
            msgspec.to_builtins(Event(name="x/y", data={"email": "a@b.c"}, id=f"ev-{name}", ts=T0 - 5000))
        ],
        "attempt": 0,
        "now": case["now"],
        "memos": [json.loads(msgspec.json.encode(m)) for m in memos],
        "pending": [json.loads(msgspec.json.encode(p)) for p in pending],
        "step_failures": case.get("step_failures", {}),
    }
    history["expect"] = await replay_history(history)
    return history


async def replay_history(history: dict[str, Any]) -> dict[str, Any]:
    """Replay a recorded history and describe what came of it (the part the test compares)."""
    from meshflow.runs import decode_memo

    events = [msgspec.convert(e, Event) for e in history["events"]]
    memos = [decode_memo(json.dumps(m).encode()) for m in history["memos"]]
    pending = [msgspec.convert(p, Pending) for p in history["pending"]]
    effects = Effects()
    outcome = await replay.execute(
        replay.Activation(
            function=FUNCTIONS[history["function"]],
            run_id="run-1",
            events=events,
            attempt=history["attempt"],
            memos={m.hash: m for m in memos},
            pending=pending,
            step_failures=history["step_failures"],
            clock=lambda: history["now"],
            random=lambda: 0.0,
        ),
        effects,
    )
    described: dict[str, Any] = {
        "outcome": type(outcome).__name__,
        "committed": [
            [m.id, m.kind, m.status, json.loads(bytes(m.output)), m.attempts] for m in effects.committed
        ],
    }
    if isinstance(outcome, replay.Completed):
        described["output"] = json.loads(bytes(outcome.output))
    elif isinstance(outcome, replay.Failed):
        described["error"] = [outcome.error.type, outcome.error.message]
    else:
        described["pending"] = sorted([p.kind, p.step_id, p.until, p.attempt] for p in outcome.pending)
    return described


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, case in CASES.items():
        history = asyncio.run(record(name, case))
        (HERE / f"{name}.json").write_text(json.dumps(history, indent=2, sort_keys=True) + "\n")
        print(name, history["expect"]["outcome"])


if __name__ == "__main__":
    main()
