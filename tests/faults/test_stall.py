"""A worker stalled past the ack wait (SIGSTOP: a GC or swap pause, a stopped VM) loses its runs to
another worker and, when it resumes, stops acting on them: it runs no further step, writes
nothing and acks nothing. At most the stalled step itself runs twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import registered, wait_until

from .apps import stall
from .procs import Ledger, Worker

ACK_WAIT = 2.0
RUNS = 3


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


class Scene:
    def __init__(self, server: EmbeddedServer, namespace: str, tmp: Path, workers: list[Worker]) -> None:
        self.server, self.namespace, self.tmp, self.workers = server, namespace, tmp, workers
        self.ledger = Ledger(tmp / "ledger")
        self.gate = tmp / "gate"

    def worker(self, name: str) -> Worker:
        worker = Worker(
            self.server.url,
            self.namespace,
            self.ledger.path,
            self.gate,
            self.tmp / f"{name}.log",
            ack_wait=ACK_WAIT,
        )
        self.workers.append(worker)
        return worker

    async def all_in(self, step: str, worker: Worker, run_ids: list[str]) -> None:
        def inside() -> bool:
            started = self.ledger.count("start", pid=worker.pid)
            return all(started[(r, step)] >= 1 for r in run_ids)

        await wait_until(inside, timeout=60, message=f"every run is inside {step} on worker {worker.pid}")


async def start_runs(client: meshflow.Client, scene: Scene, first: Worker) -> list[str]:
    await registered(client, stall)
    events = [meshflow.Event(name="faults/stall", data={"i": i}) for i in range(RUNS)]
    await client.send(events)
    run_ids = [stall.run_id_for(e) for e in events]
    await scene.all_in("b2", first, run_ids)
    return run_ids


def assert_committed_steps_ran_once(scene: Scene, run_ids: list[str]) -> None:
    ends = scene.ledger.count("end")
    returned = scene.ledger.count("returned")
    for run_id in run_ids:
        assert ends[(run_id, "b1")] == 1, "b1 was committed before the stall: it never runs again"
        assert ends[(run_id, "b3")] == 1, "b3 ran after b2 was committed: the stalled pass must not run it"
        assert returned[(run_id, "body")] == 1, "the function body returned more than once"


@pytest.mark.slow
async def test_a_stalled_worker_that_resumes_after_another_finished_its_runs_runs_no_step_again(
    nats_server: EmbeddedServer,
    namespace: str,
    client: meshflow.Client,
    workers: list[Worker],
    tmp_path: Path,
) -> None:
    scene = Scene(nats_server, namespace, tmp_path, workers)
    stalled = scene.worker("stalled")
    run_ids = await start_runs(client, scene, stalled)

    stalled.pause()  # mid-b2, past the ack wait: its runs go to the other worker
    other = scene.worker("other")
    scene.gate.touch()
    runs = [await client.wait_for_run(r, timeout=60) for r in run_ids]
    assert {r.status for r in runs} == {meshflow.RunStatus.COMPLETED}

    stalled.resume()  # its b2 ends now; it must find its runs lost and stop there

    def settled() -> bool:  # the stalled passes stopped, or one of them went on (the bug)
        again = scene.ledger.count("end", pid=stalled.pid)
        return stalled.logged("pass abandoned") >= RUNS or any(again[(r, "b3")] for r in run_ids)

    await wait_until(settled, timeout=30, message="the stalled passes stopped or went on")
    assert stalled.logged("pass abandoned: another pass holds the run") == RUNS  # each said so, once
    ends = scene.ledger.count("end")
    assert all(ends[(r, "b2")] == 2 for r in run_ids)  # the stalled step itself ran twice: allowed
    assert scene.ledger.count("end", pid=other.pid)[(run_ids[0], "b3")] == 1
    assert_committed_steps_ran_once(scene, run_ids)
    for run in [await client.get_run(r) for r in run_ids]:
        assert run.status is meshflow.RunStatus.COMPLETED
        assert run.output == "ok"


@pytest.mark.slow
async def test_a_stalled_worker_whose_runs_were_taken_by_a_worker_killed_since_leaves_them_to_finish(
    nats_server: EmbeddedServer,
    namespace: str,
    client: meshflow.Client,
    workers: list[Worker],
    tmp_path: Path,
) -> None:
    scene = Scene(nats_server, namespace, tmp_path, workers)
    stalled = scene.worker("stalled")
    run_ids = await start_runs(client, scene, stalled)

    stalled.pause()
    other = scene.worker("other")
    await scene.all_in("b2", other, run_ids)  # the other worker took every run over
    other.kill()  # and dies in b2: its lease runs out, its message waits for the ack wait
    stalled.resume()
    scene.gate.touch()

    runs = [await client.wait_for_run(r, timeout=60) for r in run_ids]
    assert {r.status for r in runs} == {meshflow.RunStatus.COMPLETED}
    assert stalled.logged("pass abandoned") >= RUNS  # it did not go on with runs it had lost
    assert_committed_steps_ran_once(scene, run_ids)
