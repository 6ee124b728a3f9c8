"""What the benchmark reads from and cleans on the server, beside meshflow's own API.

One plain nats-py connection per benchmark invocation: stream and consumer state of a
namespace (store bytes, pending and ack-pending counts, whether every event has been routed, how
many waiter entries there are), a sweep of every run's status and output, and deleting a
namespace's streams once a workload run is done (so runs do not interfere, and an external
server is left as it was found; deleting the runs stream also cancels pending timers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from meshflow.functions import Function
from meshflow.names import Names, kv_stream

from .procs import BenchError

_TIMEOUTS = (nats.errors.TimeoutError, asyncio.TimeoutError)


class RunOutcome(msgspec.Struct):
    """The fields of a run record a sweep reads: its status and its output (raw JSON)."""

    status: str
    output: msgspec.Raw = msgspec.Raw(b"null")


_outcome = msgspec.json.Decoder(RunOutcome)


async def _ignore(exc: Exception) -> None:
    """nats-py logs every connection error with a traceback unless given a callback."""


async def open_plain(url: str, name: str) -> NatsClient:
    """A plain nats-py connection that fails within seconds, not after two minutes of retries."""
    try:
        return await nats.connect(
            url,
            name=name,
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # nats-py retries even a first connect this often
            reconnect_time_wait=0.5,
            error_cb=_ignore,
        )
    except (nats.errors.Error, *_TIMEOUTS, OSError) as exc:
        raise BenchError(f"cannot connect to NATS at {url}: {exc!r}") from exc


def streams(names: Names) -> list[str]:
    """Every stream a meshflow namespace uses."""
    buckets = (
        names.runs_bucket,
        names.steps_bucket,
        names.registry_bucket,
        names.waits_bucket,
        names.flow_bucket,
    )
    return [names.events_stream, names.runs_stream, *(kv_stream(b) for b in buckets)]


class Admin:
    """Reads and deletes the streams of benchmark namespaces over its own connection."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.js: Any = nc.jetstream(timeout=10)

    @classmethod
    async def connect(cls, url: str) -> Admin:
        return cls(await open_plain(url, "meshflow-bench-admin"))

    async def close(self) -> None:
        with contextlib.suppress(nats.errors.Error, *_TIMEOUTS, OSError):
            await self.nc.close()

    async def store_bytes(self, names: Names) -> int:
        """Bytes stored in the namespace's streams (events, runs and the four buckets)."""
        total = 0
        for stream in streams(names):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                info = await self.js.stream_info(stream)
                total += int(info.state.bytes)
        return total

    async def consumer(self, stream: str, name: str) -> tuple[int, int]:
        """``(num_pending, num_ack_pending)`` of a consumer."""
        info = await self.js.consumer_info(stream, name)
        return int(info.num_pending), int(info.num_ack_pending)

    async def run_ack_pending(self, names: Names, fn: Function) -> int:
        """Messages of ``fn``'s run consumer delivered to a worker and not yet acked."""
        return (await self.consumer(names.runs_stream, names.run_consumer(fn.app_id, fn.id)))[1]

    async def drained(self, names: Names, fn: Function) -> bool:
        """Whether ``fn``'s trigger and run consumers have handed out and seen acked everything."""
        trigger = await self.consumer(names.events_stream, names.trigger_consumer(fn.app_id, fn.id))
        runs = await self.consumer(names.runs_stream, names.run_consumer(fn.app_id, fn.id))
        return trigger == (0, 0) and runs == (0, 0)

    async def events_drained(self, names: Names) -> bool:
        """Whether every consumer of the events stream (the functions' triggers and the routing
        of events to waiting runs) has handed out and seen acked every event stored so far."""
        infos = await self.js.consumers_info(names.events_stream)
        return all(int(i.num_pending) == 0 and int(i.num_ack_pending) == 0 for i in infos)

    async def waits_messages(self, names: Names) -> int:
        """Messages in the waits bucket's stream (history 1: one per live or purged key)."""
        info = await self.js.stream_info(kv_stream(names.waits_bucket))
        return int(info.state.messages)

    async def run_statuses(self, names: Names, within: float = 60.0) -> Counter[str]:
        """How many runs of the namespace are in each status: one pass over the runs bucket.

        `TimeoutError` if the pass takes longer than ``within`` seconds.
        """
        return Counter(run.status for run in (await self.run_outcomes(names, within)).values())

    async def run_outcomes(self, names: Names, within: float = 60.0) -> dict[str, RunOutcome]:
        """Every run's status and output, by run id: one pass over the runs bucket.

        `TimeoutError` if the pass takes longer than ``within`` seconds.
        """
        runs: dict[str, RunOutcome] = {}
        try:
            kv = await self.js.key_value(names.runs_bucket)
        except nats.js.errors.BucketNotFoundError:
            return runs
        watcher = await kv.watch(">", ignore_deletes=True)
        try:
            async with asyncio.timeout(within):
                while True:
                    entry = await watcher.updates(timeout=within)
                    if entry is None:  # the watcher's "initial values done" marker
                        return runs
                    if entry.value:
                        runs[entry.key] = _outcome.decode(entry.value)
        finally:
            with contextlib.suppress(nats.errors.Error, *_TIMEOUTS):
                await watcher.stop()

    async def delete_namespace(self, names: Names) -> None:
        """Delete every stream of the namespace (missing ones are fine)."""
        for stream in streams(names):  # best effort: a server that is gone has nothing to clean
            with contextlib.suppress(nats.errors.Error, *_TIMEOUTS, OSError):
                await self.js.delete_stream(stream)
