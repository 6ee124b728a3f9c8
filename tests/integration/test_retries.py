"""Retries: backoff, NonRetriableError, catchable StepError, and on_failure running once."""

from __future__ import annotations

import time
from collections import Counter

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until

FAST = meshflow.Retry(retries=3, backoff=("300ms", "600ms"), jitter=0.0)


async def test_a_step_failing_twice_is_retried_with_the_configured_backoff(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("backoff")
    attempts: list[float] = []

    def flaky() -> int:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("upstream unavailable")
        return len(attempts)

    @app.function("flaky", trigger="flaky/go", retries=FAST)
    async def fn(ctx: meshflow.Context) -> int:
        return int(await ctx.step.run("call-upstream", flaky))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="flaky/go")
        await client.send(event)
        run = await client.wait_for_run(fn.run_id_for(event))

    assert run.status is meshflow.RunStatus.COMPLETED
    assert run.output == 3
    assert attempts[1] - attempts[0] >= 0.3
    assert attempts[2] - attempts[1] >= 0.6
    assert run.steps[0].attempts == 3


async def test_non_retriable_error_fails_the_run_at_once(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("nonretry")
    calls = Counter[str]()

    def reject() -> None:
        calls["reject"] += 1
        raise meshflow.NonRetriableError("card declined")

    @app.function("charge", trigger="card/charge", retries=FAST)
    async def fn(ctx: meshflow.Context) -> None:
        await ctx.step.run("charge-card", reject)

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="card/charge")
        await client.send(event)
        run = await client.wait_for_run(fn.run_id_for(event))

    assert run.status is meshflow.RunStatus.FAILED
    assert calls["reject"] == 1
    assert run.error is not None
    assert run.error.type == "StepError"
    assert "card declined" in run.error.message
    assert run.steps[0].status == "failed"
    assert run.steps[0].attempts == 1


async def test_an_exhausted_step_raises_a_step_error_the_function_can_catch(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("catch")

    def always_fails() -> None:
        raise ValueError("bad row 7")

    @app.function("import", trigger="csv/import", retries=meshflow.Retry(retries=1, backoff=("100ms",)))
    async def fn(ctx: meshflow.Context) -> dict[str, str]:
        try:
            await ctx.step.run("parse", always_fails)
        except meshflow.StepError as exc:
            return {"step": exc.step_id, "type": exc.error_type, "message": exc.error_message}
        return {"step": "none"}

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="csv/import")
        await client.send(event)
        run = await client.wait_for_run(fn.run_id_for(event))

    assert run.status is meshflow.RunStatus.COMPLETED
    assert run.output == {"step": "parse", "type": "ValueError", "message": "bad row 7"}
    assert run.steps[0].attempts == 2


async def test_on_failure_runs_once_with_the_original_event_and_error(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("failing")
    handled: list[dict[str, object]] = []

    async def on_failure(ctx: meshflow.Context) -> None:
        handled.append(ctx.event.data)

    @app.function(
        "doomed",
        trigger="doom/go",
        retries=meshflow.Retry(retries=1, backoff=("100ms",)),
        on_failure=on_failure,
    )
    async def doomed(ctx: meshflow.Context) -> None:
        raise RuntimeError(f"no luck for {ctx.event.data['who']}")

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="doom/go", data={"who": "ada"})
        await client.send(event)
        run = await client.wait_for_run(doomed.run_id_for(event))
        assert run.status is meshflow.RunStatus.FAILED
        assert run.attempt == 1  # one function-level retry, then it failed for good
        assert doomed.on_failure is not None
        failure_run = await client.wait_for_run(doomed.on_failure.run_id_for(f"{run.id}:failed"))
        assert failure_run.status is meshflow.RunStatus.COMPLETED
        # Another failing run's handler finishing shows no duplicate was pending for the first.
        second = meshflow.Event(name="doom/go", data={"who": "bob"})
        await client.send(second)
        second_run = await client.wait_for_run(doomed.run_id_for(second))
        await client.wait_for_run(doomed.on_failure.run_id_for(f"{second_run.id}:failed"))
        await wait_until(lambda: len(handled) == 2)

    first = next(h for h in handled if h["run_id"] == run.id)
    assert first["function_id"] == "failing-doomed"
    assert first["event"]["data"] == {"who": "ada"}  # type: ignore[index]
    assert "no luck for ada" in first["error"]["message"]  # type: ignore[index]
    assert [h["run_id"] for h in handled].count(run.id) == 1


async def test_a_step_can_have_its_own_retry_policy(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("own")
    calls: list[str] = []

    def down() -> None:
        calls.append("x")
        raise RuntimeError("still down")

    @app.function("own", trigger="own/go", retries=FAST)
    async def own(ctx: meshflow.Context) -> str:
        try:
            await ctx.step.run("fragile", down, retries=meshflow.Retry(retries=1, backoff=("50ms",)))
        except meshflow.StepError:
            return "gave up"
        return "ok"

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="own/go")
        await client.send(event)
        run = await client.wait_for_run(own.run_id_for(event))
    assert run.output == "gave up"
    assert len(calls) == 2  # its own 1 retry, not the function's 3
