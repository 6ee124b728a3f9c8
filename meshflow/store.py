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
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType

from .bus import NATS_ERRORS
from .errors import NatsError
from .names import Names, direct_get_subject, kv_stream, kv_subject
from .runs import RunRecord, StepMemo, decode_memo, decode_run, encode_record

_BATCH = 1000


class RunConflict(Exception):
    """A run record changed since it was read (compare-and-set failed)."""


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


_info_encoder = msgspec.json.Encoder()
_info_decoder = msgspec.json.Decoder(FunctionInfo)


class Store:
    """Reads and writes runs, step memos and the registry of one namespace."""

    def __init__(self, nc: NatsClient, names: Names) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10)
        self.names = names
        self._runs: Any = None
        self._steps: Any = None
        self._registry: Any = None

    async def open(self, *, create: bool = True, replicas: int = 1) -> Store:
        """Bind the buckets, creating any that are missing when ``create`` is set."""
        n = self.names
        self._runs = await self._bucket(n.runs_bucket, create, replicas)
        self._steps = await self._bucket(n.steps_bucket, create, replicas)
        self._registry = await self._bucket(n.registry_bucket, create, replicas)
        return self

    async def _bucket(self, name: str, create: bool, replicas: int) -> Any:
        try:
            return await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                raise NatsError(f"bucket {name} does not exist: start a worker first") from None
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot open bucket {name}: {exc!r}") from exc
        try:
            return await self.js.create_key_value(
                KeyValueConfig(
                    bucket=name, history=1, storage=StorageType.FILE, replicas=replicas, direct=True
                )
            )
        except NATS_ERRORS as exc:
            try:  # another process may have created it at the same moment
                return await self.js.key_value(name)
            except NATS_ERRORS:
                raise NatsError(f"cannot create bucket {name}: {exc!r}") from exc

    # --- runs ---------------------------------------------------------------------------------
    async def get_run(self, run_id: str) -> tuple[RunRecord, int] | None:
        """The run record and its revision, or None."""
        try:
            entry = await self._runs.get(run_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot read run {run_id}: {exc!r}") from exc
        return decode_run(entry.value), int(entry.revision)

    async def create_run(self, record: RunRecord) -> int | None:
        """Store a new run; None when a run with this id exists already (the claim is taken)."""
        try:
            return int(await self._runs.create(record.id, encode_record(record)))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot create run {record.id}: {exc!r}") from exc

    async def update_run(self, record: RunRecord, revision: int) -> int:
        """Replace the run record if it is still at ``revision``; `RunConflict` otherwise."""
        try:
            return int(await self._runs.update(record.id, encode_record(record), last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise RunConflict(record.id) from None
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot update run {record.id}: {exc!r}") from exc

    async def watch_run(self, run_id: str) -> AsyncIterator[RunRecord]:
        """Yield the run record now (if it exists) and on every change."""
        try:
            watcher = await self._runs.watch(run_id)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot watch run {run_id}: {exc!r}") from exc
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=3600)
                except nats.errors.TimeoutError:
                    continue
                if entry is not None and entry.value:
                    yield decode_run(entry.value)
        finally:
            await watcher.stop()

    # --- step memos ---------------------------------------------------------------------------
    async def commit_memo(self, run_id: str, memo: StepMemo) -> StepMemo:
        """Store a step's result unless one is stored; return the stored one (first writer wins)."""
        key = self.names.step_key(run_id, memo.hash)
        try:
            await self._steps.create(key, encode_record(memo))
            return memo
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot commit step {memo.id!r} of run {run_id}: {exc!r}") from exc
        try:
            entry = await self._steps.get(key)
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot read step {memo.id!r} of run {run_id}: {exc!r}") from exc
        return decode_memo(entry.value)

    async def load_memos(self, run_id: str) -> dict[str, StepMemo]:
        """Every committed step of a run, by step hash: one batched direct get."""
        bucket = self.names.steps_bucket
        found: dict[str, StepMemo] = {}
        start_seq = 0
        while True:
            request: dict[str, Any] = {
                "multi_last": [kv_subject(bucket, self.names.step_prefix(run_id))],
                "batch": _BATCH,
            }
            if start_seq:
                request["start_seq"] = start_seq
            msgs = await self._direct_batch(kv_stream(bucket), request)
            last_seq = 0
            for headers, data in msgs:
                last_seq = max(last_seq, int(headers.get("Nats-Sequence", "0")))
                if headers.get("KV-Operation") in ("DEL", "PURGE") or not data:
                    continue
                memo = decode_memo(data)
                found[memo.hash] = memo
            if len(msgs) < _BATCH:
                return found
            start_seq = last_seq + 1

    async def _direct_batch(self, stream: str, request: dict[str, Any]) -> list[tuple[dict[str, str], bytes]]:
        out: list[tuple[dict[str, str], bytes]] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_msg(msg: Any) -> None:
            headers = msg.headers or {}
            status = headers.get("Status")
            if status is None:
                out.append((headers, msg.data))
            elif not done.done():
                if status in ("204", "404"):  # end of batch / nothing matched
                    done.set_result(None)
                else:
                    done.set_exception(NatsError(f"direct get from {stream} failed: {status} {headers}"))

        inbox = self.nc.new_inbox()
        try:
            sub = await self.nc.subscribe(inbox, cb=on_msg)
            try:
                await self.nc.publish(direct_get_subject(stream), json.dumps(request).encode(), reply=inbox)
                await asyncio.wait_for(done, 10)
            finally:
                await sub.unsubscribe()
        except NATS_ERRORS as exc:
            raise NatsError(f"direct get from {stream} failed: {exc!r}") from exc
        return out

    # --- registry -----------------------------------------------------------------------------
    async def put_function(self, info: FunctionInfo) -> None:
        try:
            await self._registry.put(self.names.function_key(info.full_id), _info_encoder.encode(info))
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot register function {info.full_id}: {exc!r}") from exc

    async def list_functions(self) -> list[FunctionInfo]:
        """Every function any worker has registered in this namespace."""
        bucket = self.names.registry_bucket
        msgs = await self._direct_batch(
            kv_stream(bucket), {"multi_last": [kv_subject(bucket, "fn.>")], "batch": _BATCH}
        )
        return [
            _info_decoder.decode(data) for headers, data in msgs if data and "KV-Operation" not in headers
        ]
