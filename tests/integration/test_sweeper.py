"""Runs that outlive their messages: the sweeper (one worker at a time) finds them and wakes them."""

from __future__ import annotations

import meshflow
from meshflow.durations import now_ms
from meshflow.ids import step_hash
from meshflow.server import EmbeddedServer
from meshflow.sweeper import Sweeper
from meshflow.testing import wait_until

app = meshflow.App("sweep")


@app.function("napper", trigger="sweep/go")
async def napper(ctx: meshflow.Context) -> str:
    await ctx.step.sleep("nap", "1500ms")
    return "woke"


async def test_a_sleeping_run_whose_schedule_is_gone_is_woken_by_the_sweeper(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    event = meshflow.Event(name="sweep/go")
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace) as first:
        await client.send(event)
        run = await client.wait_for_run(napper.run_id_for(event), until=meshflow.RunStatus.SLEEPING)
        await first.bus.cancel_timer(run.id, step_hash("nap"))  # as if it expired, or a bad restore lost it
    # the worker that armed its local timer is gone too: nothing will wake the run now
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace) as second:
        [nap] = run.pending
        await wait_until(lambda: now_ms() > nap.until, timeout=10, message="the nap is overdue")
        assert (await client.get_run(run.id)).status is meshflow.RunStatus.SLEEPING
        assert await second.sweeper.lead()
        assert await second.sweeper.sweep(grace_ms=0) == 1
        assert second.stats["runs_swept"] == 1  # what the worker counts (and will export)
        done = await client.wait_for_run(run.id, timeout=30)
        assert done.output == "woke"
        assert await second.sweeper.sweep(grace_ms=0) == 0  # a run that moved on is left alone


async def test_one_worker_at_a_time_sweeps_and_another_takes_over_when_its_lease_goes(
    nats_server: EmbeddedServer, namespace: str
) -> None:
    async with (
        meshflow.Worker(app, nats=nats_server.url, namespace=namespace) as one,
        meshflow.Worker(app, nats=nats_server.url, namespace=namespace) as two,
    ):
        first = Sweeper(one.store, one.bus, one.id)
        second = Sweeper(two.store, two.bus, two.id)
        assert await first.lead()
        assert not await second.lead()
        assert await first.lead()  # renewed by its holder
        await one.store.put_flow("sweeper", b"", (await one.store.get_flow("sweeper") or (b"", 0))[1], 1)
        assert await second.lead()  # the lease went (its holder died): the other leads now
        assert not await first.lead()
