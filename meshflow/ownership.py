"""What a pass holds of its run (`Ownership`), the fence that keeps a pass that lost its run from
acting on it, and the engine's effects as a pass carries them out (`StoreEffects`).

A pass owns its run through its lease: a token of its own in the run record, written by
compare-and-set, renewed by the pass's heartbeat. Every write of the record compares the
revision the pass holds; the fence is asked before each step runs, after each commit and before
the outcome is written (``meshflow.passes``). A pass that lost its run stops at once
(`RunLost`); a pass whose worker stops ends after the step it runs (`Yielded`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import msgspec

from . import tracing
from .bus import Bus
from .durations import now_ms
from .events import Event, encode_event
from .flow.slots import Slot, StepSlots
from .names import HDR_MSG_ID
from .runs import RunRecord, RunStatus, StepKind, StepMemo, transition
from .store import RunConflict, Store

#: Step kinds a pass executes itself (the others are resolved by routers, children, timeouts).
_EXECUTED = frozenset({StepKind.RUN, StepKind.SEND})


class StoreEffects:
    """The engine's effects: committing memos to the steps bucket, sending events.

    A commit goes through even when the pass has just lost its run (a step that was running may
    finish: its result is kept if no other pass committed one), then the fence stops the pass.
    A commit that finds another pass's result for a step this pass executed asks the store
    whether the run is still this pass's before it goes on.
    """

    def __init__(self, store: Store, bus: Bus, own: Ownership, memos: dict[str, StepMemo]) -> None:
        self.store = store
        self.bus = bus
        self.own = own
        self.run_id = own.record.id
        self.memos = dict(memos)  # what is committed now: the pass's memos plus its commits

    async def commit(self, memo: StepMemo) -> StepMemo:
        lost = False
        if memo.kind in _EXECUTED:
            try:
                await self.own.fence(may_yield=False)  # a step that ran is committed, stopping or not
            except RunLost:  # the step ran while another pass took the run over: one more attempt
                lost = True
                memo = await self._counted(memo)
        stored = await self.store.commit_memo(self.run_id, memo)
        self.memos[stored.hash] = stored
        if not lost and stored is not memo and memo.kind in _EXECUTED:
            await self.own.renew()  # someone else ran this step too: is the run still ours?
        await self.own.fence()
        return stored

    async def _counted(self, memo: StepMemo) -> StepMemo:
        """``memo`` of a step this pass ran after losing its run, its attempts counted with the
        pass that took over: that pass's count (with this pass's attempt in it if the lease
        recorded it executing), its own attempt, and this one's if it was not recorded."""
        got = await self.store.get_run(self.run_id)
        if got is None:
            return memo
        lease = self.own.record.lease
        recorded = lease is not None and memo.hash in lease.executing
        taken = got[0].step_failures.get(memo.hash, 0) + 1 + (0 if recorded else 1)
        return msgspec.structs.replace(memo, attempts=max(memo.attempts, taken))

    async def send(self, events: Sequence[Event], msg_ids: Sequence[str]) -> None:
        subject = self.bus.names.event_subject
        trace = tracing.outgoing(self.own.record.trace)  # the current span (the pass's), or the run's
        await self.bus.publish_many(
            [
                (subject(e.name), encode_event(e), {HDR_MSG_ID: m, **trace})
                for e, m in zip(events, msg_ids, strict=True)
            ]
        )


class RunLost(Exception):
    """The pass no longer holds its run: another pass took the run over after this one's lease
    ran out (a stalled worker), or the run ended. The pass stops at once. Never leaves the worker."""


class Yielded(Exception):
    """The worker is stopping: the pass ends after the step it ran, and lets its run go for
    another worker to go on with at once. Never leaves the worker."""


class Ownership:
    """What a pass holds of its run, and the fence that keeps a pass that lost it from acting.

    The pass holds the record as last written under its lease and that write's revision; every
    write of the record is a compare-and-set on that revision, and the lease's ``token`` tells
    this pass's lease from another's. `fence` is asked before each step runs, before each commit
    goes on and before the pass writes its outcome: it costs nothing while the lease is in date
    by a third of its length (the heartbeat renews it every third), and one compare-and-set (a
    renewal) when it is nearer its end than that, which happens after a stall (a GC or swap pause,
    a stopped process). A renewal that finds another pass's token, or an ended run, loses the
    run: from then on the fence raises `RunLost`.
    """

    __slots__ = (
        "_lost",
        "_renewing",
        "_stopping",
        "_store",
        "executing",
        "lease_ms",
        "owner",
        "record",
        "rev",
        "slots",
        "step_slots",
    )

    def __init__(
        self,
        store: Store,
        record: RunRecord,
        rev: int,
        *,
        lease_ms: int,
        slots: list[Slot] | None = None,
        owner: str = "",
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        assert record.lease is not None, record.id
        self._store = store
        self.record = record
        self.rev = rev
        self.lease_ms = lease_ms
        self.slots = slots or []
        self.owner = owner
        self.step_slots: StepSlots | None = None  # extra slots for steps executing side by side
        self.executing: set[str] = set()  # the steps whose handlers run now (the engine keeps it)
        self._lost = False
        self._renewing = asyncio.Lock()
        self._stopping = stopping

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def token(self) -> str:
        lease = self.record.lease
        return lease.token if lease is not None else ""

    def holds(self, record: RunRecord) -> bool:
        """Whether ``record`` (read from the store) is still under this pass's lease."""
        return not record.status.terminal and record.lease is not None and record.lease.token == self.token

    def lose(self) -> None:
        self._lost = True

    async def fence(self, *, may_yield: bool = True) -> None:
        """Raise `RunLost` unless this pass still holds its run (renewing a lease near its end),
        and `Yielded` when the worker is stopping (unless not ``may_yield``: the pass is done)."""
        lease = self.record.lease
        if not self._lost and (lease is None or now_ms() + self.lease_ms // 3 >= lease.until):
            await self.renew()
        if self._lost:
            raise RunLost(f"run {self.record.id}: another pass holds it now")
        if may_yield and self._stopping():
            raise Yielded(f"run {self.record.id}: the worker stops")

    async def renew(self, *, release: bool = False) -> None:
        """Extend the lease by compare-and-set, recording the steps executing now; a cancel
        request written meanwhile is adopted, a write by another pass loses the run. NATS errors
        leave everything as it was. ``release``: end the lease now instead (the worker stops), so
        another worker may take the run at once and count its executing steps as attempts."""
        async with self._renewing:
            lease = self.record.lease
            if self._lost or lease is None:
                return
            now = now_ms()
            until = now if release else now + self.lease_ms
            renewed = transition(
                self.record,
                RunStatus.RUNNING,
                lease=msgspec.structs.replace(lease, until=until, executing=sorted(self.executing)),
                updated_at=now,
            )
            try:
                self.rev = await self._store.update_run(renewed, self.rev, was=self.record.status)
                self.record = renewed
            except RunConflict:  # written by someone else: a cancel request, or another pass
                got = await self._store.get_run(self.record.id)
                if got is None or not self.holds(got[0]):
                    self._lost = True
                else:
                    self.record, self.rev = got
