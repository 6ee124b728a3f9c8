"""Concurrency slots in the flow bucket (the KV side of ``flow.concurrency``).

One key per constraint and key value: ``cc.{fn}.{key}`` (``scope="fn"``) or
``cc.env.{expression}.{key}`` (``scope="env"``, shared by every function using that key
expression), holding the slot holders with their leases and the runs waiting for a slot,
updated by compare-and-set. Whoever frees a slot wakes the waiting run it goes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import msgspec
import structlog

from ..bus import Bus, RunMessage
from ..durations import now_ms
from ..errors import ExpressionError, NatsError
from ..functions import Function
from ..names import slot_wake_id
from ..runs import RunRecord
from ..store import Store
from . import concurrency
from .starts import key_token

log = structlog.get_logger("meshflow.flow")

_ATTEMPTS = 50
#: Inngest's bounds for a run's priority, in seconds.
MAX_PRIORITY_S = 600
_decoder = msgspec.json.Decoder(concurrency.State)

Slot = tuple[str, int]  # (flow key, limit)
T = TypeVar("T")


class Slots:
    def __init__(self, store: Store, bus: Bus, lease_ms: int) -> None:
        self.store = store
        self.bus = bus
        self.lease_ms = lease_ms

    def keys(self, fn: Function, record: RunRecord) -> list[Slot]:
        """The slot keys a run of ``fn`` needs, with their limits."""
        event = record.events[0]
        out = []
        for spec in fn.flow.concurrency:
            token = key_token(spec.key, event)
            if spec.scope == "env" and spec.key is not None:
                expr = hashlib.sha1(spec.key.source.encode(), usedforsecurity=False).hexdigest()[:12]
                out.append((f"cc.env.{expr}.{token}", spec.limit))
            else:
                out.append((f"cc.{fn.full_id}.{token}", spec.limit))
        return out

    def priority_ms(self, fn: Function, record: RunRecord) -> int:
        expr = fn.flow.priority
        if expr is None:
            return 0
        try:
            value = expr.evaluate({"event": msgspec.to_builtins(record.events[0])})
        except ExpressionError as exc:
            log.warning("priority not computed; 0 applies", function=fn.full_id, error=str(exc))
            return 0
        if isinstance(value, bool) or not isinstance(value, int | float):
            log.warning("priority is not a number of seconds; 0 applies", function=fn.full_id, value=value)
            return 0
        return int(max(-MAX_PRIORITY_S, min(MAX_PRIORITY_S, value)) * 1000)

    async def acquire(self, fn: Function, record: RunRecord) -> tuple[list[Slot], str] | None:
        """Take a slot under every constraint of ``fn`` for one pass of the run; the slots held and
        the holder's name, or None (holding nothing; the run is queued) when some constraint is full.

        Each pass holds its own slot (``{run_id}.{nonce}``), so a second pass of the same run that
        loses the run's lease releases only its own.
        """
        owner = f"{record.id}.{secrets.token_hex(4)}"
        held = await self._take(fn, record, owner, queue=True)
        return None if held is None else (held, owner)

    async def try_extra(self, fn: Function, record: RunRecord, owner: str) -> list[Slot] | None:
        """An extra slot under every constraint, for a step executing beside another in a pass;
        None (holding nothing, queued nowhere) unless each is free and no run waits for it."""
        return await self._take(fn, record, owner, queue=False)

    async def _take(self, fn: Function, record: RunRecord, owner: str, *, queue: bool) -> list[Slot] | None:
        """A slot under every constraint for ``owner``, or None, holding none, if one is full."""
        priority = self.priority_ms(fn, record)
        held: list[Slot] = []
        for key, limit in self.keys(fn, record):

            def take(state: concurrency.State | None, limit: int = limit) -> tuple[concurrency.State, bool]:
                taken, new = concurrency.acquire(
                    state or concurrency.State(),
                    owner,
                    record.id,
                    now_ms(),
                    limit=limit,
                    lease_ms=self.lease_ms,
                    priority_ms=priority,
                    queue=queue,
                )
                return new, taken

            if not await self._update(key, take, must=True):
                await self.release(held, owner)
                return None
            held.append((key, limit))
        return held

    async def renew(self, slots: list[Slot], owner: str) -> None:
        def extend(state: concurrency.State | None) -> tuple[concurrency.State | None, None]:
            if state is None:
                return None, None
            state.holders[owner] = now_ms() + self.lease_ms
            return state, None

        for key, _ in slots:
            await self._update(key, extend, must=False)

    async def release(self, slots: list[Slot], owner: str) -> None:
        """Free the pass's slots, and wake the waiting run each goes to."""
        for key, limit in slots:

            def free(
                state: concurrency.State | None, limit: int = limit
            ) -> tuple[concurrency.State | None, str | None]:
                if state is None:
                    return None, None
                return concurrency.release(state, owner, now_ms(), limit=limit)

            wake = await self._update(key, free, must=False)
            if wake is not None:
                await self._wake(wake)

    async def _update(
        self,
        key: str,
        change: Callable[[concurrency.State | None], tuple[concurrency.State | None, T]],
        *,
        must: bool,
    ) -> T | None:
        """Apply ``change`` to a key's state (None: there is none) by compare-and-set, again on a
        conflict; its result. ``change`` returning no state writes nothing. After too many
        conflicts: `NatsError` if ``must``, else None (a renewal or release the lease covers)."""
        for _ in range(_ATTEMPTS):
            got = await self.store.get_flow(key)
            state = _decoder.decode(got[0]) if got and got[0] else None
            new, result = change(state)
            if new is None:
                return result
            if await self.store.put_flow(key, msgspec.json.encode(new), got[1] if got else 0, self._ttl()):
                return result
        if must:
            raise NatsError(f"concurrency state {key} kept changing")
        return None

    async def _wake(self, run_id: str) -> None:
        found = await self.store.get_run(run_id)
        if found is None or found[0].status.terminal:
            return
        record = found[0]
        message = RunMessage(run_id=run_id, reason="slot")
        await self.bus.publish_run(
            record.app, record.fn, message, msg_id=slot_wake_id(run_id, secrets.token_hex(4))
        )

    def _ttl(self) -> int:
        return max(self.lease_ms, concurrency.WAIT_LEASE_MS) // 1000 + 60


class StepSlots:
    """The slots one pass's executing steps hold (`replay.Activation.step_slot`).

    A limit counts executing steps. The first step executes on the slot the pass took; a step
    that starts while another executes takes an extra slot if one is free and no run waits
    for it (released when the step ends), or else waits for the pass's own slot.
    """

    def __init__(self, slots: Slots, fn: Function, record: RunRecord, owner: str) -> None:
        self._slots = slots
        self._fn = fn
        self._record = record
        self._owner = owner
        self._own = asyncio.Lock()  # the pass's own slot: one step at a time holds it
        self._extras: dict[str, list[Slot]] = {}  # extra holder -> its slots
        self._count = 0

    @contextlib.asynccontextmanager
    async def executing(self) -> AsyncIterator[None]:
        if not self._own.locked():
            async with self._own:
                yield
            return
        self._count += 1
        extra_owner = f"{self._owner}.x{self._count}"
        extra = await self._slots.try_extra(self._fn, self._record, extra_owner)
        if extra is None:
            log.debug("step waits for its pass's concurrency slot", run_id=self._record.id)
            async with self._own:
                yield
            return
        self._extras[extra_owner] = extra
        try:
            yield
        finally:
            del self._extras[extra_owner]
            await self._slots.release(extra, extra_owner)

    async def renew(self) -> None:
        """Extend the leases of the extra slots held now (the pass's own renews with the pass)."""
        for owner, slots in list(self._extras.items()):
            await self._slots.renew(slots, owner)


def slot_backoff(tries: int) -> float:
    """How long a run waiting for a concurrency slot waits before it asks again: 50 ms, doubling
    with each try to 2 s, jittered so waiting runs do not ask in lockstep."""
    delay: float = min(0.05 * 2 ** min(tries - 1, 6), 2.0) * (0.5 + random.random())  # noqa: S311 - jitter
    return delay
