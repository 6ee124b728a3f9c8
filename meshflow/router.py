"""The event router: resumes runs waiting in ``wait_for_event`` / ``wait_for_any`` (and cancels
runs whose ``cancel_on`` event arrives).

Only the event names some run has waited for are routed: each gets a durable consumer
``route-{name}`` on the events stream the first time a run waits for it (and a marker in the waits
bucket, so every worker finds it and pulls from it too). Events nobody waits for cost the router
nothing. All workers share each route consumer, so an event is routed once however many run. For
an event the router looks up the waiters of its name (see ``waits`` for the index), and for each
one that accepts the event it commits the wait's step memo (``create``: first writer wins, so an
event and a timeout, or two events, resolve a wait exactly once), publishes "advance run" for the
run, and drops the wait's entries.

Nothing is missed: a worker suspending a run on a wait makes sure the name's route consumer
exists, reads the events already in the wait's window (`Router.open_wait`), registers the waiter,
then reads again from where it stopped. An event stored before the waiter was written is found by
the second read; one stored after it reaches the route consumer (created before either read),
whose lookup sees the waiter. Both may find the same event; the memo commit makes that harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import structlog

from .bus import Bus, RunMessage
from .control import request_cancel
from .durations import now_ms
from .errors import MeshflowError, RunNotFoundError
from .events import Event, decode_stored_event, encode_event
from .functions import Function
from .names import Names, event_wake_id
from .runs import NEVER, Pending, PendingKind, RunRecord, StepKind, StepMemo, StepStatus, WaitSpec
from .store import Store
from .waits import (
    Waiter,
    accepts,
    decode_waiter,
    encode_waiter,
    field_token,
    in_window,
    match_token,
    name_token,
    waiter_keys,
)

log = structlog.get_logger("meshflow.router")

_SCAN_BATCH = 256
DISCOVER_EVERY = 5.0  # seconds between two looks for routes other workers created
#: Waiter entries outlive their wait's timeout by this much, then expire on their own.
_WAITER_GRACE_S = 3600


class Router:
    """Registers waits and routes events to them, for one namespace."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        names: Names,
        follow: Callable[[str, str], Awaitable[None]],
        *,
        ack_wait: float,
    ) -> None:
        self.store = store
        self.bus = bus
        self.names = names
        self.follow = follow  # start pulling a route consumer: (event name, name token)
        self.ack_wait = ack_wait
        self._routes: set[str] = set()  # name tokens whose consumer exists and is followed here

    # --- route consumers ------------------------------------------------------------------------
    async def ensure_route(self, event_name: str) -> None:
        """Make sure events named ``event_name`` are routed, and that this worker routes them."""
        token = name_token(event_name)
        if token in self._routes:
            return
        await self.bus.ensure_route(event_name, token, ack_wait=self.ack_wait)
        await self.store.put_waits([(self.names.wait_name_key(token), event_name.encode(), None)])
        if token not in self._routes:  # a concurrent call may have got here first
            self._routes.add(token)
            await self.follow(event_name, token)

    async def discover(self) -> None:
        """Follow the route consumers other workers created (the names runs wait for)."""
        found = await self.store.find_waits([self.names.wait_names])
        for value in found.values():
            name = value.decode()
            if name_token(name) not in self._routes:
                await self.ensure_route(name)

    async def keep_discovering(self, stopping: asyncio.Event, every: float = DISCOVER_EVERY) -> None:
        """`discover` every ``every`` seconds until ``stopping`` is set.

        The route consumers keep the events meanwhile; the worker that registered a wait routes
        its name from the start, so this only spreads the routing work.
        """
        while not stopping.is_set():
            await asyncio.sleep(every)
            try:
                await self.discover()
            except MeshflowError as exc:
                log.warning("could not look for new routes", error=str(exc))

    # --- the worker's side: a run suspends on a wait ------------------------------------------
    async def open_wait(self, record: RunRecord, item: Pending) -> StepMemo | None:
        """Register the wait ``item`` of a run being suspended, unless an event in its window
        already satisfies it; return the wait's memo when it is resolved."""
        trigger = record.events[0] if record.events else None
        for spec in item.waits:
            await self.ensure_route(spec.event)
        memo, positions = await self._scan(record, item, trigger, None)
        if memo is not None:
            return memo
        await self._register(record, item, trigger)
        memo, _ = await self._scan(record, item, trigger, positions)
        return memo

    # --- cancel_on: waiters that cancel the run ----------------------------------------------
    def _cancel_items(self, fn: Function, record: RunRecord) -> list[Pending]:
        trigger = msgspec.to_builtins(record.events[0]) if record.events else {}
        items = []
        for i, spec in enumerate(fn.cancel_on):
            wait = WaitSpec(
                event=spec.event,
                match=spec.match,
                match_token=match_token(trigger, spec.match) if spec.match is not None else None,
                if_=spec.if_,
                floor_seq=record.seq,
                floor_time=0 if record.seq else record.created_at,
            )
            until = record.created_at + spec.timeout_ms if spec.timeout_ms is not None else NEVER
            items.append(
                Pending(
                    kind=PendingKind.WAIT,
                    key=f"cancel{i}",
                    until=until,
                    since=record.created_at,
                    waits=[wait],
                )
            )
        return items

    async def open_cancels(self, fn: Function, record: RunRecord) -> str | None:
        """Register a new run's ``cancel_on`` waiters; the reason if an event already cancels it."""
        trigger = record.events[0] if record.events else None
        for item in self._cancel_items(fn, record):
            await self.ensure_route(item.waits[0].event)
            await self._register(record, item, trigger, kind="cancel")
            found, _ = await self._first_match(item.waits[0], trigger, item.waits[0].floor_seq)
            if found is not None:
                return f"cancelled by a {item.waits[0].event} event (cancel_on)"
        return None

    async def forget_cancels(self, fn: Function, record: RunRecord) -> None:
        for item in self._cancel_items(fn, record):
            await self.forget(record.id, item)

    async def forget(self, run_id: str, item: Pending) -> None:
        """Drop a wait's entries (resolved or timed out); best effort, they expire anyway."""
        keys = [k for k in waiter_keys(self.names, run_id, item.key, item.waits) if k]
        await self.store.drop_waits(keys)

    async def _register(
        self, record: RunRecord, item: Pending, trigger: Event | None, *, kind: str = "wait"
    ) -> None:
        keys = waiter_keys(self.names, record.id, item.key, item.waits)
        live = [k for k in keys if k]
        ttl = max(1, (item.until - now_ms()) // 1000 + _WAITER_GRACE_S) if item.until < NEVER else None
        writes: list[tuple[str, bytes, int | None]] = []
        for spec, key in zip(item.waits, keys, strict=True):
            if key is None:
                continue  # a match on a value the trigger lacks: only the timeout can end it
            waiter = Waiter(
                run_id=record.id,
                app=record.app,
                fn=record.fn,
                key=item.key,
                step_id=item.step_id,
                since=item.since,
                until=item.until,
                spec=spec,
                trigger=trigger if spec.if_ else None,
                keys=live,
                kind=kind,
            )
            writes.append((key, encode_waiter(waiter), ttl))
            if spec.match is not None:  # tells the router to look up this field for this name
                marker = self.names.wait_field_key(name_token(spec.event), field_token(spec.match))
                writes.append((marker, spec.match.encode(), None))
        await self.store.put_waits(writes)

    async def _scan(
        self, record: RunRecord, item: Pending, trigger: Event | None, start: list[int] | None
    ) -> tuple[StepMemo | None, list[int]]:
        """Read the events in each spec's window (from ``start``, the sequences reached by a
        previous read); commit the earliest acceptable one. Returns the memo and where each
        spec's read stopped."""
        best: tuple[int, bytes] | None = None
        positions: list[int] = []
        for i, spec in enumerate(item.waits):
            after = start[i] if start is not None else spec.floor_seq
            found, after = await self._first_match(spec, trigger, after)
            positions.append(after)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        if best is None:
            return None, positions
        seq, raw = best
        return await self._commit(record.id, item.key, item.step_id, item.since, raw, seq), positions

    async def _first_match(
        self, spec: WaitSpec, trigger: Event | None, after: int
    ) -> tuple[tuple[int, bytes] | None, int]:
        subject = self.names.event_subject(spec.event)
        while True:
            if after > 0:
                page = await self.store.read_events(subject, after_seq=after, limit=_SCAN_BATCH)
            else:
                page = await self.store.read_events(subject, since_ms=spec.floor_time, limit=_SCAN_BATCH)
            for seq, stored_ms, raw in page:
                after = seq
                if seq == spec.not_seq:
                    continue
                try:
                    event = self._decode(raw, seq, stored_ms)
                except msgspec.DecodeError:
                    continue
                if accepts(spec, trigger, event):
                    return (seq, encode_event(event)), after
            if len(page) < _SCAN_BATCH:
                return None, after

    async def _commit(
        self, run_id: str, key: str, step_id: str, since: int, raw: bytes, seq: int
    ) -> StepMemo:
        memo = StepMemo(
            id=step_id,
            hash=key,
            kind=StepKind.WAIT,
            status=StepStatus.COMPLETED,
            output=msgspec.Raw(raw),
            started_at=since,
            ended_at=now_ms(),
            seq=seq,
        )
        return await self.store.commit_memo(run_id, memo)

    # --- the router consumer's side: an event arrives -----------------------------------------
    def _decode(self, raw: bytes, seq: int, stored_ms: int) -> Event:
        return decode_stored_event(raw, stream=self.names.events_stream, seq=seq, stored_ms=stored_ms)

    async def route(self, raw: bytes, seq: int, stored_ms: int) -> int:
        """Resume every run waiting for this event; returns how many it resumed."""
        try:
            event = self._decode(raw, seq, stored_ms)
        except msgspec.DecodeError:
            return 0
        raw = encode_event(event)  # what a wait takes: with the id and ts it was given here
        ntok = name_token(event.name)
        names = self.names
        found = await self.store.find_waits([names.wait_fields(ntok), names.wait_scans(ntok)])
        marker_prefix = names.wait_field_key(ntok, "")
        waiters = [v for k, v in found.items() if not k.startswith(marker_prefix)]
        fields = [v.decode() for k, v in found.items() if k.startswith(marker_prefix)]
        if fields:
            as_dict = msgspec.to_builtins(event)
            patterns = []
            for path in fields:
                token = match_token(as_dict, path)
                if token is not None:
                    patterns.append(names.wait_matches(ntok, field_token(path), token))
            if patterns:
                waiters.extend((await self.store.find_waits(patterns)).values())
        resumed = 0
        for data in waiters:
            try:
                waiter = decode_waiter(data)
            except msgspec.DecodeError:
                log.warning("undecodable waiter skipped")
                continue
            if in_window(waiter.spec, seq, stored_ms) and accepts(waiter.spec, waiter.trigger, event):
                resumed += await self._resolve(waiter, raw, seq)
        return resumed

    async def _resolve(self, waiter: Waiter, raw: bytes, seq: int) -> int:
        if waiter.kind == "cancel":
            reason = f"cancelled by a {waiter.spec.event} event (cancel_on)"
            try:
                cancelled = await request_cancel(self.store, self.bus, waiter.run_id, reason)
            except RunNotFoundError:
                cancelled = False
            await self.store.drop_waits(waiter.keys)
            return int(cancelled)
        stored = await self._commit(waiter.run_id, waiter.key, waiter.step_id, waiter.since, raw, seq)
        won = stored.seq == seq
        if won:  # also after a redelivery of this event: the message id dedupes
            wake = RunMessage(run_id=waiter.run_id, reason="event", key=waiter.key)
            await self.bus.publish_run(
                waiter.app, waiter.fn, wake, msg_id=event_wake_id(waiter.run_id, waiter.key)
            )
        await self.store.drop_waits(waiter.keys)
        return int(won)
