"""Runs, step memos and the registry, kept in JetStream key-value buckets.

- ``{ns}_runs``: run records under their id; every update is compare-and-set on the revision.
- ``{ns}_steps``: step memos under ``{run_id}.{step_hash}``, written with ``create`` only, so a
  committed result never changes (first writer wins).
- ``{ns}_registry``: functions (their config) and workers, for the CLI, client and dashboard.

A run's memos are loaded with one batched direct get over ``{run_id}.>`` (server-side filtered),
not a scan of the bucket. nats-py errors never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType

from .bus import Bus, through_elections
from .durations import from_ms, now_ms, rfc3339
from .errors import NatsError, StateError
from .functions import Function
from .names import (
    HDR_EXPECTED_LAST_SUBJECT_SEQ,
    HDR_KV_OPERATION,
    HDR_ROLLUP,
    HDR_TTL,
    Names,
    kv_stream,
    kv_subject,
)
from .provision import ensure_streams, fit_replicas
from .requests import NATS_ERRORS, ApiError, Requester, retry_pauses
from .runindex import RunsIndex
from .runs import RunRecord, RunStatus, StepMemo, decode_memo, decode_run, encode_record
from .streams import Streams, stored_ms

_BATCH = 1024  # the most subjects one multi_last direct get may match


class RunConflict(Exception):
    """A run record changed since it was read (compare-and-set failed); never leaves the worker."""


class _WrongRevision(Exception):
    """A KV write's expected revision did not match (internal signal)."""


_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes
_TIMEOUT = 10.0
_ATTEMPT_TIMEOUT = 3.0

_KEY = re.compile(r"(?=.{1,256}$)[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*")  # a KV key: tokens, no empty one
_READ_ERRORS: tuple[type[BaseException], ...] = (ApiError, *NATS_ERRORS)
_WATCH_POLL_FIRST = 0.05
_WATCH_POLL_MAX = 5.0  # 10,000 waiting callers: 2,000 reads/s at most, not 10,000


class FunctionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A function as registered by a worker, for clients and the dashboard."""

    v: int = 1
    full_id: str
    app: str
    id: str
    name: str
    triggers: list[str]
    retries: int
    failure_of: str | None = None
    updated_at: int = 0
    crons: list[str] = msgspec.field(default_factory=list)  # cron triggers, as written
    filters: dict[str, str] = msgspec.field(default_factory=dict)  # trigger -> its if_
    cancel_on: list[str] = msgspec.field(default_factory=list)  # event names that cancel a run
    idempotency: str | None = None
    start_timeout_ms: int | None = None
    finish_timeout_ms: int | None = None
    flow: list[str] = msgspec.field(default_factory=list)  # flow control, one line each

    @classmethod
    def of(cls, fn: Function) -> FunctionInfo:
        """``fn`` as the registry shows it to clients and the dashboard."""
        return cls(
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


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A live worker, as it announces itself in the registry (the entry expires when it stops)."""

    v: int = 1
    id: str
    host: str
    pid: int
    functions: list[str]
    started_at: int
    seen_at: int


_info_encoder = msgspec.json.Encoder()
_info_decoder = msgspec.json.Decoder(FunctionInfo)
_worker_decoder = msgspec.json.Decoder(WorkerInfo)


class Store:
    """Reads and writes runs, step memos and the registry of one namespace."""

    def __init__(self, nc: NatsClient, names: Names, requester: Requester | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10)
        self._js_quick = nc.jetstream(timeout=2)  # for reads retried through elections
        self.names = names
        self.requests = requester or Requester(nc)
        self.streams = Streams(self.requests)  # streams read a page at a time (the dashboard)
        self.index = RunsIndex(self.requests, self.streams, names)  # runs by creation and status
        self._runs: Any = None
        self._steps: Any = None
        self._registry: Any = None
        self._waits: Any = None
        self._flow: Any = None

    async def open(self, *, create: bool = True, replicas: int = 1) -> Store:
        """Bind the buckets, creating any that are missing when ``create`` is set."""
        n = self.names
        self._runs = await self._bucket(n.runs_bucket, create, replicas)
        self._steps = await self._bucket(n.steps_bucket, create, replicas)
        self._registry = await self._bucket(n.registry_bucket, create, replicas)
        self._waits = await self._bucket(n.waits_bucket, create, replicas)
        self._flow = await self._bucket(n.flow_bucket, create, replicas)
        return self

    async def provision(
        self,
        bus: Bus,
        replicas: int | None,
        *,
        audit: bool = False,
        log_retention: dt.timedelta | None = None,
    ) -> None:
        """Create what is missing of the streams and buckets (idempotent, safe to race with
        other processes). Existing ones are brought to ``replicas`` when it is given; otherwise
        new ones get the count that fits the deployment (`Bus.default_replicas`), and with
        ``audit`` (a worker's start) existing ones with fewer are warned about. A client that
        asks for no count reads no more than it creates."""
        count = replicas or bus.default_replicas()
        await ensure_streams(bus, replicas=count, log_retention=log_retention)
        await self.open(replicas=count)
        await self._open_index()
        if replicas is None and not audit:
            return
        n = self.names
        buckets = (n.runs_bucket, n.steps_bucket, n.registry_bucket, n.waits_bucket, n.flow_bucket)
        streams = [
            n.events_stream,
            n.runs_stream,
            n.logs_stream,
            n.index_stream,
            n.live_stream,
            *(kv_stream(b) for b in buckets),
        ]
        await fit_replicas(bus, streams, count, scale=replicas is not None)

    async def _open_index(self) -> None:
        """Find out whether the runs index exists; a deployment with no runs yet has it whole."""
        try:
            await self.streams.stream_state(self.names.index_stream)
        except NatsError:
            self.index.enabled = False  # a deployment from before it, with an identity that cannot add it
            return
        if not await self.index.ready():
            runs = await self.streams.stream_state(kv_stream(self.names.runs_bucket))
            if runs.messages == 0:
                await self.index.mark_ready()

    async def _bucket(self, name: str, create: bool, replicas: int) -> Any:
        try:
            return await through_elections(f"bucket {name}", self._js_quick.key_value, name)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                raise NatsError(f"bucket {name} does not exist: start a worker first") from None
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot open bucket {name}: {exc!r}") from exc
        try:
            config = KeyValueConfig(
                bucket=name, history=1, storage=StorageType.FILE, replicas=replicas, direct=True
            )
            return await through_elections(f"create bucket {name}", self.js.create_key_value, config)
        except NATS_ERRORS as exc:
            try:  # another process may have created it at the same moment
                return await through_elections(f"bucket {name}", self._js_quick.key_value, name)
            except NATS_ERRORS:
                raise NatsError(f"cannot create bucket {name}: {exc!r}") from exc

    # --- raw KV over the fast request path ---------------------------------------------------
    async def _get(self, bucket: str, key: str, what: str) -> tuple[bytes, int, str] | None:
        stream, subject = kv_stream(bucket), kv_subject(bucket, key)
        for pause in retry_pauses():
            try:
                return await self.requests.direct_get(stream, subject, _ATTEMPT_TIMEOUT)
            except _READ_ERRORS as exc:
                if pause is None or (isinstance(exc, ApiError) and exc.code < 500):
                    raise NatsError(f"cannot read {what}: {exc!r}") from exc
                await asyncio.sleep(pause)
        raise AssertionError("unreachable: the last pause is None")

    async def _write(
        self, bucket: str, key: str, value: bytes, last: int, what: str, ttl_s: int | None = None
    ) -> int:
        """Write ``key`` if its last revision is ``last`` (0: it must not exist); `_WrongRevision` if not."""
        headers = {HDR_EXPECTED_LAST_SUBJECT_SEQ: str(last)}
        if ttl_s is not None:
            headers[HDR_TTL] = f"{ttl_s}s"
        # A stream without a leader (an election in a cluster) answers 503, or a write's ack is
        # lost with the node that stored it: retry the same conditional write for a while. If an
        # earlier attempt was stored, the retry finds the revision moved (`_WrongRevision`), and
        # the caller reads what is stored, as for any conflict.
        for pause in retry_pauses():
            try:
                ack = await self.requests.publish(kv_subject(bucket, key), value, headers, _ATTEMPT_TIMEOUT)
                return ack.seq
            except ApiError as exc:
                if exc.err_code in _WRONG_LAST_SEQUENCE:
                    raise _WrongRevision from None
                if pause is None or exc.code < 500:
                    raise NatsError(f"cannot write {what}: {exc.code} {exc.description or exc}") from exc
            except NATS_ERRORS as exc:
                if pause is None:
                    raise NatsError(f"cannot write {what}: {exc!r}") from exc
            await asyncio.sleep(pause)
        raise AssertionError("unreachable: the last pause is None")

    async def _create(self, bucket: str, key: str, value: bytes, what: str) -> int | None:
        """Create ``key``; None if it exists. A deleted key counts as absent."""
        try:
            return await self._write(bucket, key, value, 0, what)
        except _WrongRevision:
            pass
        current = await self._get(bucket, key, what)
        if current is None or not current[2]:
            return None
        try:  # the key was deleted: recreate it on top of its delete marker
            return await self._write(bucket, key, value, current[1], what)
        except _WrongRevision:
            return None

    # --- flow control -------------------------------------------------------------------------
    async def claim(self, key: str, value: str, ttl_s: int) -> str:
        """Claim ``key`` in the flow bucket for ``ttl_s`` seconds; the value of whoever holds it."""
        what = f"claim {key}"
        bucket = self.names.flow_bucket
        for _ in range(3):
            try:
                await self._write(bucket, key, value.encode(), 0, what, ttl_s)
                return value
            except _WrongRevision:
                pass
            got = await self._get(bucket, key, what)
            if got is not None and not got[2]:
                return got[0].decode()
            if got is not None:  # a deleted or purged claim: take it over
                try:
                    await self._write(bucket, key, value.encode(), got[1], what, ttl_s)
                    return value
                except _WrongRevision:
                    continue
        raise NatsError(f"{what}: it kept changing")

    async def get_flow(self, key: str) -> tuple[bytes, int] | None:
        """A flow-control state (value, revision), or None if there is none (or it expired)."""
        got = await self._get(self.names.flow_bucket, key, f"flow state {key}")
        if got is None:
            return None
        return (b"", got[1]) if got[2] else (got[0], got[1])

    async def put_flow(self, key: str, value: bytes, revision: int, ttl_s: int) -> bool:
        """Replace a flow-control state if it is still at ``revision`` (0: none); False if not."""
        try:
            await self._write(self.names.flow_bucket, key, value, revision, f"flow state {key}", ttl_s)
        except _WrongRevision:
            return False
        return True

    # --- runs ---------------------------------------------------------------------------------
    async def get_run(self, run_id: str) -> tuple[RunRecord, int] | None:
        """The run record and its revision, or None."""
        if not _KEY.fullmatch(run_id):  # not a key we could have written: it never reaches a subject
            return None
        got = await self._get(self.names.runs_bucket, run_id, f"run {run_id}")
        if got is None or got[2]:
            return None
        try:
            return decode_run(got[0]), got[1]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateError(f"the record of run {run_id} cannot be read: {exc}") from exc

    async def get_runs(self, run_ids: list[str]) -> dict[str, RunRecord]:
        """The records of these runs that exist and can be read, by id (one batched read)."""
        keys = [run_id for run_id in run_ids if _KEY.fullmatch(run_id)]
        values: dict[str, bytes] = {}
        for at in range(0, len(keys), _BATCH // 2):  # within what one multi_last may return
            values.update(await self._last_values(self.names.runs_bucket, keys[at : at + _BATCH // 2]))
        out: dict[str, RunRecord] = {}
        for data in values.values():
            try:
                record = decode_run(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # a record nobody can read is left out of lists (get_run says why)
            out[record.id] = record
        return out

    async def create_run(self, record: RunRecord) -> int | None:
        """Store a new run; None when a run with this id exists already (the claim is taken).
        Its entries in the runs index are written first."""
        await self.index.created(record)
        return await self._create(
            self.names.runs_bucket, record.id, encode_record(record), f"run {record.id}"
        )

    async def update_run(self, record: RunRecord, revision: int, *, was: RunStatus | None = None) -> int:
        """Replace the run record if it is still at ``revision``; `RunConflict` otherwise.

        ``was`` is the status of the record at ``revision`` when the caller knows it: a write
        that keeps it costs no index write (None: the status entry is written anyway).
        """
        entry = await self.index.moving(record) if was is not record.status else None
        try:
            rev = await self._write(
                self.names.runs_bucket, record.id, encode_record(record), revision, f"run {record.id}"
            )
        except _WrongRevision:
            raise RunConflict(record.id) from None
        if entry is not None:
            await self.index.moved(record, entry)
        return rev

    async def watch_run(self, run_id: str) -> AsyncGenerator[RunRecord, None]:
        """Yield the run record now (if it exists) and on every change.

        A plain subscription on the record's KV subject, not a JetStream consumer, so waiting
        for thousands of runs costs the server no consumers. Core subscribers get a write when
        the server receives it, before the stream has stored it; a write that arrives between
        our subscribing and our read can therefore reach neither. So while no update comes, the
        record is read again on a backoff (50 ms, doubling to 5 s; the later reads only cover
        writes missed while the connection was down) and yielded when it changed.
        """
        updates: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            if msg.data and not (msg.headers and msg.headers.get("KV-Operation")):
                updates.put_nowait(msg.data)

        try:
            sub = await self.nc.subscribe(kv_subject(self.names.runs_bucket, run_id), cb=on_msg)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot watch run {run_id}: {exc!r}") from exc
        try:
            seen = 0  # the newest revision a read returned
            poll = _WATCH_POLL_FIRST
            current = await self.get_run(run_id)
            if current is not None:
                seen = current[1]
                yield current[0]
            while True:
                try:
                    raw = await asyncio.wait_for(updates.get(), poll)
                except TimeoutError:
                    poll = min(poll * 2, _WATCH_POLL_MAX)
                    current = await self.get_run(run_id)
                    if current is not None and current[1] > seen:
                        seen = current[1]
                        yield current[0]
                    continue
                poll = _WATCH_POLL_FIRST
                try:
                    record = decode_run(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise StateError(f"the record of run {run_id} cannot be read: {exc}") from exc
                yield record
        finally:
            with contextlib.suppress(*NATS_ERRORS):
                await sub.unsubscribe()

    async def iter_runs(self) -> AsyncGenerator[RunRecord, None]:
        """Every run record of the namespace, a page of 1,024 stored messages at a time.

        A run updated while the pages are read may come twice; callers dedupe by id if it matters.
        """
        stream = kv_stream(self.names.runs_bucket)
        subject = kv_subject(self.names.runs_bucket, ">")
        seq = 1
        seen: set[str] = set()
        while True:
            try:
                page = await self.requests.direct_batch(
                    stream, {"seq": seq, "next_by_subj": subject, "batch": _BATCH}
                )
            except _READ_ERRORS as exc:
                raise NatsError(f"cannot read runs: {exc!r}") from exc
            for headers, data in page:
                if data and headers.get(HDR_KV_OPERATION) not in ("DEL", "PURGE"):
                    try:
                        record = decode_run(data)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue  # unreadable: left out (get_run says why)
                    if record.id not in seen:
                        seen.add(record.id)
                        yield record
            if len(page) < _BATCH:
                return
            seq = int(page[-1][0].get("Nats-Sequence", "0")) + 1

    # --- step memos ---------------------------------------------------------------------------
    async def commit_memo(self, run_id: str, memo: StepMemo) -> StepMemo:
        """Store a step's result unless one is stored; return the stored one (first writer wins)."""
        key = self.names.step_key(run_id, memo.hash)
        what = f"step {memo.id!r} of run {run_id}"
        if await self._create(self.names.steps_bucket, key, encode_record(memo), what) is not None:
            return memo
        stored = await self._get(self.names.steps_bucket, key, what)
        if stored is None or stored[2]:
            raise NatsError(f"{what}: the stored result vanished")
        try:
            return decode_memo(stored[0])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateError(f"{what}: its stored result cannot be read: {exc}") from exc

    async def load_memos(self, run_id: str) -> dict[str, StepMemo]:
        """Every committed step of a run, by step hash."""
        values = await self._last_values(self.names.steps_bucket, self.names.step_prefix(run_id))
        try:
            memos = [decode_memo(data) for data in values.values()]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateError(f"a step result of run {run_id} cannot be read: {exc}") from exc
        return {memo.hash: memo for memo in memos}

    async def _last_values(self, bucket: str, keys: str | list[str]) -> dict[str, bytes]:
        """The current value of every key matching ``keys`` (patterns like ``run.>``), by subject.

        One batched direct get (``multi_last``) when at most 1,024 keys match, which is the
        server's limit for one such request; past it, batched direct gets page through the
        matching messages by stream sequence, later values replacing earlier ones.
        """
        stream = kv_stream(bucket)
        subjects = [kv_subject(bucket, k) for k in ([keys] if isinstance(keys, str) else keys)]
        try:
            try:
                msgs = await self.requests.direct_batch(stream, {"multi_last": subjects, "batch": _BATCH})
            except ApiError as exc:
                if exc.code != 413:  # 413: more subjects match than one request may return
                    raise
                msgs = None
            if msgs is None or len(msgs) >= _BATCH:  # refused, or a full batch that may be cut short
                msgs = []
                for subject in subjects:
                    msgs.extend(await self._page(stream, subject))
        except _READ_ERRORS as exc:
            raise NatsError(f"cannot read {bucket}: {exc!r}") from exc
        values: dict[str, bytes] = {}
        for headers, data in msgs:  # in stream order per subject: a later write or delete wins
            key = headers.get("Nats-Subject", "")
            if headers.get("KV-Operation") in ("DEL", "PURGE") or not data:
                values.pop(key, None)
            else:
                values[key] = data
        return values

    async def _page(self, stream: str, subject: str) -> list[tuple[dict[str, str], bytes]]:
        """Every message on ``subject`` in stream order, a batch of 1,024 at a time."""
        out: list[tuple[dict[str, str], bytes]] = []
        seq = 1
        while True:
            page = await self.requests.direct_batch(
                stream, {"seq": seq, "next_by_subj": subject, "batch": _BATCH}
            )
            out.extend(page)
            if len(page) < _BATCH:
                return out
            seq = int(page[-1][0].get("Nats-Sequence", "0")) + 1

    # --- waiters ------------------------------------------------------------------------------
    async def put_waits(self, items: list[tuple[str, bytes, int | None]]) -> None:
        """Write waiter entries (key, value, TTL in seconds or None) all at once."""
        bucket = self.names.waits_bucket
        batch = [
            (kv_subject(bucket, key), value, {HDR_TTL: f"{ttl}s"} if ttl else None)
            for key, value, ttl in items
        ]
        await self._publish_all(batch, "waiters")

    async def drop_waits(self, keys: list[str]) -> None:
        """Remove waiter entries; their purge markers expire a minute later."""
        bucket = self.names.waits_bucket
        headers = {HDR_KV_OPERATION: "PURGE", HDR_ROLLUP: "sub", HDR_TTL: "60s"}
        await self._publish_all([(kv_subject(bucket, key), b"", headers) for key in keys], "waiters")

    async def _publish_all(self, batch: list[tuple[str, bytes, dict[str, str] | None]], what: str) -> None:
        if not batch:
            return
        try:
            replies = await self.requests.publish_batch(batch, _TIMEOUT)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot write {what}: {exc!r}") from exc
        failed = next((r for r in replies if isinstance(r, BaseException)), None)
        if failed is not None:
            raise NatsError(f"cannot write {what}: {failed!r}")

    async def find_waits(self, patterns: list[str]) -> dict[str, bytes]:
        """The waiter entries under ``patterns`` (keys with wildcards), by key."""
        prefix = len(kv_subject(self.names.waits_bucket, ""))
        values = await self._last_values(self.names.waits_bucket, patterns)
        return {subject[prefix:]: data for subject, data in values.items()}

    async def read_events(
        self, subject: str, *, after_seq: int = 0, since_ms: int = 0, limit: int = 256
    ) -> list[tuple[int, int, bytes]]:
        """Up to ``limit`` events on ``subject`` in stream order, as (sequence, stored time in epoch
        ms, data): those after ``after_seq`` when it is set, else those stored at or after
        ``since_ms``."""
        request: dict[str, Any] = {"next_by_subj": subject, "batch": limit}
        if after_seq > 0:
            request["seq"] = after_seq + 1
        else:
            request["start_time"] = rfc3339(from_ms(since_ms))
        try:
            msgs = await self.requests.direct_batch(self.names.events_stream, request)
        except _READ_ERRORS as exc:
            raise NatsError(f"cannot read events on {subject}: {exc!r}") from exc
        return [(int(headers.get("Nats-Sequence", "0")), stored_ms(headers), data) for headers, data in msgs]

    # --- registry -----------------------------------------------------------------------------
    async def put_function(self, info: FunctionInfo) -> None:
        try:
            await self._registry.put(self.names.function_key(info.full_id), _info_encoder.encode(info))
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot register function {info.full_id}: {exc!r}") from exc

    async def get_function(self, full_id: str) -> FunctionInfo | None:
        """The function registered under ``full_id``, or None if no worker registered it."""
        got = await self._get(
            self.names.registry_bucket, self.names.function_key(full_id), f"function {full_id}"
        )
        if got is None or got[2]:
            return None
        return _info_decoder.decode(got[0])

    async def put_worker(self, info: WorkerInfo, ttl_s: int) -> None:
        """Announce a live worker; the entry expires ``ttl_s`` seconds after the last announcement."""
        subject = kv_subject(self.names.registry_bucket, self.names.worker_key(info.id))
        await self._publish_all([(subject, msgspec.json.encode(info), {HDR_TTL: f"{ttl_s}s"})], "worker")

    async def drop_worker(self, worker_id: str) -> None:
        """Remove a stopping worker's entry at once instead of letting it expire."""
        subject = kv_subject(self.names.registry_bucket, self.names.worker_key(worker_id))
        headers = {HDR_KV_OPERATION: "PURGE", HDR_ROLLUP: "sub", HDR_TTL: "60s"}
        await self._publish_all([(subject, b"", headers)], "worker")

    async def list_workers(self) -> list[WorkerInfo]:
        """The workers that announced themselves recently."""
        values = await self._last_values(self.names.registry_bucket, "worker.>")
        return [_worker_decoder.decode(data) for data in values.values()]

    async def list_functions(self) -> list[FunctionInfo]:
        """Every function any worker has registered in this namespace."""
        values = await self._last_values(self.names.registry_bucket, "fn.>")
        return [_info_decoder.decode(data) for data in values.values()]
