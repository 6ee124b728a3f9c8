"""A worker's ``/metrics`` and ``/health`` (``Worker(metrics_port=...)``): its runs, step attempts
and start delays counted by function; healthy while connected and its loop keeps up, 503 while
NATS is down or a step blocks the loop."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import meshflow
from meshflow.durations import now_ms
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def scrape(http: httpx.AsyncClient, worker: meshflow.Worker) -> Samples:
    response = await http.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def health(http: httpx.AsyncClient, worker: meshflow.Worker) -> httpx.Response:
    return await http.get(f"http://127.0.0.1:{worker.metrics_port}/health")


async def test_metrics_count_a_functions_runs_step_attempts_and_start_delay(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, http: httpx.AsyncClient
) -> None:
    """One run whose step fails once and is retried: one start, one completed end, a failed and
    a completed attempt; an event stamped 3 s ago started its run at least 3 s late."""
    app = meshflow.App("shop")
    tries: list[int] = []

    async def charge() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("payment gateway unavailable")
        return "charged"

    @app.function(
        "order", trigger="shop/order", retries=meshflow.Retry(retries=2, backoff=("50ms",), jitter=0.0)
    )
    async def order(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("charge", charge))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace, metrics_port=0) as worker:
        assert worker.metrics_port  # port 0 picked a free one, readable once started
        event = meshflow.Event(name="shop/order", ts=now_ms() - 3000)
        await client.send(event)
        run = await client.wait_for_run(order.run_id_for(event), timeout=30)
        assert run.output == "charged"

        async def ended() -> Samples | None:
            samples = await scrape(http, worker)
            ended = value(samples, "meshflow_runs_finished_total", function="shop-order", status="completed")
            return samples if ended == 1 else None

        samples = await wait_until(ended, message="the run's end counted")
        assert value(samples, "meshflow_runs_started_total", function="shop-order") == 1
        attempts = "meshflow_step_attempt_duration_seconds_count"
        assert value(samples, attempts, function="shop-order", status="failed") == 1
        assert value(samples, attempts, function="shop-order", status="completed") == 1
        assert value(samples, "meshflow_run_start_delay_seconds_count", function="shop-order") == 1
        assert value(samples, "meshflow_run_start_delay_seconds_sum", function="shop-order") >= 3.0
        assert value(samples, "meshflow_nats_connected") == 1
        assert value(samples, "meshflow_in_flight_limit") == 64
        assert ("meshflow_event_loop_lag_seconds", frozenset()) in samples
        assert ("meshflow_in_flight", frozenset()) in samples

        response = await health(http, worker)
        assert response.status_code == 200
        assert response.json()["status"] == "ok"


async def test_health_fails_after_a_step_blocks_the_event_loop(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, http: httpx.AsyncClient
) -> None:
    """A blocking call in an ``async def`` step stalls every run on the worker: /health says so."""
    app = meshflow.App("lag")

    async def crunch() -> str:
        time.sleep(1.5)  # noqa: ASYNC251 - blocking the loop is what this test is about
        return "done"

    @app.function("blocker", trigger="lag/go")
    async def blocker(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("crunch", crunch))

    worker = meshflow.Worker(
        app, nats=nats_server.url, namespace=namespace, metrics_port=0, health_max_lag=0.5
    )
    async with worker:
        assert (await health(http, worker)).status_code == 200
        event = meshflow.Event(name="lag/go")
        await client.send(event)

        async def unhealthy() -> httpx.Response | None:
            response = await health(http, worker)
            return response if response.status_code == 503 else None

        response = await wait_until(unhealthy, timeout=20, message="/health failing")
        report = response.json()
        assert report["status"] == "unhealthy"
        assert any("event loop lagged" in reason for reason in report["reasons"])
        assert report["nats_connected"] is True
        run = await client.wait_for_run(blocker.run_id_for(event), timeout=30)
        assert run.output == "done"


async def test_health_fails_while_nats_is_down_and_recovers_when_it_returns(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The worker's own server stops: /health answers 503 naming NATS (the worker reconnects
    meanwhile), and 200 again once the server is back."""
    app = meshflow.App("down")

    @app.function("noop", trigger="down/go")
    async def noop(ctx: meshflow.Context) -> None:
        return None

    server = EmbeddedServer(tmp_path / "nats").start()
    try:
        async with meshflow.Worker(app, nats=server.url, metrics_port=0) as worker:
            assert (await health(http, worker)).status_code == 200
            server.stop()

            async def unhealthy() -> httpx.Response | None:
                response = await health(http, worker)
                return response if response.status_code == 503 else None

            report = (await wait_until(unhealthy, timeout=20, message="/health failing")).json()
            assert any("NATS" in reason for reason in report["reasons"])
            assert report["nats_connected"] is False
            assert value(await scrape(http, worker), "meshflow_nats_connected") == 0

            server.start()

            async def healthy() -> bool:
                return (await health(http, worker)).status_code == 200

            await wait_until(healthy, timeout=30, message="/health passing again")
    finally:
        server.stop()


async def test_a_worker_whose_metrics_port_is_taken_does_not_start(
    nats_server: EmbeddedServer, namespace: str
) -> None:
    app = meshflow.App("taken")

    @app.function("noop", trigger="taken/go")
    async def noop(ctx: meshflow.Context) -> None:
        return None

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = meshflow.Worker(app, nats=nats_server.url, namespace=namespace, metrics_port=port)
        with pytest.raises(meshflow.MeshflowError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await worker.start()
    assert worker.stats["in_flight"] == 0
