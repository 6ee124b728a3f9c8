"""RAW: the physical limit, measured with plain nats-py on the same server and in the same process.

Against a stream and a key-value bucket of its own (deleted afterwards), four figures in ops/s:

- ``kv_create_per_s``: ``kv.create`` of 200-byte values, 256 in flight;
- ``publish_per_s``: ``js.publish`` of 200-byte messages (acked), 256 in flight;
- ``step_seq_per_s``: the durable step loop one message at a time: pull a message, create a
  200-byte KV value, publish a follow-up, ack;
- ``step_pipelined_per_s``: the same loop with up to 256 messages in flight (fetches of up to
  256, each message's step a task of its own).

Every loop stops at the run's deadline; a cut-short run reports the rate of what it finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, StorageType, StreamConfig

from .admin import open_plain
from .procs import BenchError

WINDOW = 256
VALUE = b"x" * 200
_FETCH_ERRORS = (nats.errors.TimeoutError, asyncio.TimeoutError)

#: Operations per figure at ``--scale 1``.
SIZES = {"kv_create": 20_000, "publish": 50_000, "step_seq": 3_000, "step_pipelined": 20_000}


async def pipelined(n: int, op: Callable[[int], Awaitable[object]], deadline: float) -> tuple[int, float]:
    """Run ``op(0..n-1)`` with up to `WINDOW` in flight; return (completed, seconds)."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(WINDOW)
    tasks: set[asyncio.Task[object]] = set()
    errors: list[BaseException] = []

    def done(task: asyncio.Task[object]) -> None:
        tasks.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]

    started = time.perf_counter()
    issued = 0
    while issued < n and loop.time() < deadline and not errors:
        await slots.acquire()
        task = asyncio.ensure_future(op(issued))
        tasks.add(task)
        task.add_done_callback(done)
        issued += 1
    if tasks:
        await asyncio.wait(set(tasks), timeout=max(0.0, deadline - loop.time()))
    elapsed = time.perf_counter() - started
    for task in list(tasks):
        task.cancel()
    if errors:
        raise BenchError(f"RAW operation failed: {errors[0]!r}") from errors[0]
    return issued - len(tasks), elapsed


async def _step_loop_sequential(sub: Any, js: Any, kv: Any, subject: str, n: int, deadline: float) -> int:
    loop = asyncio.get_running_loop()
    done = 0
    while done < n and loop.time() < deadline:
        try:
            msgs = await sub.fetch(1, timeout=2)
        except _FETCH_ERRORS:
            continue
        await kv.create(f"seq.{done}", VALUE)
        await js.publish(subject, VALUE)
        await msgs[0].ack()
        done += 1
    return done


async def _step_loop_pipelined(sub: Any, js: Any, kv: Any, subject: str, n: int, deadline: float) -> int:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(WINDOW)
    tasks: set[asyncio.Task[None]] = set()
    finished = 0

    async def step(msg: Any, i: int) -> None:
        nonlocal finished
        await kv.create(f"pipe.{i}", VALUE)
        await js.publish(subject, VALUE)
        await msg.ack()
        finished += 1

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        slots.release()

    fetched = 0
    while fetched < n and loop.time() < deadline:
        await slots.acquire()
        want = 1
        while want < min(WINDOW, n - fetched) and not slots.locked():
            await slots.acquire()
            want += 1
        try:
            msgs = await sub.fetch(want, timeout=2)
        except _FETCH_ERRORS:
            msgs = []
        for _ in range(want - len(msgs)):
            slots.release()
        for msg in msgs:
            task = asyncio.ensure_future(step(msg, fetched))
            tasks.add(task)
            task.add_done_callback(done)
            fetched += 1
    if tasks:
        await asyncio.wait(set(tasks), timeout=max(0.0, deadline - loop.time()))
    for task in list(tasks):
        task.cancel()
    return finished


def _publisher(js: Any, subject: str) -> Callable[[int], Awaitable[object]]:
    async def publish(_: int) -> object:
        return await js.publish(subject, VALUE)

    return publish


async def measure(url: str, tag: str, scale: float, deadline: float) -> tuple[dict[str, float], bool]:
    """One RAW run; ``tag`` names its stream and bucket. Returns (figures, incomplete)."""
    sizes = {name: max(10, round(n * scale)) for name, n in SIZES.items()}
    nc = await open_plain(url, "meshflow-bench-raw")
    js = nc.jetstream(timeout=10)
    stream, subject, bucket = f"BENCHRAW_{tag}", f"benchraw.{tag}", f"benchraw_{tag}"
    figures: dict[str, float] = {}
    counts: dict[str, int] = {}
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{subject}.>"], storage=StorageType.FILE))
        kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE))

        async def rate(name: str, op: Callable[[int], Awaitable[object]]) -> None:
            counts[name], seconds = await pipelined(sizes[name], op, deadline)
            figures[f"{name}_per_s"] = counts[name] / seconds if seconds > 0 else 0.0

        await rate("kv_create", lambda i: kv.create(f"c.{i}", VALUE))
        await rate("publish", _publisher(js, f"{subject}.pub"))

        for kind in ("step_seq", "step_pipelined"):
            await pipelined(sizes[kind], _publisher(js, f"{subject}.in.{kind}"), deadline)  # input, untimed
            config = ConsumerConfig(durable_name=kind, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1)
            sub = await js.pull_subscribe(f"{subject}.in.{kind}", durable=kind, stream=stream, config=config)
            loop_fn = _step_loop_sequential if kind == "step_seq" else _step_loop_pipelined
            started = time.perf_counter()
            counts[kind] = await loop_fn(sub, js, kv, f"{subject}.out", sizes[kind], deadline)
            seconds = time.perf_counter() - started
            figures[f"{kind}_per_s"] = counts[kind] / seconds if seconds > 0 else 0.0
            await sub.unsubscribe()
    finally:
        for name, delete in ((stream, js.delete_stream), (bucket, js.delete_key_value)):
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError, nats.js.errors.NotFoundError):
                await delete(name)
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError, OSError):
            await nc.close()
    incomplete = any(counts.get(name, 0) < n for name, n in sizes.items())
    return figures, incomplete
