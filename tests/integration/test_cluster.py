"""Cluster failover: on a 3-node cluster (``deploy/nats/node.conf``) with R3 streams and buckets,
SIGKILLing the leader of the events stream mid-load, restarting it, then SIGKILLing the leader of the
runs bucket loses no acknowledged event, leaves no run unfinished and runs every step once."""

from __future__ import annotations

import asyncio
import gc
import itertools
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from structlog.testing import capture_logs

import meshflow
from meshflow.names import Names, kv_stream
from meshflow.testing import wait_until

from .cluster import Cluster

EVENT = "order/placed"
STEPS = ("reserve", "charge", "ship")
MAX_EVENTS = 3000  # the load stops at whichever bound comes first: count, time, or the scenario's end
MAX_LOAD_SECONDS = 45.0
BATCH = 5  # events per send
PACE = 0.03  # seconds between sends: a steady load the workers keep up with, not a flood
ACK_WAIT = 15.0  # the run lease: must outlast an election (5-7 s) plus a lost write's 3 s attempt
_ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path / "cluster")
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@asynccontextmanager
async def jetstream(cluster: Cluster) -> AsyncIterator[Any]:
    """A plain nats-py JetStream context as admin, to ask the streams who leads them."""
    nc = await nats.connect(
        servers=cluster.urls,
        user="admin",
        password=cluster.passwords["ADMIN"],
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
    )
    try:
        yield nc.jetstream(timeout=2)
    finally:
        await nc.close()


@contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler (a task's exception nobody retrieved...)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        yield seen
    finally:
        gc.collect()  # a failed task is reported when it is collected
        loop.set_exception_handler(previous)


async def leader_of(js: Any, stream: str) -> str:
    """The server that leads ``stream`` now (waiting out an election)."""

    async def leader() -> str | None:
        try:
            info = await js.stream_info(stream)
        except (nats.errors.Error, TimeoutError):  # no leader to answer yet
            return None
        return info.cluster.leader if info.cluster else None

    return await wait_until(leader, timeout=30, interval=0.1, message=f"{stream} has a leader")


async def replicas_current(js: Any, streams: Sequence[str], size: int) -> bool:
    """Every stream has a leader and ``size - 1`` replicas that have caught up with it."""
    for stream in streams:
        try:
            info = await js.stream_info(stream)
        except (nats.errors.Error, TimeoutError):
            return False
        peers = (info.cluster.replicas or []) if info.cluster else []
        if not info.cluster.leader or len(peers) != size - 1:
            return False
        if not all(p.current and not p.offline for p in peers):
            return False
    return True


@dataclass
class Load:
    """Sends events in batches until told to stop; keeps what was acknowledged and when."""

    acked: list[meshflow.Event] = field(default_factory=list)
    refused: list[meshflow.Event] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)
    longest_send: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, client: meshflow.Client) -> None:
        end = time.monotonic() + MAX_LOAD_SECONDS
        sent = 0
        while not self.stop.is_set() and sent < MAX_EVENTS and time.monotonic() < end:
            batch = [meshflow.Event(name=EVENT, data={"i": sent + i}) for i in range(BATCH)]
            sent += BATCH
            began = time.monotonic()
            try:
                await client.send(batch)
            except meshflow.NatsError as exc:  # not acknowledged: none of them may be expected to run
                self.refused.extend(batch)
                self.errors.append(repr(exc))
            else:
                self.acked.extend(batch)
                self.ack_times.append(time.monotonic())
            self.longest_send = max(self.longest_send, time.monotonic() - began)
            await asyncio.sleep(PACE)  # pacing the load, not waiting for anything

    def acked_since(self, t: float) -> int:
        return sum(1 for a in self.ack_times if a > t)


@dataclass
class Ledger:
    """Every execution of a step: how often per (run, step), and when (monotonic and epoch ms)."""

    count: Counter[tuple[str, str]] = field(default_factory=Counter)
    times: list[float] = field(default_factory=list)
    at_ms: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    async def work(self, run_id: str, step: str) -> str:
        self.count[(run_id, step)] += 1
        self.times.append(time.monotonic())
        self.at_ms.setdefault((run_id, step), []).append(time.time_ns() // 1_000_000)
        return step

    def reruns(self) -> dict[tuple[str, str], int]:
        return {key: n for key, n in self.count.items() if n > 1}


async def explain(client: meshflow.Client, ledger: Ledger, key: tuple[str, str], t0_ms: int) -> str:
    """Which execution of a re-run step the stored result came from (the first: it was committed
    and still ran again; a later one: the first commit never got stored)."""
    run_id, step = key
    memos = {m.id: m for m in await client.step_memos(run_id)}
    memo = memos.get(step)
    runs = [f"{(t - t0_ms) / 1000:.2f}s" for t in ledger.at_ms[key]]
    if memo is None or memo.started_at is None:
        return f"{run_id}/{step} ran at {runs}; no stored result"
    kept = sum(1 for t in ledger.at_ms[key] if t >= memo.started_at)
    which = len(ledger.at_ms[key]) - kept + 1
    return f"{run_id}/{step} ran at {runs}; stored result from execution #{which}"


def longest_gap(times: Sequence[float], start: float, end: float) -> float:
    """The longest stretch of [start, end) without an entry of ``times`` (how long progress stalled)."""
    inside = sorted(t for t in times if start <= t < end)
    marks = [start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(marks))


async def final_statuses(client: meshflow.Client, run_ids: Sequence[str], within: float) -> dict[str, str]:
    """Each run's status once it finished, or when ``within`` seconds ran out (``timed out: ...``)."""
    deadline = time.monotonic() + within
    gate = asyncio.Semaphore(64)

    async def status(run_id: str) -> str:
        async with gate:
            try:
                run = await client.wait_for_run(
                    run_id, timeout=max(0.1, deadline - time.monotonic()), steps=False
                )
            except meshflow.RunTimeoutError as exc:
                return f"timed out: {exc}"
            return str(run.status)

    return dict(zip(run_ids, await asyncio.gather(*(status(r) for r in run_ids)), strict=True))


@pytest.mark.slow
@pytest.mark.timeout(170)
async def test_killing_stream_leaders_loses_no_acknowledged_event_and_runs_every_step_once(
    cluster: Cluster,
) -> None:
    names = Names("failover")
    ledger = Ledger()
    app = meshflow.App("shop")

    @app.function("order", trigger=EVENT)
    async def order(ctx: meshflow.Context) -> str:
        await ctx.step.run("reserve", ledger.work, ctx.run_id, "reserve")
        await ctx.step.sleep("settle", "300ms")
        await ctx.step.run("charge", ledger.work, ctx.run_id, "charge")
        await ctx.step.run("ship", ledger.work, ctx.run_id, "ship")
        return "shipped"

    options: dict[str, Any] = {"namespace": names.ns, "auth": cluster.admin, "replicas": 3}
    runs_kv, steps_kv = kv_stream(names.runs_bucket), kv_stream(names.steps_bucket)
    streams = [names.events_stream, names.runs_stream, runs_kv, steps_kv]
    load = Load()
    t0, t0_ms = time.monotonic(), time.time_ns() // 1_000_000
    with capture_logs() as logs, loop_errors() as escaped:
        async with (
            meshflow.connect(cluster.urls, **options) as client,
            meshflow.Worker(app, nats=cluster.urls, ack_wait=ACK_WAIT, **options),
            meshflow.Worker(app, nats=cluster.urls, ack_wait=ACK_WAIT, **options),
            jetstream(cluster) as js,
        ):
            sending = asyncio.create_task(load.run(client))

            def resumed(since: float) -> bool:
                return load.acked_since(since) >= 50 or sending.done()

            await wait_until(lambda: resumed(t0) and len(ledger.times) >= 50, timeout=30, message="load")

            leaders_1 = {s: await leader_of(js, s) for s in streams}
            first = leaders_1[names.events_stream]
            kill_1 = time.monotonic()
            cluster.kill(first)
            await wait_until(lambda: resumed(kill_1), timeout=45, message="events are acknowledged again")
            restart = time.monotonic()
            cluster.spawn(first)
            await wait_until(lambda: cluster.ready(first), timeout=20, message=f"{first} restarted")
            await wait_until(
                lambda: replicas_current(js, streams, 3), timeout=45, interval=0.2, message="replicas current"
            )
            caught_up = time.monotonic()

            leaders_2 = {s: await leader_of(js, s) for s in streams}
            second = leaders_2[runs_kv]
            kill_2 = time.monotonic()
            cluster.kill(second)
            await wait_until(lambda: resumed(kill_2), timeout=45, message="events are acknowledged again")
            await wait_until(lambda: ledger.times[-1] > kill_2 + 1, timeout=45, message="steps run again")
            load.stop.set()
            await sending
            load_end = time.monotonic()

            statuses = await final_statuses(client, [order.run_id_for(e) for e in load.acked], within=60)
            drained = time.monotonic()
            reruns = ledger.reruns()
            explained = [await explain(client, ledger, key, t0_ms) for key in sorted(reruns)[:8]]

    unfinished = {r: s for r, s in statuses.items() if s != meshflow.RunStatus.COMPLETED}
    missing = [(r, s) for r in statuses for s in STEPS if ledger.count[(r, s)] == 0]
    retried = {e["run_id"] for e in logs if e["event"] == "run retrying"}
    warned = [e for e in logs if e["log_level"] == "warning"]
    warnings = Counter(_ULID.sub("<id>", f"{e['event']}: {e.get('error', '')}")[:120] for e in warned)
    errors = [e for e in logs if e["log_level"] in ("error", "critical", "exception")]
    figures = "\n".join(
        [
            f"events: {len(load.acked) + len(load.refused)} sent, {len(load.acked)} acknowledged, "
            f"{len(load.refused)} not acknowledged {load.errors[:3]}",
            f"runs: {len(statuses) - len(unfinished)} of {len(statuses)} completed "
            f"{list(unfinished.items())[:3]}; {len(retried)} went through a run retry",
            f"steps: {sum(ledger.count.values())} executions, {len(reruns)} re-executed (run, step) "
            f"pairs, {sum(reruns.values()) - len(reruns)} extra executions",
            f"kill 1 at {kill_1 - t0:.1f}s: {first} (leaders before: {leaders_1}); publish stall "
            f"{longest_gap(load.ack_times, kill_1, restart):.2f}s, step stall "
            f"{longest_gap(ledger.times, kill_1, restart):.2f}s; restarted {restart - kill_1:.1f}s later, "
            f"replicas current {caught_up - restart:.1f}s after that",
            f"kill 2 at {kill_2 - t0:.1f}s: {second} (leaders before: {leaders_2}), left down; publish "
            f"stall {longest_gap(load.ack_times, kill_2, load_end):.2f}s, step stall "
            f"{longest_gap(ledger.times, kill_2, load_end):.2f}s",
            f"longest send {load.longest_send:.2f}s; load ended at {load_end - t0:.1f}s; waited "
            f"{drained - load_end:.1f}s more for the runs to finish",
            "re-executed: " + "".join(f"\n  {line}" for line in explained),
            "worker warnings: " + "".join(f"\n  {n} x {w}" for w, n in warnings.most_common(8)),
            f"errors logged: {errors[:3]}",
            f"exceptions nobody retrieved: {len(escaped)} {[repr(c.get('exception')) for c in escaped[:3]]}",
        ]
    )
    print(f"\ncluster failover\n{figures}")

    assert load.acked, figures
    assert not unfinished, f"{len(unfinished)} acknowledged events' runs did not complete\n{figures}"
    assert not missing, f"steps of completed runs never executed: {missing[:5]}\n{figures}"
    assert not reruns, f"steps ran more than once though no worker died\n{figures}"
    assert not errors, figures
    assert not escaped, figures


@pytest.mark.timeout(120)
async def test_workers_provisioning_at_once_agree_and_replicas_change_only_when_asked(
    cluster: Cluster,
) -> None:
    names = Names("provision")
    n = names
    streams = [n.events_stream, n.runs_stream, n.logs_stream, n.index_stream, n.live_stream]
    streams += [
        kv_stream(b)
        for b in (n.runs_bucket, n.steps_bucket, n.registry_bucket, n.waits_bucket, n.flow_bucket)
    ]
    app = meshflow.App("shop")

    @app.function("order", trigger=EVENT)
    async def order(ctx: meshflow.Context) -> str:
        return "ok"

    async def replicas(js: Any) -> dict[str, int]:
        return {s: (await js.stream_info(s)).config.num_replicas for s in streams}

    options: dict[str, Any] = {"namespace": names.ns, "auth": cluster.admin}
    async with jetstream(cluster) as js:
        # a fresh cluster, three workers provisioning at the same moment: all start, R3 everywhere
        workers = [meshflow.Worker(app, nats=cluster.urls, **options) for _ in range(3)]
        try:
            await asyncio.gather(*(w.start() for w in workers))
        finally:
            await asyncio.gather(*(w.stop() for w in workers))
        assert set((await replicas(js)).values()) == {3}

        async with meshflow.connect(cluster.urls, replicas=1, **options):
            pass  # asked for: existing streams and buckets change
        assert set((await replicas(js)).values()) == {1}
        with capture_logs() as logs:
            async with meshflow.Worker(app, nats=cluster.urls, **options):
                pass  # not asked for: left as they are, with a warning each from a worker
        assert set((await replicas(js)).values()) == {1}
        warned = {
            e["stream"] for e in logs if e["event"] == "stream has fewer replicas than this deployment allows"
        }
        assert warned == set(streams)
        async with meshflow.connect(cluster.urls, replicas=3, **options) as client:
            await wait_until(
                lambda: replicas_current(js, streams, 3), timeout=45, interval=0.2, message="R3 again"
            )
            event = meshflow.Event(name=EVENT)
            await client.send(event)
            async with meshflow.Worker(app, nats=cluster.urls, **options):
                run = await client.wait_for_run(order.run_id_for(event))
    assert run.output == "ok"
