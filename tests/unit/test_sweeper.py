"""Which runs the sweeper counts as stuck (`meshflow.sweeper.stuck`), as a table."""

from __future__ import annotations

import msgspec
import pytest

from meshflow.events import Event
from meshflow.runs import NEVER, Lease, Pending, PendingKind, RunRecord, RunStatus, new_run
from meshflow.sweeper import stuck

NOW = 1_800_000_000_000
GRACE = 60_000


def record(status: RunStatus, **fields: object) -> RunRecord:
    base = new_run("r", app="a", fn="f", events=[Event(name="a/b")], now=NOW - 3_600_000)
    return msgspec.structs.replace(base, status=status, **fields)


def item(key: str, until: int, kind: PendingKind = PendingKind.SLEEP) -> Pending:
    return Pending(kind=kind, key=key, until=until)


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (record(RunStatus.COMPLETED), None),
        (record(RunStatus.SKIPPED), None),
        (record(RunStatus.SLEEPING, pending=[item("nap", NOW - GRACE - 1)]), ("nap", NOW - GRACE - 1)),
        (record(RunStatus.SLEEPING, pending=[item("nap", NOW - GRACE + 1)]), None),  # within its grace
        (record(RunStatus.SLEEPING, pending=[item("nap", NOW + 1000)]), None),
        (
            record(
                RunStatus.WAITING, pending=[item("w", NOW + 9, PendingKind.WAIT), item("t", NOW - 2 * GRACE)]
            ),
            ("t", NOW - 2 * GRACE),
        ),
        (record(RunStatus.WAITING, pending=[item("child", NEVER, PendingKind.INVOKE)]), None),  # no deadline
        (
            record(RunStatus.RETRYING, pending=[item("run", NOW - 10 * GRACE, PendingKind.RUN_RETRY)]),
            ("run", NOW - 10 * GRACE),
        ),
        (record(RunStatus.QUEUED, not_before=NOW - 2 * GRACE), ("", NOW - 2 * GRACE)),
        (record(RunStatus.QUEUED, not_before=NOW + GRACE), None),  # a future start
        (record(RunStatus.QUEUED), ("", NOW - 3_600_000)),  # created an hour ago, never started
        (record(RunStatus.RUNNING, lease=Lease(worker="w", until=NOW - 2 * GRACE)), ("", NOW - 2 * GRACE)),
        (record(RunStatus.RUNNING, lease=Lease(worker="w", until=NOW + 1000)), None),  # a live pass
    ],
    ids=lambda v: v.status.value if isinstance(v, RunRecord) else None,
)
def test_a_run_is_stuck_when_it_should_have_moved_on_past_its_grace(
    run: RunRecord, expected: tuple[str, int] | None
) -> None:
    assert stuck(run, NOW, GRACE) == expected
