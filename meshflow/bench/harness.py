"""One run of one workload: its namespace, its worker process, its deadline and its CPU meter.

Each run gets a namespace of its own (``b{token}{workload}r{k}``, the token unique to the
invocation), starts one worker for the workload's app, waits until the worker has registered
its functions, then runs the workload body. Whatever happens, the worker is stopped and the
namespace's streams are deleted afterwards. Every wait inside a body is bounded by the run's
deadline; a body that hits it returns what it measured with ``incomplete`` set.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import meshflow
from meshflow.events import Event
from meshflow.names import Names
from meshflow.runs import RunRecord

from .admin import Admin
from .procs import BenchError, CpuMeter, WorkerProcess

REGISTER_TIMEOUT = 30.0
#: Polling for outputs: how many runs are polled at once, and how often one is polled.
POLL_WINDOW = 16
POLL_INTERVAL = 0.025


@dataclass(frozen=True)
class Target:
    """The server under test and what every workload run shares."""

    url: str
    server_pid: int | None
    admin: Admin
    logs: Path
    token: str
    scale: float
    trace: Path | None = None  # --trace: where the workers say how many spans they exported
    metrics: bool = False  # --metrics: workers serve /metrics and count every run


@dataclass
class Measured:
    """What one run of a workload measured."""

    figures: dict[str, float]
    incomplete: bool = False
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class Ctx:
    """What a workload body gets: the client, the worker, the namespace and the deadline."""

    target: Target
    client: meshflow.Client
    worker: WorkerProcess
    names: Names
    deadline: float  # on the event loop's clock
    meter: CpuMeter

    def n(self, base: int, minimum: int = 5) -> int:
        """``base`` items scaled by ``--scale`` (at least ``minimum``)."""
        return max(minimum, round(base * self.target.scale))

    def remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    async def send(self, events: Event | list[Event]) -> bool:
        """Send within the workload's deadline; False when the deadline passed first."""
        try:
            await asyncio.wait_for(self.client.send(events), self.remaining())
        except TimeoutError:
            return False
        return True

    def begin(self) -> None:
        """Restart the CPU meter: what came before (building events) is not the workload."""
        self.meter = CpuMeter(_pids(self.target, self.worker))


def _pids(target: Target, worker: WorkerProcess) -> dict[str, int | None]:
    return {"worker": worker.pid, "server": target.server_pid, "driver": os.getpid()}


Body = Callable[[Ctx], Awaitable[Measured]]


async def with_worker(
    target: Target,
    workload: str,
    k: int,
    app: str,
    functions: Collection[meshflow.Function],
    body: Body,
    limit: float,
) -> Measured:
    """Run ``body`` once with a fresh namespace and a worker serving ``meshflow.bench.apps:app``."""
    names = Names(f"b{target.token}{workload.lower()}r{k}")
    worker = WorkerProcess(
        f"meshflow.bench.apps:{app}",
        target.url,
        names.ns,
        target.logs / f"worker-{names.ns}.log",
        metrics=target.metrics,
    )
    try:
        async with meshflow.connect(target.url, namespace=names.ns) as client:
            worker.start()
            await worker.wait_registered(client, {f.full_id for f in functions}, REGISTER_TIMEOUT)
            ctx = Ctx(
                target=target,
                client=client,
                worker=worker,
                names=names,
                deadline=asyncio.get_running_loop().time() + limit,
                meter=CpuMeter(_pids(target, worker)),
            )
            try:
                result = await body(ctx)
            except Exception as exc:
                if worker.exited() is None:
                    raise
                raise BenchError(f"{exc!r}; the worker had exited:\n{worker.log_tail()}") from exc
            result.cpu = ctx.meter.read()
    finally:
        await worker.stop()
        await target.admin.delete_namespace(names)
    if target.trace is not None:
        from .traced import spans_made

        spans = spans_made(target.trace, worker.pid)
        if spans is not None:
            result.figures["spans"] = spans
    return result


async def wait_outputs(
    ctx: Ctx, run_ids: Sequence[str], *, interval: float = POLL_INTERVAL
) -> dict[str, tuple[float, RunRecord]]:
    """Poll runs until each is finished or the deadline passes; return (monotonic time, record).

    `POLL_WINDOW` pollers share the list, each polling one run until it finishes, so at most
    ``POLL_WINDOW / interval`` reads a second go to the server while nothing finishes.
    """
    loop = asyncio.get_running_loop()
    finished: dict[str, tuple[float, RunRecord]] = {}
    todo = iter(run_ids)

    async def poller() -> None:
        for run_id in todo:  # the iterator is shared: each run is taken by one poller
            while True:
                # The run record alone says whether its output is readable; `client.get_run`
                # would also load every step memo, an extra read per poll.
                got = await ctx.client._store.get_run(run_id)
                if got is not None and got[0].status.terminal:
                    finished[run_id] = (time.monotonic(), got[0])
                    break
                if loop.time() + interval > ctx.deadline:
                    return
                await asyncio.sleep(interval)

    await asyncio.gather(*(poller() for _ in range(min(POLL_WINDOW, len(run_ids)))))
    return finished
