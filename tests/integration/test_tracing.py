"""OpenTelemetry traces: a run's passes and its steps' attempts are spans in the sender's trace,
whichever pass and however the run goes on (retries, events it sends, child runs, on_failure)."""

from __future__ import annotations

import threading

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until
from tests.spans import Spans, attrs, parent_id, span_id, trace_id, tracing_off

FAST = meshflow.Retry(retries=2, backoff=("100ms",), jitter=0.0)


def failed_passes(spans: Spans, run_id: str) -> list[ReadableSpan]:
    return [s for s in spans.of_run(run_id, "process ") if attrs(s).get("meshflow.run.status") == "failed"]


async def test_a_runs_passes_and_step_attempts_join_the_senders_trace(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, spans: Spans
) -> None:
    """Two passes (a step fails once and is retried after a backoff), each a child of the
    sender's span; each step attempt a child of its pass, with the failed one's error recorded;
    and a user's span inside a sync step nests under the step's span."""
    app = meshflow.App("shop")
    tries: list[int] = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("payment gateway unavailable")
        return "charged"

    def render() -> str:
        with spans.tracer.start_as_current_span("render-receipt"):
            return threading.current_thread().name

    @app.function("checkout", trigger="shop/checkout", retries=FAST)
    async def checkout(ctx: meshflow.Context) -> list[str]:
        reserved = await ctx.step.run("reserve", lambda: "reserved")
        charged = await ctx.step.run("charge", flaky)
        thread = await ctx.step.run("receipt", render)
        return [reserved, charged, thread]

    event = meshflow.Event(name="shop/checkout", data={"order": 7})
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        with spans.tracer.start_as_current_span("http POST /checkout") as request:
            await client.send(event)
        run = await client.wait_for_run(checkout.run_id_for(event), timeout=20)
        await wait_until(lambda: len(spans.of_run(run.id, "process ")) == 2, message="both passes' spans")

    assert run.status is meshflow.RunStatus.COMPLETED
    assert run.output[2] != threading.current_thread().name  # the sync step ran in a thread
    sender = request.get_span_context().trace_id
    (send,) = spans.named(f"send {client.names.event_subject('shop/checkout')}")
    assert send.kind is SpanKind.PRODUCER
    assert parent_id(send) == request.get_span_context().span_id

    passes = sorted(spans.of_run(run.id, "process "), key=lambda s: s.start_time or 0)
    assert all(trace_id(p) == sender for p in passes)
    assert [parent_id(p) for p in passes] == [span_id(send)] * 2
    first, second = passes
    assert first.kind is SpanKind.CONSUMER
    assert first.name == f"process {checkout.full_id}"
    assert attrs(first)["messaging.system"] == "nats"
    assert attrs(first)["messaging.operation.type"] == "process"
    assert attrs(first)["messaging.destination.name"].endswith(".ev.shop.checkout")
    assert attrs(first)["messaging.message.id"] == event.id
    assert attrs(first)["meshflow.function_id"] == checkout.full_id
    assert attrs(first)["meshflow.wake"] == "trigger"
    assert attrs(first)["meshflow.run.status"] == "retrying"
    assert attrs(first)["code.function.name"].endswith("checkout")
    assert attrs(second)["meshflow.run.status"] == "completed"
    assert first.status.status_code is not StatusCode.ERROR  # the step failed, not the pass

    steps = spans.of_run(run.id, "step ")
    assert sorted((attrs(s)["meshflow.step_id"], attrs(s)["meshflow.attempt"]) for s in steps) == [
        ("charge", 1),
        ("charge", 2),
        ("receipt", 1),
        ("reserve", 1),
    ]
    assert all(trace_id(s) == sender for s in steps)
    by_attempt = {(attrs(s)["meshflow.step_id"], attrs(s)["meshflow.attempt"]): s for s in steps}
    for (step, attempt), span in by_attempt.items():
        parent = first if (step, attempt) in {("reserve", 1), ("charge", 1)} else second
        assert parent_id(span) == span_id(parent), (step, attempt)
        assert attrs(span)["meshflow.run_id"] == run.id
        assert attrs(span)["meshflow.function_id"] == checkout.full_id
    failed = by_attempt["charge", 1]
    assert failed.status.status_code is StatusCode.ERROR
    assert attrs(failed)["error.type"] == "ConnectionError"
    (exception,) = [e for e in failed.events if e.name == "exception"]
    assert (exception.attributes or {})["exception.message"] == "payment gateway unavailable"
    assert by_attempt["charge", 2].status.status_code is StatusCode.UNSET

    (user,) = spans.named("render-receipt")
    assert parent_id(user) == span_id(by_attempt["receipt", 1])


async def test_events_a_run_sends_and_its_children_and_on_failure_run_carry_its_trace(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, spans: Spans
) -> None:
    """``send_event`` and ``invoke`` start runs in the same trace, and so does the failure of
    the run: its pass records the error, and its ``on_failure`` run joins the trace."""
    app = meshflow.App("orders")
    handled: list[str] = []

    @app.function("price", trigger="orders/price")
    async def price(ctx: meshflow.Context) -> int:
        return int(await ctx.step.run("sum", lambda: 41 + 1))

    @app.function("notify", trigger="orders/placed")
    async def notify(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("email", lambda: "sent"))

    async def compensate(ctx: meshflow.Context) -> None:
        handled.append(str(await ctx.step.run("refund", lambda: ctx.event.data["run_id"])))

    @app.function("place", trigger="orders/place", retries=0, on_failure=compensate)
    async def place(ctx: meshflow.Context) -> None:
        await ctx.step.invoke("price", function=price)
        await ctx.step.send_event("placed", meshflow.Event(name="orders/placed", data={}))
        raise ValueError("stock ran out")

    event = meshflow.Event(name="orders/place")
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        with spans.tracer.start_as_current_span("place order") as root:
            await client.send(event)
        run = await client.wait_for_run(place.run_id_for(event), timeout=20)
        await wait_until(lambda: handled, message="the on_failure run")
        await wait_until(
            lambda: (
                {attrs(s)["meshflow.function_id"] for s in spans.all() if s.name.startswith("step ")}
                >= {price.full_id, notify.full_id}
            ),
            message="the child's and the notified run's steps",
        )
        await wait_until(lambda: failed_passes(spans, run.id), message="the failed pass")

    assert run.status is meshflow.RunStatus.FAILED
    sender = root.get_span_context().trace_id
    made_by_meshflow = [s for s in spans.all() if "meshflow.run_id" in attrs(s)]
    functions = {attrs(s)["meshflow.function_id"] for s in made_by_meshflow}
    assert {place.full_id, price.full_id, notify.full_id, f"{place.full_id}-failure"} <= functions, functions
    assert {trace_id(s) for s in made_by_meshflow} == {sender}

    (failed_pass,) = failed_passes(spans, run.id)
    assert failed_pass.status.status_code is StatusCode.ERROR
    assert attrs(failed_pass)["error.type"] == "ValueError"
    (exception,) = [e for e in failed_pass.events if e.name == "exception"]
    assert (exception.attributes or {})["exception.message"] == "stock ran out"
    assert "in place" in str((exception.attributes or {})["exception.stacktrace"])


async def test_runs_with_no_trace_to_join_start_their_own(
    nats_server: EmbeddedServer, namespace: str, spans: Spans
) -> None:
    """An event sent outside any span, and a cron tick: each run's passes share one new trace,
    rooted at the run's ``create`` span, and two runs never share one."""
    app = meshflow.App("clock")

    @app.function("tick", trigger=meshflow.TriggerCron("@every 1s"))
    async def tick(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("read", lambda: ctx.event.data["tick"]))

    @app.function("nap", trigger="clock/nap")
    async def nap(ctx: meshflow.Context) -> str:
        await ctx.step.sleep("nap", "100ms")
        return "rested"

    async with (
        meshflow.connect(nats_server.url, namespace=namespace) as untraced,
        meshflow.Worker(app, nats=nats_server.url, namespace=namespace),
    ):
        event = meshflow.Event(name="clock/nap")
        with tracing_off():  # the sender traces nothing
            await untraced.send(event)
        run = await untraced.wait_for_run(nap.run_id_for(event), timeout=20)
        await wait_until(lambda: len(spans.of_run(run.id, "process ")) == 2, message="both passes")
        await wait_until(
            lambda: [s for s in spans.all() if s.name == f"process {tick.full_id}"], message="a tick's pass"
        )

    (create,) = spans.of_run(run.id, "create ")
    assert create.parent is None
    assert create.kind is SpanKind.PRODUCER
    for p in spans.of_run(run.id, "process "):
        assert trace_id(p) == trace_id(create)
        assert parent_id(p) == span_id(create)
    tick_pass = next(s for s in spans.all() if s.name == f"process {tick.full_id}")
    tick_create = next(
        s for s in spans.all() if s.name == f"create {tick.full_id}" and trace_id(s) == trace_id(tick_pass)
    )
    assert tick_create.parent is None
    assert trace_id(tick_pass) != trace_id(create)


async def test_a_batched_run_joins_the_trace_of_the_event_that_opened_its_window(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, spans: Spans
) -> None:
    app = meshflow.App("rows")

    @app.function("ingest", trigger="rows/added", batch=meshflow.Batch(max_size=2, timeout="10s"))
    async def ingest(ctx: meshflow.Context) -> int:
        return int(await ctx.step.run("count", lambda: len(ctx.events)))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        with spans.tracer.start_as_current_span("import rows") as root:
            await client.send([meshflow.Event(name="rows/added", data={"i": i}) for i in range(2)])
        passes = await wait_until(
            lambda: [s for s in spans.all() if s.name == f"process {ingest.full_id}"],
            message="the batch's pass",
        )

    (batch,) = passes
    assert trace_id(batch) == root.get_span_context().trace_id
    (step,) = spans.of_run(attrs(batch)["meshflow.run_id"], "step ")
    assert parent_id(step) == span_id(batch)
