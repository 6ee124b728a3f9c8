"""The fault-injection run: a steady stream of events (some sent twice) into two functions served
by several worker processes, while a nemesis kills workers with SIGKILL, stops one with SIGSTOP
for longer than the ack wait, and kills the nats-server with SIGKILL and restarts it. Then a
ledger of every step execution is checked against each guarantee.

    python -m tests.faults.chaos --events 3000 --load 120 --kills 16 --stalls 3 --server-kills 3
    python -m tests.faults.chaos --cluster --ack-wait 15 --stall 17 --node-kills 3 --partitions 2

The second runs on a 3-node cluster, killing stream leaders and cutting one node at a time off
from the others and from every client. Each prints its report as JSON (exit status 1 when a
guarantee was broken); ``test_chaos.py`` runs a small one on every ``./scripts/test``. Bounded:
the load stops after ``--load`` seconds, the drain after ``--drain`` seconds, and every process
started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import meshflow
from meshflow.logging import configure_logging
from meshflow.names import kv_stream
from meshflow.server import EmbeddedServer

from .apps import CHAOS_EVENT, CHAOS_FUNCTIONS, CHAOS_STEPS, NAP_MS
from .partitions import PartitionableCluster
from .procs import Entry, Ledger, Worker

NAMESPACE = "chaos"


@dataclasses.dataclass(frozen=True)
class Config:
    events: int = 150
    load_s: float = 12.0  # events are sent over this long
    workers: int = 3
    ack_wait: float = 2.0
    resend: float = 0.1  # this share of events is sent a second time, a little later
    kills: int = 2  # worker SIGKILLs (each replaced by a new worker at once)
    stalls: int = 1  # worker SIGSTOPs of stall_s seconds (past the ack wait)
    server_kills: int = 1  # nats-server SIGKILLs, each restarted at once
    stall_s: float = 3.5
    drain_s: float = 90.0
    seed: int = 1
    # On a 3-node cluster instead of one server: its nodes' leaders are killed and restarted,
    # and one node at a time is cut off from the others and from every client for partition_s.
    cluster: bool = False
    node_kills: int = 2
    partitions: int = 1
    partition_s: float = 8.0


@dataclasses.dataclass
class Report:
    """What the run did and what the ledger shows. Every count named in `BROKEN` must be 0."""

    acknowledged_events: int
    resent_events: int
    runs_expected: int
    events_without_a_finished_run: dict[str, int]
    runs_finished_twice: int  # a body returned again with no harm to explain it: a stale pass went on
    runs_finished_again_after_harm: int  # ... after its first returner (or the server) was harmed
    committed_steps_run_again: int
    early_wakes: int
    runs_unfinished_after_drain: int
    step_executions: int
    re_executions: int
    re_executions_explained: int
    re_executions_unexplained: int
    nemesis: list[str]
    load_s: float
    drain_s: float

    BROKEN = (
        "runs_finished_twice",
        "committed_steps_run_again",
        "early_wakes",
        "runs_unfinished_after_drain",
        "re_executions_unexplained",
    )

    @property
    def broken(self) -> list[str]:
        """The guarantees this run broke (empty: none)."""
        bad = [name for name in self.BROKEN if getattr(self, name)]
        return bad + [
            f"events_without_a_finished_run[{f}]" for f, n in self.events_without_a_finished_run.items() if n
        ]


class Nemesis:
    """Does harm on a schedule and remembers when, to whom, so re-executions can be explained."""

    def __init__(
        self,
        config: Config,
        server: EmbeddedServer | PartitionableCluster,
        spawn: Callable[[], Worker],
        workers: list[Worker],
        client: meshflow.Client,
    ) -> None:
        self.config = config
        self.server = server
        self.spawn = spawn
        self.workers = workers
        self.client = client
        self.harm: list[tuple[int, int, str]] = []  # (time ns, pid or 0 for the servers, what)
        self.stalled: set[int] = set()
        self._leaders = itertools.cycle([f"{NAMESPACE.upper()}_EVENTS", kv_stream(f"{NAMESPACE}_runs")])

    def log(self) -> list[str]:
        t0 = self.harm[0][0] if self.harm else 0
        return [f"+{(ns - t0) / 1e9:.1f}s {what}" + (f" {pid}" if pid else "") for ns, pid, what in self.harm]

    async def run(self, rnd: random.Random, until: float) -> None:
        c = self.config
        acts = ["kill"] * c.kills + ["stall"] * c.stalls
        if isinstance(self.server, PartitionableCluster):
            acts += ["node"] * c.node_kills + ["partition"] * c.partitions
        else:
            acts += ["server"] * c.server_kills
        rnd.shuffle(acts)
        gap = max(0.5, (until - time.monotonic()) / (len(acts) + 1))
        for act in acts:
            await asyncio.sleep(gap * (0.5 + rnd.random()))
            live = [w for w in self.workers if w.proc.poll() is None and w.pid not in self.stalled]
            if act == "server" and isinstance(self.server, EmbeddedServer):
                self.harm.append((time.time_ns(), 0, "server killed"))
                self.server.restart(kill=True)  # blocks the loop for the restart: fine here
            elif act in ("node", "partition") and isinstance(self.server, PartitionableCluster):
                await self._harm_a_node(act, rnd)
            elif act == "kill" and live:
                victim = rnd.choice(live)
                self.harm.append((time.time_ns(), victim.pid, "killed"))
                victim.kill()
                self.workers.remove(victim)
                self.workers.append(self.spawn())
            elif act == "stall" and live:
                victim = rnd.choice(live)
                self.harm.append((time.time_ns(), victim.pid, "stopped"))
                self.stalled.add(victim.pid)
                victim.pause()
                await asyncio.sleep(self.config.stall_s)  # the harm itself: a pause this long
                victim.resume()
                self.stalled.discard(victim.pid)
                self.harm.append((time.time_ns(), victim.pid, "resumed"))

    async def _harm_a_node(self, act: str, rnd: random.Random) -> None:
        """Kill the leader of a stream (and start it again 3 s later), or cut a node off."""
        cluster = self.server
        assert isinstance(cluster, PartitionableCluster)
        if act == "node":
            stream = next(self._leaders)
            try:
                info = await self.client._bus.js.stream_info(stream)
                name = info.cluster.leader if info.cluster else None
            except Exception:  # no leader to ask right now: any node will do
                name = None
            name = name if name in cluster.nodes else rnd.choice(list(cluster.nodes))
            self.harm.append((time.time_ns(), 0, f"node {name} killed (leader of {stream})"))
            cluster.kill(name)
            await asyncio.sleep(3.0)  # the harm itself: a node down this long
            cluster.spawn(name)
            self.harm.append((time.time_ns(), 0, f"node {name} restarted"))
        else:
            name = rnd.choice(list(cluster.nodes))
            self.harm.append((time.time_ns(), 0, f"node {name} cut off"))
            cluster.partition(name)
            await asyncio.sleep(self.config.partition_s)  # the harm itself: a partition this long
            cluster.heal(name)
            self.harm.append((time.time_ns(), 0, f"node {name} healed"))

    def resumed_from_a_stall(self, entry: Entry) -> bool:
        """Whether ``entry``'s worker came back from a stop shortly before it (a stale pass may
        finish the code it was in: its step, or the code between two steps)."""
        return any(
            pid == entry.pid and what == "resumed" and ns <= entry.ns <= ns + 60_000_000_000
            for ns, pid, what in self.harm
        )

    def explains(self, earlier: Entry, later: Entry) -> bool:
        """Whether harm done between two executions of a step explains the second: the first's
        worker was killed or stopped, or the server was killed (a commit lost on the way)."""
        return any(
            earlier.ns - 1_000_000_000 <= ns <= later.ns and pid in (0, earlier.pid)
            for ns, pid, what in self.harm
            if what != "resumed" and not what.endswith(("restarted", "healed"))
        )


async def send_load(client: meshflow.Client, config: Config, rnd: random.Random) -> tuple[list[str], int]:
    """Send ``config.events`` events over ``config.load_s`` seconds, a few resent a little later;
    the ids the stream acknowledged, and how many were sent twice."""
    acked: list[str] = []
    resent = 0
    batch = 5
    pause = config.load_s / max(1, config.events / batch)
    later: list[meshflow.Event] = []
    for start in range(0, config.events, batch):
        events = [meshflow.Event(name=CHAOS_EVENT, data={"i": i}) for i in range(start, start + batch)]
        events = events[: config.events - start]
        again = later[:]
        later = [e for e in events if rnd.random() < config.resend]
        try:
            await client.send(events + again)
        except meshflow.MeshflowError:
            continue  # not acknowledged: nothing is promised for these
        acked += [e.id for e in events]
        resent += len(again)
        await asyncio.sleep(pause)  # the load's pace, not a synchronisation
    return acked, resent


async def drain(
    client: meshflow.Client, run_ids: list[str], deadline_s: float
) -> dict[str, meshflow.Run | None]:
    """Wait (up to ``deadline_s``) until every run has ended; each run's last state, None if none."""
    runs: dict[str, meshflow.Run | None] = dict.fromkeys(run_ids)
    todo = set(run_ids)
    end = time.monotonic() + deadline_s
    while todo and time.monotonic() < end:
        for run_id in list(todo):
            try:
                run = await client.get_run(run_id)
            except meshflow.RunNotFoundError:
                continue
            except meshflow.NatsError:
                break
            runs[run_id] = run
            if run.finished:
                todo.discard(run_id)
        if todo:
            await asyncio.sleep(0.5)  # polling with a deadline
    return runs


def check(
    acked: list[str],
    resent: int,
    runs: dict[str, meshflow.Run | None],
    ledger: Ledger,
    nemesis: Nemesis,
    times: tuple[float, float],
) -> Report:
    """What the ledger and the runs say about each guarantee."""
    lines = ledger.lines()
    starts: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    ends: dict[tuple[str, str], list[int]] = defaultdict(list)
    returned: dict[str, list[Entry]] = defaultdict(list)
    for entry in lines:
        if entry.what == "start":
            starts[(entry.run, entry.step)].append(entry)
        elif entry.what == "end":
            ends[(entry.run, entry.step)].append(entry.ns)
        elif entry.what == "returned":
            returned[entry.run].append(entry)
    twice, again_after_harm = _returned_again(returned, nemesis)
    again = early = re_exec = explained = 0
    missing: dict[str, int] = {}
    for fn in CHAOS_FUNCTIONS:
        run_ids = [fn.run_id_for(e) for e in acked]
        missing[fn.full_id] = sum(1 for r in run_ids if not _finished(runs.get(r)))
        for run_id in run_ids:
            again += _repeats_after_moving_on(starts, run_id, CHAOS_STEPS[fn.full_id])
            if fn.full_id == "faults-alpha":
                early += _early_wakes(starts, ends, run_id)
            for name in CHAOS_STEPS[fn.full_id]:
                ordered = sorted(starts.get((run_id, name), []), key=lambda e: e.ns)
                for earlier, later in itertools.pairwise(ordered):
                    re_exec += 1
                    explained += nemesis.explains(earlier, later)
    return Report(
        acknowledged_events=len(acked),
        resent_events=resent,
        runs_expected=len(acked) * len(CHAOS_FUNCTIONS),
        events_without_a_finished_run=missing,
        runs_finished_twice=twice,
        runs_finished_again_after_harm=again_after_harm,
        committed_steps_run_again=again,
        early_wakes=early,
        runs_unfinished_after_drain=sum(1 for r in runs.values() if not _finished(r)),
        step_executions=sum(len(v) for v in starts.values()),
        re_executions=re_exec,
        re_executions_explained=explained,
        re_executions_unexplained=re_exec - explained,
        nemesis=nemesis.log(),
        load_s=round(times[0], 1),
        drain_s=round(times[1], 1),
    )


def _returned_again(returned: dict[str, list[Entry]], nemesis: Nemesis) -> tuple[int, int]:
    """Bodies that returned again: with no harm to explain it, and after harm.

    Replay runs a body again after a crash between its return and the write of its record: harm
    to the first returner (or to the server) explains that; and a stalled pass may finish the
    code it was in when it stopped (after its last step: the return). A body returning again with
    neither is a pass that went on after another had taken its run over."""
    twice = after_harm = 0
    for entries in returned.values():
        for first, later in itertools.pairwise(sorted(entries, key=lambda e: e.ns)):
            if nemesis.explains(first, later) or nemesis.resumed_from_a_stall(later):
                after_harm += 1
            else:
                twice += 1
    return twice, after_harm


def _finished(run: meshflow.Run | None) -> bool:
    return run is not None and run.finished


def _repeats_after_moving_on(
    starts: dict[tuple[str, str], list[Entry]], run_id: str, steps: list[str]
) -> int:
    """Executions of a step that started after the run's next step had started (so after the
    step was committed): a committed step run again."""
    count = 0
    for here, after in itertools.pairwise(steps):
        followers = starts.get((run_id, after), [])
        if followers:
            moved_on = min(e.ns for e in followers)
            count += sum(1 for e in starts.get((run_id, here), []) if e.ns > moved_on)
    return count


def _early_wakes(
    starts: dict[tuple[str, str], list[Entry]], ends: dict[tuple[str, str], list[int]], run_id: str
) -> int:
    """Starts of a3 before the nap after a2 could have ended (a2's first end plus the nap)."""
    if not ends.get((run_id, "a2")):
        return 0
    slept_from = min(ends[(run_id, "a2")])
    return sum(1 for e in starts.get((run_id, "a3"), []) if e.ns < slept_from + NAP_MS * 1_000_000)


async def run(config: Config, tmp: Path) -> Report:
    """One fault-injection run in ``tmp`` (the server's store, the ledger, the workers' logs)."""
    rnd = random.Random(config.seed)
    server: EmbeddedServer | PartitionableCluster
    if config.cluster:
        server = PartitionableCluster(tmp / "cluster")
        server.start()
        urls, auth, password = server.client_urls, server.admin, server.passwords["ADMIN"]
    else:
        server = EmbeddedServer(tmp / "nats").start()
        urls, auth, password = [server.url], None, ""
    ledger = Ledger(tmp / "ledger")
    gate = tmp / "gate"
    gate.touch()  # the stall test's gated step never waits here
    workers: list[Worker] = []
    count = iter(range(10_000))

    def spawn() -> Worker:
        log = tmp / f"worker-{next(count)}.log"
        nats = ",".join(urls)
        return Worker(nats, NAMESPACE, ledger.path, gate, log, ack_wait=config.ack_wait, password=password)

    try:
        replicas = 3 if config.cluster else None
        async with meshflow.connect(urls, namespace=NAMESPACE, auth=auth, replicas=replicas) as client:
            workers.extend(spawn() for _ in range(config.workers))
            await _registered(client)
            nemesis = Nemesis(config, server, spawn, workers, client)
            started = time.monotonic()
            harm = asyncio.ensure_future(nemesis.run(rnd, started + config.load_s))
            acked, resent = await send_load(client, config, rnd)
            await harm
            loaded = time.monotonic()
            run_ids = [fn.run_id_for(e) for fn in CHAOS_FUNCTIONS for e in acked]
            runs = await drain(client, run_ids, config.drain_s)
            drained = time.monotonic()
        return check(acked, resent, runs, ledger, nemesis, (loaded - started, drained - loaded))
    finally:
        for worker in workers:
            worker.stop()
        server.stop()


async def _registered(client: meshflow.Client) -> None:
    wanted = {fn.full_id for fn in CHAOS_FUNCTIONS}
    end = time.monotonic() + 60
    while not wanted <= {f.full_id for f in await client.functions()}:
        if time.monotonic() > end:
            raise TimeoutError("no worker registered the chaos functions within 60 s")
        await asyncio.sleep(0.1)  # polling with a deadline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.chaos", description=__doc__.split("\n\n")[0]
    )
    defaults = Config()
    for f in dataclasses.fields(Config):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.removesuffix("_s").replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=f.name, action="store_true")
        else:
            parser.add_argument(flag, dest=f.name, type=type(value), default=value)
    config = Config(**vars(parser.parse_args(argv)))
    configure_logging("warning")  # the report alone goes to stdout
    with tempfile.TemporaryDirectory(prefix="meshflow-chaos-") as tmp:
        report = asyncio.run(run(config, Path(tmp)))
    result = {"config": dataclasses.asdict(config), **dataclasses.asdict(report), "broken": report.broken}
    print(json.dumps(result, indent=2))
    return 1 if report.broken else 0


if __name__ == "__main__":
    sys.exit(main())
