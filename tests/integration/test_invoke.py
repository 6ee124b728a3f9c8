"""invoke (child runs) and send_event (events sent once from a run)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import meshflow
from meshflow.server import EmbeddedServer

FAST = meshflow.Retry(retries=2, backoff=("100ms",), jitter=0.0)


def billing_app() -> tuple[meshflow.App, meshflow.Function, meshflow.Function]:
    app = meshflow.App("billing")

    @app.function("price", trigger="billing/price-requested", retries=0)
    async def price(ctx: meshflow.Context) -> dict[str, Any]:
        items = ctx.event.data["items"]
        if not items:
            raise ValueError("an order needs at least one item")
        return {"total": await ctx.step.run("sum", lambda: sum(items))}

    @app.function("checkout", trigger="billing/checkout", retries=0)
    async def checkout(ctx: meshflow.Context) -> Any:
        try:
            quote = await ctx.step.invoke("quote", function=price, data={"items": ctx.event.data["items"]})
        except meshflow.StepError as exc:
            return {"error": exc.error_type, "message": exc.error_message}
        return {"charged": quote["total"]}

    return app, price, checkout


async def test_invoke_returns_the_child_runs_output_and_the_child_shows_its_parent(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, _, checkout = billing_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="billing/checkout", data={"items": [3, 4]})
        await client.send(event)
        run = await client.wait_for_run(checkout.run_id_for(event), timeout=20)
        assert run.output == {"charged": 7}
        quote = next(s for s in run.steps if s.id == "quote")
        assert quote.kind == "invoke"
        assert quote.child_run_id is not None
        child = await client.get_run(quote.child_run_id)
    assert child.status is meshflow.RunStatus.COMPLETED
    assert child.parent_id == run.id
    assert child.events[0].name == "meshflow/function.invoked"
    assert child.events[0].data == {"items": [3, 4]}


async def test_a_failed_child_raises_step_error_with_its_error(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, _, checkout = billing_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="billing/checkout", data={"items": []})
        await client.send(event)
        run = await client.wait_for_run(checkout.run_id_for(event), timeout=20)
    assert run.output == {"error": "ValueError", "message": "an order needs at least one item"}


async def test_an_invoke_times_out_when_no_worker_serves_the_child(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    """The child's function is registered (its worker has gone), so the child waits: the
    parent's timeout ends the step."""
    other = meshflow.App("reports")

    @other.function("render", trigger="reports/render")
    async def render(ctx: meshflow.Context) -> str:
        return "pdf"

    async with meshflow.Worker(other, nats=nats_server.url, namespace=namespace):
        pass  # registers reports-render, then goes away

    app = meshflow.App("ops")

    @app.function("monthly", trigger="ops/month-closed", retries=0)
    async def monthly(ctx: meshflow.Context) -> str:
        try:
            return str(await ctx.step.invoke("render", function="reports-render", timeout="1s"))
        except meshflow.StepError as exc:
            return exc.error_type

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="ops/month-closed")
        await client.send(event)
        run = await client.wait_for_run(monthly.run_id_for(event), timeout=20)
    assert run.output == "InvokeTimeoutError"


async def test_invoking_another_apps_function_by_id(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    other = meshflow.App("reports")

    @other.function("render", trigger="reports/render")
    async def render(ctx: meshflow.Context) -> str:
        return f"pdf for {ctx.event.data['month']}"

    app = meshflow.App("ops")

    @app.function("monthly", trigger="ops/month-closed")
    async def monthly(ctx: meshflow.Context) -> Any:
        return await ctx.step.invoke("render", function="reports-render", data={"month": "2026-10"})

    async with (
        meshflow.Worker(other, nats=nats_server.url, namespace=namespace),
        meshflow.Worker(app, nats=nats_server.url, namespace=namespace),
    ):
        event = meshflow.Event(name="ops/month-closed")
        await client.send(event)
        run = await client.wait_for_run(monthly.run_id_for(event), timeout=20)
    assert run.output == "pdf for 2026-10"


async def test_invoking_an_unknown_function_fails_the_step_clearly(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("ops")

    @app.function("typo", trigger="ops/typo", retries=0)
    async def typo(ctx: meshflow.Context) -> Any:
        return await ctx.step.invoke("render", function="reprots-render")

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="ops/typo")
        await client.send(event)
        run = await client.wait_for_run(typo.run_id_for(event), timeout=20)
    assert run.status is meshflow.RunStatus.FAILED
    assert run.error is not None
    assert "FunctionNotFoundError" in run.error.message
    assert "reprots-render" in run.error.message


async def test_send_event_in_a_retried_run_sends_once(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("mail")
    attempts: Counter[str] = Counter()
    received: Counter[str] = Counter()

    @app.function("signup", trigger="user/signup", retries=FAST)
    async def signup(ctx: meshflow.Context) -> list[str]:
        ids = await ctx.step.send_event(
            "welcome", meshflow.Event(name="mail/welcome", data={"to": ctx.event.data["email"]})
        )

        def flaky() -> None:
            attempts["later"] += 1
            if attempts["later"] < 3:
                raise RuntimeError("the CRM is down")

        await ctx.step.run("crm", flaky)
        if ctx.attempt == 0:
            raise RuntimeError("the function body fails once after sending")
        return ids

    @app.function("welcome", trigger="mail/welcome")
    async def welcome(ctx: meshflow.Context) -> None:
        received[ctx.event.data["to"]] += 1

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="user/signup", data={"email": "a@example.com"})
        await client.send(event)
        run = await client.wait_for_run(signup.run_id_for(event), timeout=20)
        assert run.status is meshflow.RunStatus.COMPLETED
        [sent_id] = run.output
        await client.wait_for_run(welcome.run_id_for(sent_id), timeout=20)
    assert received == {"a@example.com": 1}
    assert attempts["later"] == 3


async def test_an_invoked_run_gets_its_functions_timeouts_and_its_cancellation_fails_the_parent_step(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("slowpoke")

    @app.function("child", trigger="slow/never-sent", timeouts=meshflow.Timeouts(finish="1s"))
    async def child(ctx: meshflow.Context) -> str:
        await ctx.step.sleep("nap", "1h")
        return "late"

    @app.function("parent", trigger="slow/start", retries=0)
    async def parent(ctx: meshflow.Context) -> Any:
        try:
            return await ctx.step.invoke("call", function=child)
        except meshflow.StepError as exc:
            return [exc.error_type, exc.error_message]

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="slow/start")
        await client.send(event)
        run = await client.wait_for_run(parent.run_id_for(event), timeout=20)
    assert run.output == ["Cancelled", "timed out: not finished within 1s"]
