"""Debounce and batch: events of a key gather into one queued run (their KV side).

A window is a queued run plus a pointer to it in the flow bucket (``db.`` / ``bt.{fn}.{key}``).
An event either joins the open window, by compare-and-set on the run record while it is still
queued, or opens a new one: it first points the key at its own run id (compare-and-set), then
creates the run, so two workers never open two windows for one key. A window's run starts from
its "start" timer (debounce: ``period`` after the last event, bounded by ``timeout``; batch:
``timeout`` after the first) or at once when a batch is full. Starting takes the run record by
compare-and-set too, so an event and the start racing resolve cleanly: a late event opens the
next window.
"""

from __future__ import annotations

import asyncio

import msgspec

from .. import tracing
from ..bus import Bus, RunMessage
from ..durations import now_ms
from ..errors import NatsError
from ..events import Event, encode_event
from ..functions import Function
from ..names import batch_full_id
from ..runs import RunRecord, RunStatus, TraceContext, encode_record, record_limit, record_size
from ..store import RunConflict, Store
from . import batching, debounce
from .starts import key_token

_ATTEMPTS = 100
#: How long a window's key may point at a run its creator has not written yet before another
#: worker takes the key over (the creator died between the two writes).
_ORPHAN_MS = 5_000


class Windows:
    def __init__(self, store: Store, bus: Bus) -> None:
        self.store = store
        self.bus = bus
        # One event per key at a time in this worker: concurrent joins of one window would only
        # collide on its record (compare-and-set) and retry. Workers still share windows safely.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def gather(
        self, fn: Function, event: Event, run_id: str, seq: int, trace: TraceContext | None = None
    ) -> RunRecord | None:
        """Add the event to its key's window. Returns the record of a window it opened (for the
        caller to arm), or None when it joined one. A window's run joins the trace of the event
        that opened it (``trace``, from its message)."""
        window = fn.flow.debounce or fn.flow.batch
        assert window is not None
        kind = "db" if fn.flow.debounce is not None else "bt"
        key = f"{kind}.{fn.full_id}.{key_token(window.key, event)}"
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                return await self._gather(fn, event, run_id, seq, key, trace)
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]  # idle keys hold no memory
            else:
                self._locks[key] = (lock, users - 1)

    async def _gather(
        self, fn: Function, event: Event, run_id: str, seq: int, key: str, trace: TraceContext | None
    ) -> RunRecord | None:
        window = fn.flow.debounce or fn.flow.batch
        assert window is not None
        for _ in range(_ATTEMPTS):
            got = await self.store.get_flow(key)
            pointer, opened = _pointer(got[0] if got else b"")
            if pointer is not None and pointer != run_id:
                joined = await self._join(fn, pointer, opened, event, seq)
                if joined is True:
                    return None
                if joined is None:  # its run is not written yet: its creator is on the way
                    await asyncio.sleep(0.02)
                    continue
            elif pointer == run_id:  # ours: a redelivered event whose window we opened
                found = await self.store.get_run(run_id)
                if found is not None:
                    return None
            ttl = (window.timeout_ms or window.period_ms) // 1000 + 3600
            value = f"{run_id} {now_ms()}".encode()
            if await self.store.put_flow(key, value, got[1] if got else 0, ttl):
                return await self._open(fn, run_id, event, seq, trace)
        raise NatsError(f"window {key} kept changing")

    async def _join(self, fn: Function, run_id: str, opened: int, event: Event, seq: int) -> bool | None:
        """Add the event to the window's queued run: True; False if that window is closed (the run
        started or is full); None if the run is not written yet."""
        for _ in range(_ATTEMPTS):
            found = await self.store.get_run(run_id)
            if found is None:
                return None if now_ms() - opened < _ORPHAN_MS else False
            record, rev = found
            if record.status is not RunStatus.QUEUED or record.cancel is not None:
                return False
            updated = self._with(fn, record, event, seq)
            if updated is None:
                return False  # a full batch
            if updated is record:
                return True  # joined before (a redelivered event)
            try:
                await self.store.update_run(updated, rev)
            except RunConflict:
                continue
            if updated.not_before != record.not_before:
                await self._schedule(fn, updated)
            return True
        raise NatsError(f"run {run_id}: its window kept changing")

    def _with(self, fn: Function, record: RunRecord, event: Event, seq: int) -> RunRecord | None:
        now = now_ms()
        if any(e.id == event.id for e in record.events):
            return record  # a redelivered event that joined already
        if fn.flow.debounce is not None:
            spec = fn.flow.debounce
            later = seq >= record.seq  # workers may take a key's events out of order: the stream's wins
            if spec.all_events:
                events = sorted([*record.events, event], key=lambda e: e.ts)
            else:
                events = [event] if later else record.events
            first = record.created_at
            due = debounce.start_at(first, now, period_ms=spec.period_ms, timeout_ms=spec.timeout_ms)
            joined = msgspec.structs.replace(
                record, events=events, seq=max(seq, record.seq), not_before=due, updated_at=now
            )
            if record_size(joined) > record_limit(self.bus.max_payload):
                return None  # no room left in its record: the event opens the next window
            return joined
        batch = fn.flow.batch
        assert batch is not None
        size = len(encode_record(record))
        if not batching.takes(len(record.events), size, len(encode_event(event)), max_size=batch.max_size):
            return None
        events = [*record.events, event]
        due = 1 if batching.full(len(events), max_size=batch.max_size) else record.not_before
        return msgspec.structs.replace(record, events=events, not_before=due, updated_at=now)

    async def _open(
        self, fn: Function, run_id: str, event: Event, seq: int, trace: TraceContext | None
    ) -> RunRecord | None:
        now = now_ms()
        window = fn.flow.debounce or fn.flow.batch
        assert window is not None
        if fn.flow.debounce is not None:
            due = debounce.start_at(now, now, period_ms=window.period_ms, timeout_ms=window.timeout_ms)
        else:
            due = 1 if batching.full(1, max_size=window.max_size) else now + window.period_ms
        record = RunRecord(
            id=run_id,
            app=fn.app_id,
            function=fn.full_id,
            fn=fn.id,
            status=RunStatus.QUEUED,
            events=[event],
            created_at=now,
            updated_at=now,
            seq=seq,
            not_before=due,
            armed=True,
            trace=tracing.for_new_run(fn.full_id, run_id, trace),
        )
        if await self.store.create_run(record) is None:
            return None  # written before: a redelivered event
        return record

    async def _schedule(self, fn: Function, record: RunRecord) -> None:
        """Move the window's start: a new timer (replacing the old), or start a full batch now."""
        if record.not_before <= now_ms():
            start = RunMessage(run_id=record.id, reason="start")
            await self.bus.publish_run(fn.app_id, fn.id, start, msg_id=batch_full_id(record.id))
        else:
            await self.bus.schedule(fn, record.id, "start", record.not_before)


def _pointer(value: bytes) -> tuple[str | None, int]:
    """A window key's value: the run it points at and when it was opened (epoch ms)."""
    run_id, _, opened = value.decode().partition(" ")
    return (run_id or None), int(opened) if opened.isdigit() else 0
