"""The client: send events and read runs, from any service.

    async with meshflow.connect("nats://127.0.0.1:4222") as client:
        ids = await client.send(meshflow.Event(name="user/signup", data={"email": "a@b.c"}))
        run = await client.wait_for_run(process_signup.run_id_for(ids[0]))

``send`` returns after the server has stored every event (PubAck), so an acknowledged event is
never lost; sending the same id again starts no second run.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

import msgspec

from . import control, tracing
from .bus import Bus, Following
from .codec import decode_value
from .connection import NatsAuth, open_nats
from .cron import parse_cron
from .durations import epoch_ms, from_ms, now_ms
from .errors import MeshflowError, RunNotFoundError, RunTimeoutError
from .events import (
    Event,
    check_event_size,
    decode_event,
    decode_stored_event,
    encode_event,
    event_limit,
    validate_event_name,
)
from .ids import is_ulid, run_id_for, ulid_time_ms
from .logs import LogRecord, capped, decode_record, follow
from .names import DEFAULT_NAMESPACE, HDR_MSG_ID, Names
from .provision import RUN_LOG_CAP
from .requests import NATS_ERRORS
from .runs import (
    NEVER,
    Attempt,
    ErrorInfo,
    Pending,
    PendingKind,
    RunRecord,
    RunStatus,
    StepMemo,
)
from .store import FunctionInfo, Store, WorkerInfo


class StepInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a run, as the client reports it.

    ``input`` is what a ``step.run`` step was given: the list of its arguments as JSON data
    (None: it had none, or the step is not a ``step.run``). Arguments that are not JSON, or over
    64 KiB of it, are not kept: ``input`` is then a string saying why, like ``"<not JSON:
    TypeError: cannot encode a value of type builtins.object>"`` or ``"<not stored: 70,123 bytes
    of JSON, over the 64 KiB limit>"`` (also ``"<not stored: ... no room ...>"`` when the input
    would not fit beside the step's result or in its run's record); the step ran all the same.
    A step still retrying shows the input of its last attempt.
    """

    id: str
    kind: str
    status: str  # completed | failed | sleeping | retrying | waiting
    attempts: int
    started_at: int | None = None
    ended_at: int | None = None
    output: Any = None
    error: ErrorInfo | None = None
    until: int | None = None  # for a pending step: when it resumes or times out (epoch ms)
    waits_for: list[str] = msgspec.field(default_factory=list)  # a waiting step: the event names
    child_run_id: str | None = None  # an invoke step: the run it started
    # Every attempt, oldest first: when, on which worker, and its error (the last 50; only the
    # last 5 with their tracebacks). A step still retrying shows the attempts so far.
    history: list[Attempt] = msgspec.field(default_factory=list)
    input: Any = None


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """A run's state: status, output or error, and its steps (committed and pending)."""

    id: str
    function_id: str
    status: RunStatus
    events: list[Event]
    attempt: int
    created_at: int
    started_at: int | None
    ended_at: int | None
    output: Any
    error: ErrorInfo | None
    pending: list[Pending]
    steps: list[StepInfo]
    parent_id: str | None = None  # an invoked run: the run whose step invoked it
    replay_of: str | None = None  # a replayed run: the run it replays
    updated_at: int = 0
    history: list[Attempt] = msgspec.field(default_factory=list)  # the function's failed attempts

    @property
    def finished(self) -> bool:
        return self.status.terminal


_PENDING_VIEW = {
    PendingKind.SLEEP: ("sleep", "sleeping"),
    PendingKind.STEP_RETRY: ("run", "retrying"),
    PendingKind.RUN_RETRY: ("run", "retrying"),
    PendingKind.WAIT: ("wait", "waiting"),
    PendingKind.INVOKE: ("invoke", "waiting"),
}


def _steps(
    memos: dict[str, StepMemo],
    pending: list[Pending] | None = None,
    step_history: dict[str, list[Attempt]] | None = None,
) -> list[StepInfo]:
    tried = step_history or {}
    out = [
        StepInfo(
            id=m.id,
            kind=str(m.kind),
            status=str(m.status),
            attempts=m.attempts,
            started_at=m.started_at,
            ended_at=m.ended_at,
            output=decode_value(m.output),
            error=m.error,
            child_run_id=m.child,
            history=m.history or [_only_attempt(m)],
            input=decode_value(m.input),
        )
        for m in memos.values()
    ]
    for p in pending or []:
        if p.key in memos or p.kind == "run_retry":
            continue
        kind, status = _PENDING_VIEW[p.kind]
        out.append(
            StepInfo(
                id=p.step_id,
                kind=kind,
                status=status,
                attempts=p.attempt,
                started_at=p.since or None,
                until=p.until if p.until < NEVER else None,
                error=p.error,
                waits_for=[w.event for w in p.waits],
                child_run_id=p.invoke.run_id if p.invoke else None,
                history=tried.get(p.key, []),
                input=p.input,
            )
        )
    # In execution order: by start, then by end (a step still pending ends last); steps within
    # the same millisecond keep the order they were committed in (memos load in stream order).
    return sorted(out, key=lambda s: (s.started_at or 0, s.ended_at or 2**63))


def _only_attempt(memo: StepMemo) -> Attempt:
    """The one attempt of a step that needed one (its memo says when and where it ran)."""
    return Attempt(
        attempt=memo.attempts,
        started_at=memo.started_at,
        ended_at=memo.ended_at,
        worker=memo.worker,
        error=memo.error,
    )


class Client:
    """Sends events and reads runs. Get one with ``meshflow.connect(url)``."""

    def __init__(
        self, bus: Bus, store: Store, *, owns_connection: bool = True, read_only: bool = False
    ) -> None:
        self._bus = bus
        self._store = store
        self._owns = owns_connection
        self._read_only = read_only

    @property
    def names(self) -> Names:
        return self._bus.names

    async def send(self, events: Event | Sequence[Event]) -> list[str]:
        """Publish one event or several (pipelined); return their ids once all are stored.

        Every event is validated and encoded before anything is published, so a bad one (bad
        name, non-JSON data, over the server's max payload) raises `EventError` and sends none.
        """
        batch = [events] if isinstance(events, Event) else list(events)
        limit = event_limit(self._bus.max_payload)
        encoded: list[tuple[str, bytes]] = []
        for event in batch:
            payload = encode_event(event)
            check_event_size(event, len(payload), limit)
            encoded.append((self.names.event_subject(event.name), payload))
        # the current trace context goes with every event: the runs they start join it
        with tracing.sending([subject for subject, _ in encoded]) as trace:
            items: list[tuple[str, bytes, dict[str, str] | None]] = [
                (subject, payload, {HDR_MSG_ID: event.id, **trace})
                for (subject, payload), event in zip(encoded, batch, strict=True)
            ]
            await self._bus.publish_many(items)
        return [e.id for e in batch]

    async def get_run(self, run_id: str) -> Run:
        """A run with its steps; `RunNotFoundError` if there is none with this id."""
        got = await self._store.get_run(run_id)
        if got is None:
            raise RunNotFoundError(f"no run with id {run_id!r} in namespace {self.names.ns!r}")
        return await self._view(got[0])

    async def _view(self, record: RunRecord, *, steps: bool = True) -> Run:
        memos = await self._store.load_memos(record.id) if steps else {}
        return Run(
            id=record.id,
            function_id=record.function,
            status=record.status,
            events=record.events,
            attempt=record.attempt,
            created_at=record.created_at,
            started_at=record.started_at,
            ended_at=record.ended_at,
            output=decode_value(record.output),
            error=record.error,
            pending=record.pending,
            steps=_steps(memos, record.pending, record.step_history),
            parent_id=record.parent.run_id if record.parent else None,
            replay_of=record.replay_of,
            updated_at=record.updated_at,
            history=record.history,
        )

    async def wait_for_run(
        self,
        run_id: str,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - the API is 'wait up to N s'
        steps: bool = True,
        until: RunStatus | None = None,
    ) -> Run:
        """Wait until the run exists and reaches a terminal status, then return it.

        Args:
            run_id: the run (``fn.run_id_for(event)`` gives it right after sending).
            timeout: seconds to wait at most.
            steps: also read the run's steps (one more read); ``False`` when only the status,
                output or error matter, and ``Run.steps`` is then empty.
            until: return as soon as the run has this status (say ``RunStatus.WAITING``), or
                when it ends.

        Raises:
            RunTimeoutError: it did not finish within ``timeout`` seconds.
        """

        async def finished() -> RunRecord:
            async with contextlib.aclosing(self._store.watch_run(run_id)) as records:
                async for record in records:
                    if record.status.terminal or record.status == until:
                        return record
            raise RunNotFoundError(run_id)  # the watch never ends on its own

        try:
            record = await asyncio.wait_for(finished(), timeout)
        except TimeoutError:
            got = await self._store.get_run(run_id)
            status = got[0].status if got else "not created"
            raise RunTimeoutError(
                f"run {run_id} did not finish within {timeout}s (status: {status})"
            ) from None
        return await self._view(record, steps=steps)

    async def cancel(self, run_id: str, *, reason: str = "cancelled by the API") -> bool:
        """Cancel a run: it stops before its next step (a running step finishes and is kept), its
        timers and waits are dropped, it ends ``cancelled`` and ``meshflow/function.cancelled`` is
        emitted. Returns False if the run had already ended.

        Raises:
            RunNotFoundError: no such run.
        """
        if self._read_only:
            return (await control.ask(self._bus, "cancel", run_id, reason)).cancelled
        return await control.request_cancel(self._store, self._bus, run_id, reason)

    async def cancel_runs(
        self, function_id: str, *, since: dt.datetime | None = None, until: dt.datetime | None = None
    ) -> list[str]:
        """Cancel every unfinished run of a function (``"{app}-{fn}"``) created in [since, until).

        Reads every run record of the namespace: an admin operation, not a hot path.
        Returns the ids of the runs asked to stop.
        """
        low = epoch_ms(since) if since is not None else 0
        high = epoch_ms(until) if until is not None else 2**62
        cancelled = []
        async for record in self._store.iter_runs():
            if record.function != function_id or record.status.terminal:
                continue
            if low <= record.created_at < high and await self.cancel(record.id, reason="cancelled in bulk"):
                cancelled.append(record.id)
        return cancelled

    async def replay(self, run_id: str) -> str:
        """Start a new run of the same function with the same event(s); returns its id.

        The new run records which run it replays (``Run.replay_of``); it starts from scratch.

        Raises:
            RunNotFoundError: no such run.
        """
        if self._read_only:
            return (await control.ask(self._bus, "replay", run_id)).run_id
        return await control.replay_run(self._store, self._bus, run_id)

    async def functions(self) -> list[FunctionInfo]:
        """Every function a worker has registered in this namespace, with its triggers."""
        return sorted(await self._store.list_functions(), key=lambda f: f.full_id)

    async def next_ticks(self, function_id: str, *, after: dt.datetime | None = None) -> list[dt.datetime]:
        """When each cron trigger of a function fires next (UTC), after ``after`` (default now)."""
        info = await self._store.get_function(function_id)
        if info is None:
            raise MeshflowError(f"no worker has registered function {function_id!r}")
        start = epoch_ms(after) if after is not None else now_ms()
        crons = [parse_cron(c, what=f"function {function_id!r}") for c in info.crons]
        return [from_ms(c.next_after(start)) for c in crons]

    async def list_runs(
        self,
        *,
        before: int | None = None,
        limit: int = 50,
        status: RunStatus | None = None,
        function_id: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        budget: int = 20_000,
    ) -> tuple[list[Run], int | None]:
        """Runs without their steps, newest first by creation (with a ``status``: by when they
        took it); and a cursor for the next page (None: no older ones).

        ``since`` and ``until`` bound when the runs were created. Pages come from the runs
        index (``meshflow.runindex``), which the server filters: a rare filter costs a few
        reads, like the first page. A call stops reading once about ``budget`` sequences of the
        index are read, so a page may come back short, with a cursor to go on; never a scan of
        every run. Before the index is whole (a deployment from before it, until its first
        sweep) pages read the run records, most recently updated first, ``budget`` at most.
        """
        low = epoch_ms(since) if since is not None else 0
        high = epoch_ms(until) if until is not None else 2**62
        records, cursor = await self._store.index.page(
            status=status,
            function=function_id,
            since=low,
            until=high,
            before=before,
            want=limit,
            budget=budget,
            read=self._store.get_runs,
        )
        return [await self._view(record, steps=False) for record in records], cursor

    async def list_events(
        self, *, before: int | None = None, limit: int = 50, name: str | None = None
    ) -> tuple[list[tuple[int, Event]], int | None]:
        """Events, newest first, with their stream sequence; and a cursor for the next page."""
        if name is not None:
            validate_event_name(name)
        subject = self.names.event_subject(name) if name else self.names.events_subjects
        found, cursor = await self._store.streams.newest(
            self.names.events_stream, subject, before=before, want=limit, budget=max(limit * 4, 1000)
        )
        return [(seq, self._stored_event(data, seq, at)) for seq, data, at in found], cursor

    async def get_event(self, seq: int) -> Event | None:
        """The event stored at this sequence of the events stream, or None."""
        found, _ = await self._store.streams.newest(
            self.names.events_stream, self.names.events_subjects, before=seq + 1, want=1, budget=1
        )
        if not found or found[0][0] != seq:
            return None
        return self._stored_event(found[0][1], seq, found[0][2])

    def _stored_event(self, data: bytes, seq: int, stored_ms: int) -> Event:
        return decode_stored_event(data, stream=self.names.events_stream, seq=seq, stored_ms=stored_ms)

    async def workers(self) -> list[WorkerInfo]:
        """The workers running now (each announces itself every 10 s)."""
        return sorted(await self._store.list_workers(), key=lambda w: w.id)

    async def backlog(self, function_id: str) -> dict[str, tuple[int, int]]:
        """For a function's consumers ("events", "runs"): messages waiting to be delivered and
        messages delivered but not yet acknowledged."""
        info = await self._store.get_function(function_id)
        if info is None:
            raise MeshflowError(f"no worker has registered function {function_id!r}")
        n = self.names
        out: dict[str, tuple[int, int]] = {}
        for label, stream, consumer in (
            ("events", n.events_stream, n.trigger_consumer(info.app, info.id)),
            ("runs", n.runs_stream, n.run_consumer(info.app, info.id)),
        ):
            state = await self._store.streams.consumer_backlog(stream, consumer)
            if state is not None:
                out[label] = state
        return out

    async def events_handled(self, function_id: str) -> int:
        """How many events a function's trigger consumer has handled since it was created (each
        started a run, or was turned away by its trigger's ``if_`` or flow control)."""
        info = await self._store.get_function(function_id)
        if info is None or not info.triggers:
            return 0
        done = await self._store.streams.consumer_done(
            self.names.events_stream, self.names.trigger_consumer(info.app, info.id)
        )
        return done or 0

    async def follow_events(self, name: str) -> AsyncGenerator[Event, None]:
        """The events named ``name`` sent from the moment this returns (its subscription is
        made before it returns, so nothing sent afterwards is missed)."""
        following = await self._bus.follow(self.names.event_subject(name))
        return self._events_of(following, name)

    async def follow_starts(self) -> AsyncGenerator[str, None]:
        """The function id of every run that starts from the moment this returns (best effort:
        workers announce starts with core messages, missed while disconnected)."""
        following = await self._bus.follow(self.names.started_subjects)
        return self._function_ids(following)

    @staticmethod
    async def _function_ids(following: Following) -> AsyncGenerator[str, None]:
        try:
            async for data in following:
                yield data.decode(errors="replace")
        finally:
            await following.close()

    @staticmethod
    async def _events_of(following: Following, name: str) -> AsyncGenerator[Event, None]:
        try:
            async for data in following:
                with contextlib.suppress(msgspec.DecodeError):
                    event = decode_event(data)
                    if event.name == name:
                        yield event
        finally:
            await following.close()

    async def logs(self, run_id: str) -> list[LogRecord]:
        """What the run logged (``ctx.logger``, and captured stdlib records), in order; marker
        records (``LogRecord.marker``) say where some are missing and why. `RunNotFoundError`
        if there is no such run and nothing it logged."""
        records = [decode_record(data, seq) for seq, data in await self._read_logs(run_id)]
        if not records and await self._store.get_run(run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id!r} in namespace {self.names.ns!r}")
        return capped(records, run_id, RUN_LOG_CAP)

    async def follow_logs(self, run_id: str, *, poll: float = 1.0) -> AsyncGenerator[LogRecord, None]:
        """What the run has logged, then what it logs from now on, as it is logged; ends once
        the run has ended and everything it logged is read. `RunNotFoundError` if there is no
        such run."""
        await self.get_run(run_id)  # it exists (a typo would be followed forever)

        async def ended() -> bool:
            got = await self._store.get_run(run_id)
            return got is None or got[0].status.terminal

        following = await self._bus.follow(self.names.log_subject(run_id))
        try:
            async with contextlib.aclosing(
                follow(aiter(following), lambda: self._read_logs(run_id), ended, poll=poll)
            ) as records:
                async for record in records:
                    yield record
        finally:
            await following.close()

    async def _read_logs(self, run_id: str) -> list[tuple[int, bytes]]:
        return await self._store.streams.oldest(self.names.logs_stream, self.names.log_subject(run_id))

    async def step_memos(self, run_id: str) -> list[StepInfo]:
        """A run's committed steps (no pending ones), in execution order."""
        return _steps(await self._store.load_memos(run_id))

    async def watch_run(self, run_id: str) -> AsyncGenerator[Run, None]:
        """Yield the run (without steps) now and each time its record changes."""
        async with contextlib.aclosing(self._store.watch_run(run_id)) as records:
            async for record in records:
                yield await self._view(record, steps=False)

    async def runs_for_event(self, event_id: str) -> list[Run]:
        """The runs one event started, one per function it triggered (as far as they exist yet)."""
        functions = await self._store.list_functions()
        ts = ulid_time_ms(event_id) if is_ulid(event_id) else 0
        runs = []
        for info in functions:
            got = await self._store.get_run(run_id_for(info.full_id, event_id, ts))
            if got is not None:
                runs.append(await self._view(got[0]))
        return runs

    async def close(self) -> None:
        if self._owns:
            with contextlib.suppress(*NATS_ERRORS):
                await self._bus.nc.flush(timeout=5)
            with contextlib.suppress(*NATS_ERRORS):
                await self._bus.nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


#: How long a client keeps trying a server that is not up, by default (a worker: 30 s).
CLIENT_CONNECT_WAIT = 5.0


class connect:
    """Connect a `Client` to NATS: ``async with connect(url) as c`` or ``c = await connect(url)``.

    Args:
        servers: one NATS URL or several (a cluster).
        namespace: the deployment's namespace (default ``mf``).
        auth: credentials and TLS for NATS (`NatsAuth`).
        replicas: replicas of the streams and buckets; existing ones are changed to this count.
            Default: 3 on a cluster of three or more servers, else 1, for those it creates
            (a worker warns about existing ones with fewer; a client does not look).
        provision: create missing streams and buckets. ``False`` for identities that may only
            send events (a publisher): the client then touches nothing but the events it sends.
        read_only: the client writes no run state itself: `Client.cancel` and `Client.replay`
            are carried out by a worker (for identities that may only read state, like the
            dashboard's; they then need a running worker).
        wait: seconds to keep trying a server that is not up yet before `NatsError` says what
            is wrong (nothing listening, a name that does not resolve...).
    """

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        namespace: str = DEFAULT_NAMESPACE,
        auth: NatsAuth | None = None,
        replicas: int | None = None,
        provision: bool = True,
        read_only: bool = False,
        wait: float = CLIENT_CONNECT_WAIT,
    ) -> None:
        self._servers = servers
        self._wait = wait
        self._provision = provision
        self._read_only = read_only
        self._names = Names(namespace)
        self._auth = auth
        self._replicas = replicas
        self._client: Client | None = None

    async def _open(self) -> Client:
        nc = await open_nats(self._servers, name="meshflow-client", auth=self._auth, wait=self._wait)
        bus = Bus(nc, self._names)
        store = Store(nc, self._names, bus.requests)
        if self._provision:
            await store.provision(bus, self._replicas)
        self._client = Client(bus, store, read_only=self._read_only)
        return self._client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
