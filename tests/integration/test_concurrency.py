"""Concurrency limits across worker processes: never more than the limit of a key's runs execute
steps at once; sleeping runs hold no slot; a killed worker's slots free within its lease."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

from structlog.testing import capture_logs

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import registered, wait_until

from .apps import limited
from .test_crash import WorkerProcess, workers  # noqa: F401 - the fixture is used by name


def overlaps(ledger: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Per key: the most steps executing at once, and the most runs between their first step's
    start and their last step's end (which includes their sleep)."""
    rows = [line.split() for line in ledger.read_text().splitlines() if len(line.split()) == 4]
    executing: dict[str, int] = defaultdict(int)
    most: dict[str, int] = defaultdict(int)
    for _, key, what, _ in sorted(rows, key=lambda r: (int(r[0]), r[2] == "start")):
        executing[key] += 1 if what == "start" else -1
        most[key] = max(most[key], executing[key])
    spans: dict[tuple[str, str], list[int]] = defaultdict(list)
    for ns, key, _, run in rows:
        spans[(key, run)].append(int(ns))
    edges = sorted(
        [(min(t), 1, key) for (key, _), t in spans.items()]
        + [(max(t), -1, key) for (key, _), t in spans.items()]
    )
    alive: dict[str, int] = defaultdict(int)
    most_alive: dict[str, int] = defaultdict(int)
    for _, delta, key in edges:
        alive[key] += delta
        most_alive[key] = max(most_alive[key], alive[key])
    return dict(most), dict(most_alive)


async def test_three_workers_never_run_more_than_three_steps_of_a_key_at_once(
    nats_server: EmbeddedServer,
    namespace: str,
    client: meshflow.Client,
    workers: list[WorkerProcess],  # noqa: F811
    tmp_path: Path,
) -> None:
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    for _ in range(3):
        workers.append(WorkerProcess(nats_server.url, namespace, ledger, gate))

    await registered(client, limited)
    events = [meshflow.Event(name="limited/go", data={"key": "ab"[i % 2]}) for i in range(50)]
    await client.send(events)
    runs = [await client.wait_for_run(limited.run_id_for(e), timeout=90, steps=False) for e in events]
    assert {r.status for r in runs} == {meshflow.RunStatus.COMPLETED}
    executing, alive = overlaps(ledger)
    assert executing == {"a": 3, "b": 3}  # each key its own 3, never a 4th
    assert alive["a"] > 3  # runs sleeping between their steps held no slot
    assert alive["b"] > 3


async def test_a_killed_workers_slots_free_within_its_lease(
    nats_server: EmbeddedServer,
    namespace: str,
    client: meshflow.Client,
    workers: list[WorkerProcess],  # noqa: F811
    tmp_path: Path,
) -> None:
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    first = WorkerProcess(nats_server.url, namespace, ledger, gate)
    workers.append(first)

    await registered(client, limited)
    blocked = [meshflow.Event(name="limited/go", data={"key": "k", "block": True}) for _ in range(3)]
    await client.send(blocked)

    def all_blocked() -> bool:
        return ledger.exists() and ledger.read_text().count("block-start") == 3

    await wait_until(all_blocked, timeout=30, message="three runs hold the three slots")
    waiting = [meshflow.Event(name="limited/go", data={"key": "k"}) for _ in range(2)]
    await client.send(waiting)
    first.kill()  # kill -9 with all three slots held
    gate.touch()
    for _ in range(2):
        workers.append(WorkerProcess(nats_server.url, namespace, ledger, gate))
    runs = [
        await client.wait_for_run(limited.run_id_for(e), timeout=60, steps=False) for e in blocked + waiting
    ]
    assert {r.status for r in runs} == {meshflow.RunStatus.COMPLETED}
    executing, _ = overlaps(ledger)
    assert executing["k"] <= 3 + 3  # the killed worker's 3 never ended; the rest never exceeded 3


async def test_steps_a_run_awaits_together_each_take_a_slot_while_slots_are_free(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """Limit 2, one run. Two parallel steps execute side by side (each returns only once the
    other has started); of three parallel steps, never more than two execute at once."""
    app = meshflow.App("parallel")
    started = {name: asyncio.Event() for name in "ab"}
    executing, most = [0], [0]

    async def meet(name: str, other: str) -> str:
        started[name].set()
        await asyncio.wait_for(started[other].wait(), timeout=10)
        return name

    async def busy(name: str) -> str:
        executing[0] += 1
        most[0] = max(most[0], executing[0])
        # hold every step until one has been told to wait: the first two then execute side by side
        await wait_until(lambda: waited(logs), timeout=20, message="a step waits for a slot")
        executing[0] -= 1
        return name

    @app.function("fan", trigger="parallel/go", concurrency=meshflow.Concurrency(limit=2), retries=0)
    async def fan(ctx: meshflow.Context) -> list[str]:
        met = await asyncio.gather(ctx.step.run("a", meet, "a", "b"), ctx.step.run("b", meet, "b", "a"))
        done = await asyncio.gather(*(ctx.step.run(n, busy, n) for n in "cde"))
        return [*met, *done]

    with capture_logs() as logs:
        async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
            event = meshflow.Event(name="parallel/go")
            await client.send(event)
            run = await client.wait_for_run(fan.run_id_for(event), timeout=60)
    assert run.output == ["a", "b", "c", "d", "e"]
    assert most[0] == 2  # the limit: the third waited for a slot
    assert waited(logs) == 1


def waited(logs: list[dict[str, object]]) -> int:
    """How many steps were told to wait for their pass's concurrency slot."""
    return sum(1 for entry in logs if entry["event"] == "step waits for its pass's concurrency slot")
