"""The worker: pulls events and runs for its functions and advances runs with the replay engine.

Per function it binds two durable consumers: ``fn-{app}-{fn}`` on the events stream (fan-out: a
trigger claims one run per event) and ``run-{app}-{fn}`` on the runs stream (advance a run).

Advancing a run (DESIGN §3): take the run's lease with a compare-and-set on its record, load its
memos, replay, then turn the outcome into writes *before* acking the message:
timers first (a crash then only lengthens a sleep), then emitted events (so a redelivery
re-emits with the same dedupe id), then the run record. A message whose run is leased by another
live worker is nak'ed with a short delay; a lease that is not renewed expires with ``ACK_WAIT``.

In-flight work is bounded by ``concurrency``; suspended runs hold nothing here (local timers
for near deadlines aside, see ``timers``).

It is one module, over the usual size, because claiming, leasing, advancing and writing a run's
outcome share one set of ordering rules (what is written before which ack); split across files
they would be harder to check together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog

from . import control, replay
from .bus import ACK_WAIT, Bus, RunMessage, check_durability, decode_run_message, open_nats
from .connection import NatsAuth
from .durations import epoch_ms, now_ms
from .errors import MeshflowError, NatsError
from .events import Event, encode_event
from .flow.slots import Slot, Slots, StepSlots
from .flow.starts import Starts
from .flow.windows import Windows
from .functions import App, Function
from .ids import new_ulid
from .lifecycle import Lifecycle
from .names import HDR_MSG_ID, Names
from .requests import NATS_ERRORS
from .router import Router
from .runs import (
    NEVER,
    NULL,
    ErrorInfo,
    Lease,
    Pending,
    PendingKind,
    RunRecord,
    RunStatus,
    StepMemo,
    finished_events,
)
from .store import FunctionInfo, RunConflict, Store, WorkerInfo
from .timers import LocalTimers, WarmRun
from .triggers import Holder, Triggers, cron_key

_FETCH_TIMEOUT = 1.0
_MAX_FETCH = 64
_TIMEOUT_KEYS = frozenset({"timeout", "start-timeout"})
_DISCOVER_EVERY = 5.0
_ANNOUNCE_EVERY = 10.0
_ANNOUNCE_TTL_S = 30

log = structlog.get_logger("meshflow.worker")


class _StoreEffects:
    """The engine's effects: committing memos to the steps bucket, sending events."""

    def __init__(self, store: Store, bus: Bus, run_id: str, memos: dict[str, StepMemo]) -> None:
        self.store = store
        self.bus = bus
        self.run_id = run_id
        self.memos = dict(memos)  # what is committed now: the pass's memos plus its commits

    async def commit(self, memo: StepMemo) -> StepMemo:
        stored = await self.store.commit_memo(self.run_id, memo)
        self.memos[stored.hash] = stored
        return stored

    async def send(self, events: Sequence[Event], msg_ids: Sequence[str]) -> None:
        subject = self.bus.names.event_subject
        await self.bus.publish_many(
            [
                (subject(e.name), encode_event(e), {HDR_MSG_ID: m})
                for e, m in zip(events, msg_ids, strict=True)
            ]
        )


class Worker(Triggers):
    """Serves the functions of one or more apps.

    Args:
        *apps: the apps whose functions this worker runs.
        nats: the NATS server URL (or several, for a cluster).
        namespace: the deployment's namespace (default ``mf``).
        concurrency: how many events and runs it works on at once.
        worker_id: a name for this worker (default: host, pid and a random suffix).
        ack_wait: seconds before a message (and a run lease) held by a silent worker is handed to
            another one; how fast work moves on after a worker dies. The function's consumers take
            the value of the worker that last provisioned them.
        auth: credentials and TLS for NATS (`NatsAuth`).
        replicas: replicas of the streams and buckets; existing ones are changed to this count.
            Default: 3 on a cluster of three or more servers, else 1, for those it creates
            (existing ones are left as they are, with a warning when they have fewer).
        monitor: the server's monitoring URL (``http://host:8222``), to check at start that it
            syncs every write (the system account, if the worker's user has it, works too).
    """

    def __init__(
        self,
        *apps: App,
        nats: str | Sequence[str] = "nats://127.0.0.1:4222",
        namespace: str = "mf",
        concurrency: int = 64,
        worker_id: str | None = None,
        ack_wait: float = ACK_WAIT,
        auth: NatsAuth | None = None,
        replicas: int | None = None,
        monitor: str | None = None,
    ) -> None:
        if not apps:
            raise MeshflowError("a worker needs at least one App")
        self.functions: dict[str, Function] = {}
        for app in apps:
            for fn in app.functions:
                if fn.full_id in self.functions:
                    raise MeshflowError(f"function {fn.full_id} is served twice by this worker")
                self.functions[fn.full_id] = fn
        self.servers = nats
        self.auth = auth
        self.replicas = replicas
        self.monitor = monitor
        self.names = Names(namespace)
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.lease_ms = int(ack_wait * 1000)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_ulid()[-6:]}"
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._timers = LocalTimers()
        # Runs this worker is advancing now. The lease keeps other workers out; this keeps out a
        # second message for the same run here (a timer's twin, two parallel sleeps waking).
        self._active: set[str] = set()
        # Runs of ours asked to stop (core message): the engine checks before each new step.
        self._cancel_signals: set[str] = set()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self.nc: Any = None
        self._started_at = 0
        self._control: Any = None  # the subscription serving control requests (`control.serve`)
        self.bus: Bus
        self.store: Store

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, provision streams, buckets and consumers, and start pulling."""
        self.nc = await open_nats(self.servers, name=f"meshflow-worker-{self.id}", auth=self.auth)
        self.bus = Bus(self.nc, self.names)
        self.store = Store(self.nc, self.names, self.bus.requests)
        self.router = Router(self.store, self.bus, self.names, self._follow_route, ack_wait=self.ack_wait)
        self.life = Lifecycle(self.store, self.bus, self.router, self.functions)
        self.starts = Starts(self.store)
        self.windows = Windows(self.store, self.bus)
        self.slots = Slots(self.store, self.bus, self.lease_ms)
        await self.store.provision(self.bus, self.replicas, audit=True)
        for fn in self.functions.values():
            await self.bus.ensure_consumers(fn, ack_wait=self.ack_wait)
            await self.store.put_function(
                FunctionInfo(
                    full_id=fn.full_id,
                    app=fn.app_id,
                    id=fn.id,
                    name=fn.name,
                    triggers=list(fn.triggers),
                    retries=fn.retry.retries,
                    failure_of=fn.failure_of,
                    updated_at=now_ms(),
                    crons=[c.source for c in fn.crons],
                    filters={p: e.source for p, e in fn.filters if e is not None},
                    cancel_on=[c.event for c in fn.cancel_on],
                    idempotency=fn.idempotency.source if fn.idempotency else None,
                    start_timeout_ms=fn.start_timeout_ms,
                    finish_timeout_ms=fn.finish_timeout_ms,
                    flow=fn.flow.describe(),
                )
            )
        n = self.names
        for fn in self.functions.values():
            if fn.triggers:  # a function with cron triggers only has no events consumer
                triggers = await self.bus.pull(n.events_stream, n.trigger_consumer(fn.app_id, fn.id))
                on_event = self._handler(fn, self._on_event)
                self._loops.append(asyncio.create_task(self._pull_loop(triggers, fn.full_id, on_event)))
            runs = await self.bus.pull(n.runs_stream, n.run_consumer(fn.app_id, fn.id))
            self._loops.append(
                asyncio.create_task(self._pull_loop(runs, fn.full_id, self._handler(fn, self._on_run)))
            )
        for fn in self.functions.values():
            for spec in fn.cancel_on:
                await self.router.ensure_route(spec.event)
        await self.router.discover()
        self._loops.append(asyncio.create_task(self._discover_routes()))
        self._started_at = now_ms()
        await check_durability(self.nc, self.monitor)
        await self._announce()
        self._loops.append(asyncio.create_task(self._announce_loop()))
        await self.nc.subscribe(n.cancel_subjects, cb=self._on_cancel_signal)
        self._control = await self.nc.subscribe(
            n.control_subjects, queue="meshflow-control", cb=self._on_control
        )
        for fn in self.functions.values():
            for cron in fn.crons:
                await self.bus.schedule_cron(fn, cron_key(cron), cron.next_after(now_ms()))
        log.info("worker started", worker=self.id, functions=sorted(self.functions), namespace=n.ns)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop pulling, let in-flight work finish for up to ``grace`` seconds, then disconnect.

        Work still running after ``grace`` is cancelled: its messages are not acked, so they are
        redelivered to another worker, and committed steps are never lost or re-run.
        """
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        self._stopping.set()
        if self._control is not None:  # from now on, control requests go to other workers
            with contextlib.suppress(*NATS_ERRORS):
                await self._control.unsubscribe()
        self._timers.close()  # their durable schedules remain
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            _, still = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        if self._started_at:
            with contextlib.suppress(MeshflowError):
                await self.store.drop_worker(self.id)
        if self.nc is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await self.nc.flush(timeout=5)
            with contextlib.suppress(*NATS_ERRORS):
                await self.nc.close()
        self._stopped.set()
        log.info("worker stopped", worker=self.id)

    async def serve(self) -> None:
        """Start, then run until SIGTERM or SIGINT (or `stop`), then stop gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self._stopped.wait()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- pulling ------------------------------------------------------------------------------
    @staticmethod
    def _handler(
        fn: Function, handle: Callable[[Function, Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        async def bound(msg: Any) -> None:
            await handle(fn, msg)

        return bound

    async def _pull_loop(self, sub: Any, label: str, handle: Callable[[Any], Awaitable[None]]) -> None:
        """Fetch as many messages as there are free slots and work on each in its own task.

        Slots are taken per message received, not held across the long-poll fetch: an idle
        consumer must not sit on the slots a busy one needs.
        """
        backoff = 0.05
        while not self._stopping.is_set():
            await self._slots.acquire()  # wait for one free slot, then size the batch by all free
            self._slots.release()
            want = max(1, min(_MAX_FETCH, self.concurrency - self._inflight))
            try:
                msgs = await sub.fetch(want, timeout=_FETCH_TIMEOUT)
                backoff = 0.05
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []
            except Exception as exc:  # connection lost, server restarting: keep trying
                msgs = []
                # A consumer without a leader (just created, or an election: seconds) answers
                # 503; that is routine unless it lasts.
                routine = isinstance(exc, nats.js.errors.ServiceUnavailableError) and backoff < 2.0
                (log.info if routine else log.warning)(
                    "fetch failed; retrying", consumer=label, error=repr(exc)
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            for msg in msgs:
                await self._slots.acquire()  # a few over a racing loop's share wait here, briefly
                self._inflight += 1
                task = asyncio.create_task(self._guard(label, msg, handle))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _guard(self, label: str, msg: Any, handle: Callable[[Any], Awaitable[None]]) -> None:
        try:
            await handle(msg)
        except asyncio.CancelledError:
            with contextlib.suppress(*NATS_ERRORS):
                await msg.nak()
            raise
        except Exception as exc:  # NATS trouble mid-way: leave the message for redelivery
            log.warning("message left for redelivery", consumer=label, error=repr(exc))
            with contextlib.suppress(*NATS_ERRORS):
                await msg.nak(delay=1.0)
        finally:
            self._inflight -= 1
            self._slots.release()

    # --- triggers: event -> run ---------------------------------------------------------------
    async def _on_cancel_signal(self, msg: Any) -> None:
        run_id = msg.subject.rpartition(".")[2]
        if run_id in self._active:
            self._cancel_signals.add(run_id)

    async def _on_control(self, msg: Any) -> None:
        await control.serve(self.store, self.bus, msg)

    # --- the router: events resume waits --------------------------------------------------------
    async def _follow_route(self, event_name: str, token: str) -> None:
        sub = await self.bus.pull(self.names.events_stream, self.names.route_consumer(token))
        self._loops.append(asyncio.create_task(self._pull_loop(sub, f"route {event_name}", self._on_routed)))

    async def _announce(self) -> None:
        info = WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            functions=sorted(self.functions),
            started_at=self._started_at,
            seen_at=now_ms(),
        )
        await self.store.put_worker(info, ttl_s=_ANNOUNCE_TTL_S)

    async def _announce_loop(self) -> None:
        """Keep this worker listed in the registry (for the dashboard) while it runs."""
        while not self._stopping.is_set():
            await asyncio.sleep(_ANNOUNCE_EVERY)
            try:
                await self._announce()
            except MeshflowError as exc:
                log.warning("could not announce the worker", error=str(exc))

    async def _discover_routes(self) -> None:
        """Pick up, every few seconds, the event names runs on other workers started waiting for.

        Their consumers keep the events meanwhile; the worker that registered a wait routes its
        name from the start, so this only spreads the routing work.
        """
        while not self._stopping.is_set():
            await asyncio.sleep(_DISCOVER_EVERY)
            try:
                await self.router.discover()
            except MeshflowError as exc:
                log.warning("could not look for new routes", error=str(exc))

    async def _on_routed(self, msg: Any) -> None:
        meta = msg.metadata
        await self.router.route(msg.data, meta.sequence.stream, epoch_ms(meta.timestamp))
        await msg.ack()

    # --- runs: advance ------------------------------------------------------------------------
    async def _on_run(self, fn: Function, msg: Any) -> None:
        try:
            rmsg = decode_run_message(msg.data)
        except msgspec.DecodeError as exc:
            log.error("undecodable run message dropped", function=fn.full_id, error=str(exc))
            await msg.term()
            return
        if rmsg.reason == "cron":
            await self._on_cron(fn, msg, rmsg)
            return
        await self._resume(fn, msg, await self.store.get_run(rmsg.run_id), rmsg=rmsg)

    async def _resume(
        self, fn: Function, msg: Any, got: tuple[RunRecord, int] | None, *, rmsg: RunMessage | None
    ) -> None:
        """Take the lease of an existing run and advance it, unless there is nothing to do."""
        if got is None:
            log.warning(
                "run message for an unknown run", run_id=rmsg.run_id if rmsg else None, function=fn.full_id
            )
            await msg.ack()
            return
        record, rev = got
        if record.status.terminal:
            if _redelivered(msg):  # we may have died between writing the record and emitting
                await self._emit_finished(fn, record)
            await msg.ack()
            return
        if rmsg is not None and rmsg.key in _TIMEOUT_KEYS:
            await self.life.timed_out(record, rmsg.key)
            await msg.ack()
            return
        if record.status is RunStatus.QUEUED and record.not_before > now_ms() and record.cancel is None:
            await msg.ack()  # an event with a future ts: its "start" timer starts it
            return
        if record.status.suspended and (
            rmsg is None  # a resent event for a suspended run: its timers resume it
            or (rmsg.key and all(p.key != rmsg.key for p in record.pending))
        ):
            await msg.ack()  # or a timer (event, child run) whose item was resumed already
            return
        now = now_ms()
        lease = record.lease
        held_elsewhere = lease is not None and lease.worker != self.id and lease.until > now
        if held_elsewhere or record.id in self._active:
            await msg.nak(delay=0.25)  # being advanced right now; look again shortly
            return
        await self._take(fn, msg, record, rev, rmsg)

    async def _take(
        self, fn: Function, msg: Any, record: RunRecord, rev: int, rmsg: RunMessage | None
    ) -> None:
        """Take the run's concurrency slots (if its function has any) and its lease, then advance it."""
        now = now_ms()
        slots: list[Slot] = []
        owner = ""
        if fn.flow.concurrency and record.cancel is None:
            taken = await self.slots.acquire(fn, record)
            if taken is None:  # every slot of its key is busy: it waits (never dropped)
                await msg.nak(delay=_slot_backoff(msg))
                return
            slots, owner = taken
        leased = self._leased(record, now)
        if not record.armed:  # created elsewhere (an invoke, a replay): set up its timeouts now
            leased = msgspec.structs.replace(leased, armed=True)
        try:
            rev = await self.store.update_run(leased, rev)
        except RunConflict:
            await self.slots.release(slots, owner)
            await msg.nak(delay=0.05)
            return
        if record.started_at is None:  # its first pass: a queued, invoked or replayed run starts
            await self.bus.announce_start(fn)
        if not record.armed and await self.life.arm(fn, leased, starting=True):
            await self.slots.release(slots, owner)
            await msg.ack()  # cancelled by an event already sent; the cancel message ends it
            return
        await self._advance(fn, msg, Holder(leased, rev, slots, owner), memos=None, rmsg=rmsg, before=record)

    def _leased(self, record: RunRecord, now: int) -> RunRecord:
        """``record`` running under this worker's lease, to be written by compare-and-set."""
        return msgspec.structs.replace(
            record,
            status=RunStatus.RUNNING,
            lease=Lease(worker=self.id, until=now + self.lease_ms),
            started_at=record.started_at or now,
            updated_at=now,
        )

    async def _advance(
        self,
        fn: Function,
        msg: Any,
        holder: Holder,
        *,
        memos: dict[str, StepMemo] | None,
        rmsg: RunMessage | None,
        before: RunRecord | None = None,
    ) -> None:
        """Replay the leased run, write what came of it, then ack the message."""
        record = holder.record
        if record.id in self._active:  # claimed by a pass of ours since we read it
            await msg.nak(delay=0.25)
            return
        self._active.add(record.id)
        try:
            await self._advance_leased(fn, msg, holder, memos=memos, rmsg=rmsg, before=before)
        finally:
            self._active.discard(record.id)
            self._cancel_signals.discard(record.id)
            if holder.slots:
                with contextlib.suppress(MeshflowError):  # unreleased, they expire with the lease
                    await self.slots.release(holder.slots, holder.owner)

    async def _advance_leased(
        self,
        fn: Function,
        msg: Any | None,
        holder: Holder,
        *,
        memos: dict[str, StepMemo] | None,
        rmsg: RunMessage | None,
        before: RunRecord | None,
    ) -> None:
        record = holder.record
        if memos is None:
            memos = await self.store.load_memos(record.id)
        effects = _StoreEffects(self.store, self.bus, record.id, memos)
        before = before or record
        redelivered = _redelivered(msg)
        # Waits registered and children started already; after a redelivery, do them again.
        opened = set() if redelivered else {p.key for p in before.pending}
        pending, failures, attempt = record.pending, record.step_failures, record.attempt
        if holder.slots:
            holder.step_slots = StepSlots(self.slots, fn, record, holder.owner)
        beat = asyncio.create_task(self._heartbeat(msg, holder))
        outcome: replay.Outcome = replay.Cancelled()
        try:
            while record.cancel is None:
                outcome = await replay.execute(
                    replay.Activation(
                        function=fn,
                        run_id=record.id,
                        events=record.events,
                        attempt=attempt,
                        memos=effects.memos,
                        pending=pending,
                        step_failures=failures,
                        seq=record.seq,
                        created_at=record.created_at,
                        cancelled=lambda: record.id in self._cancel_signals,
                        step_slot=holder.step_slots.executing if holder.step_slots else None,
                    ),
                    effects,
                )
                # A wait an event already satisfies, or an invoke that cannot start: go on at once.
                if not isinstance(outcome, replay.Suspended) or not await self._open(
                    fn, record, outcome.pending, opened, effects
                ):
                    break
                pending, failures, attempt = outcome.pending, outcome.step_failures, outcome.attempt
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        await self._finish(fn, holder, before, rmsg, outcome, redelivered, effects.memos)
        if msg is not None:
            await msg.ack()

    async def _open(
        self,
        fn: Function,
        record: RunRecord,
        pending: list[Pending],
        opened: set[str],
        effects: _StoreEffects,
    ) -> bool:
        """Register new waits and start new child runs; True if one of them is resolved already."""
        resolved = False
        for item in pending:
            if item.key in opened or item.kind not in (PendingKind.WAIT, PendingKind.INVOKE):
                continue
            opened.add(item.key)
            if item.kind is PendingKind.WAIT:
                memo = await self.router.open_wait(record, item)
            else:
                memo = await self.life.start_child(record, item)
            if memo is not None:
                effects.memos[memo.hash] = memo
                resolved = True
        return resolved

    async def _heartbeat(self, msg: Any | None, holder: Holder) -> None:
        """While a long pass runs: keep the message from redelivery and renew the lease."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            if msg is not None:
                with contextlib.suppress(*NATS_ERRORS):
                    await msg.in_progress()
            renewed = self._leased(holder.record, now_ms())
            if holder.slots:
                with contextlib.suppress(MeshflowError):
                    await self.slots.renew(holder.slots, holder.owner)
                    if holder.step_slots is not None:
                        await holder.step_slots.renew()
            try:
                holder.rev = await self.store.update_run(renewed, holder.rev)
                holder.record = renewed
            except RunConflict:  # written by someone else: a cancel request, most likely
                with contextlib.suppress(NatsError):
                    got = await self.store.get_run(holder.record.id)
                    if got is not None and got[0].lease is not None and got[0].lease.worker == self.id:
                        holder.record, holder.rev = got
                        if got[0].cancel is not None:
                            self._cancel_signals.add(holder.record.id)
            except NatsError:
                pass

    async def _finish(
        self,
        fn: Function,
        holder: Holder,
        before: RunRecord,
        rmsg: RunMessage | None,
        outcome: replay.Outcome,
        redelivered: bool,
        memos: dict[str, StepMemo],
    ) -> None:
        now = now_ms()
        base = holder.record
        if isinstance(outcome, replay.Suspended) and base.cancel is not None:
            outcome = replay.Cancelled()  # asked to stop while this pass ran: stop before the next step
        if isinstance(outcome, replay.Suspended):
            known = {(p.key, p.until) for p in before.pending}
            rearm = [
                item
                for item in outcome.pending
                if redelivered or (item.key, item.until) not in known or (rmsg and rmsg.key == item.key)
            ]
            rearm = [item for item in rearm if item.until < NEVER]
            for item in rearm:
                await self.bus.schedule(fn, base.id, item.key, item.until)
            kinds = {p.kind for p in outcome.pending}
            if kinds & {PendingKind.WAIT, PendingKind.INVOKE}:
                status = RunStatus.WAITING
            elif PendingKind.SLEEP in kinds:
                status = RunStatus.SLEEPING
            else:
                status = RunStatus.RETRYING
            final = msgspec.structs.replace(
                base,
                status=status,
                pending=outcome.pending,
                step_failures=outcome.step_failures,
                attempt=outcome.attempt,
                lease=None,
                updated_at=now,
            )
        else:
            if isinstance(outcome, replay.Completed):
                status, output, error = RunStatus.COMPLETED, outcome.output, None
            elif isinstance(outcome, replay.Failed):
                status, output, error = RunStatus.FAILED, NULL, outcome.error
            else:
                reason = base.cancel.reason if base.cancel else "cancelled"
                error = ErrorInfo(type="Cancelled", message=reason, retriable=False)
                status, output = RunStatus.CANCELLED, NULL
            final = msgspec.structs.replace(
                base,
                status=status,
                output=output,
                error=error,
                pending=[],
                lease=None,
                ended_at=now,
                updated_at=now,
            )
            # Both at once: a crash between them leaves the message unacked, and its redelivery
            # finds the terminal record and emits again (deduplicated by the event id).
            await asyncio.gather(self._emit_finished(fn, final), self._write_final(holder, final))
            await self.life.forget_waits(before, final, memos)
            await self.life.clean_up(fn, before, final)
            _log_outcome(final)
            return
        await self._write_final(holder, final)
        await self.life.forget_waits(before, final, memos)
        armed = [item for item in rearm if self._arm_local_timer(fn, base.id, item.key, item.until)]
        if armed and holder.record is final:
            self._timers.keep_warm(final, holder.rev, memos)
        _log_outcome(final)

    # --- local timers -------------------------------------------------------------------------
    def _arm_local_timer(self, fn: Function, run_id: str, key: str, until: int) -> bool:
        def fire() -> None:
            task = asyncio.ensure_future(self._wake(fn, run_id, key, until))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return self._timers.arm(run_id, key, until, fire)

    async def _wake(self, fn: Function, run_id: str, key: str, until: int) -> None:
        wake = RunMessage(run_id=run_id, reason="timer", key=key)
        warm = self._timers.take_warm(run_id)
        try:
            if warm is not None and await self._resume_warm(fn, warm, wake):
                return
        except MeshflowError as exc:  # NATS trouble mid-pass: the message path resumes it
            log.warning("local timer could not advance the run", run_id=run_id, error=str(exc))
        try:
            await self.bus.publish_run(fn.app_id, fn.id, wake, msg_id=f"{run_id}:{key}:{until}")
        except MeshflowError as exc:  # the durable schedule will still fire
            log.warning("local timer could not wake the run", run_id=run_id, error=str(exc))

    async def _resume_warm(self, fn: Function, warm: WarmRun, wake: RunMessage) -> bool:
        """Advance a run from the state this worker wrote when it suspended it; False to fall back.

        The lease is taken by compare-and-set on the revision we wrote, so any change since
        (another worker, a cancel) makes this decline and the wake go through the stream.
        """
        record, rev, memos = warm.record, warm.revision, warm.memos
        if record.id in self._active or fn.flow.concurrency:  # slots are taken on the message path
            return False
        leased = self._leased(record, now_ms())
        await self._slots.acquire()
        self._inflight += 1
        try:
            try:
                rev = await self.store.update_run(leased, rev)
            except (RunConflict, NatsError):
                return False
            self._active.add(record.id)
            try:
                await self._advance_leased(
                    fn, None, Holder(leased, rev), memos=memos, rmsg=wake, before=record
                )
            finally:
                self._active.discard(record.id)
                self._cancel_signals.discard(record.id)
            return True
        finally:
            self._inflight -= 1
            self._slots.release()

    async def _emit_finished(self, fn: Function, run: RunRecord) -> None:
        events = finished_events(run, handles_failures=fn.failure_of is not None)
        await self.bus.publish_many(
            [(self.names.event_subject(e.name), encode_event(e), {HDR_MSG_ID: e.id}) for e in events]
        )
        if run.parent is not None:
            await self.life.notify_parent(run)

    async def _write_final(self, holder: Holder, final: RunRecord) -> None:
        for _ in range(10):
            try:
                holder.rev = await self.store.update_run(final, holder.rev)
                holder.record = final
                return
            except RunConflict:
                got = await self.store.get_run(final.id)
                if got is None:
                    return
                current, holder.rev = got
                if current.status.terminal or (current.lease is not None and current.lease.worker != self.id):
                    return  # finished, or taken over by another worker after our lease lapsed
                if current.cancel is not None and final.cancel is None:
                    final = msgspec.structs.replace(final, cancel=current.cancel)
                    if not final.status.terminal:  # asked to stop as this pass ended: a pass to do it
                        nudge = RunMessage(run_id=final.id, reason="cancel")
                        await self.bus.publish_run(
                            final.app, final.fn, nudge, msg_id=f"{final.id}:cancel:{holder.rev}"
                        )
        raise NatsError(f"run {final.id}: could not write its record after 10 conflicting updates")


def _slot_backoff(msg: Any) -> float:
    """How long a run waiting for a concurrency slot waits before it asks again: 50 ms, doubling
    with each try to 2 s, jittered so waiting runs do not ask in lockstep."""
    tries = int(msg.metadata.num_delivered) if msg.metadata else 1
    delay: float = min(0.05 * 2 ** min(tries - 1, 6), 2.0) * (0.5 + random.random())  # noqa: S311 - jitter
    return delay


def _redelivered(msg: Any | None) -> bool:
    return bool(msg is not None and msg.metadata and msg.metadata.num_delivered > 1)


def _log_outcome(run: RunRecord) -> None:
    fields: dict[str, Any] = {"run_id": run.id, "function": run.function}
    if run.status is RunStatus.COMPLETED:
        log.info("run completed", duration_ms=(run.ended_at or 0) - (run.started_at or 0), **fields)
    elif run.status is RunStatus.FAILED:
        err = run.error
        log.warning("run failed", error=f"{err.type}: {err.message}" if err else None, **fields)
    else:
        until = min(p.until for p in run.pending) if run.pending else NEVER
        log.info(f"run {run.status}", resumes_in_ms=until - now_ms() if until < NEVER else None, **fields)
