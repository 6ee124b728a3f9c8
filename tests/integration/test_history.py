"""Attempt history through the client: every attempt of a step with its error, when and where it
ran, readable while the step still retries; the function's own attempts on the run."""

from __future__ import annotations

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until


async def test_a_step_that_fails_twice_then_succeeds_shows_each_attempt_and_its_error(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("hist")
    calls = [0]

    def charge() -> str:
        calls[0] += 1
        if calls[0] <= 2:
            raise ConnectionError(f"card service down ({calls[0]})")
        return "charged"

    @app.function("pay", trigger="hist/pay", retries=meshflow.Retry(retries=3, backoff=("300ms", "1500ms")))
    async def pay(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("charge", charge))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace, worker_id="w-hist") as worker:
        event = meshflow.Event(name="hist/pay")
        await client.send(event)
        run_id = pay.run_id_for(event)

        async def retrying_twice() -> meshflow.StepInfo | None:
            try:
                run = await client.get_run(run_id)
            except meshflow.RunNotFoundError:
                return None
            step = next((s for s in run.steps if s.id == "charge"), None)
            return step if step is not None and len(step.history) == 2 else None

        waiting = await wait_until(retrying_twice, timeout=20, message="the step retries after two failures")
        assert waiting.status == "retrying"  # readable while it waits for its next attempt
        done = await client.wait_for_run(run_id, timeout=30)
        assert worker.id == "w-hist"

    [step] = done.steps
    assert (step.status, step.attempts) == ("completed", 3)
    assert [a.attempt for a in step.history] == [1, 2, 3]
    assert [a.error.message if a.error else None for a in step.history] == [
        "card service down (1)",
        "card service down (2)",
        None,
    ]
    assert {a.worker for a in step.history} == {"w-hist"}
    assert all(a.started_at <= (a.ended_at or 0) for a in step.history)
    assert step.history[1].started_at - (step.history[0].ended_at or 0) >= 300  # the backoff shows
    assert "ConnectionError" in (step.history[0].error.traceback if step.history[0].error else "")


async def test_function_level_retries_are_on_the_run(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("hist")
    calls = [0]

    @app.function("body", trigger="hist/body", retries=meshflow.Retry(retries=1, backoff=("200ms",)))
    async def body(ctx: meshflow.Context) -> str:
        calls[0] += 1
        if calls[0] == 1:
            raise KeyError("missing on the first try")
        return "ok"

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="hist/body")
        await client.send(event)
        run = await client.wait_for_run(body.run_id_for(event), timeout=30)
    assert run.output == "ok"
    [first] = run.history
    assert first.attempt == 1
    assert first.error is not None
    assert first.error.type == "KeyError"
