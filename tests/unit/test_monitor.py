"""The monitoring endpoint (``meshflow.monitor``): when /health fails, how long a loop stall is
held against it, and the HTTP it speaks (over loopback, no NATS)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from meshflow.errors import MeshflowError
from meshflow.metrics import WorkerMetrics
from meshflow.monitor import LAG_HOLD, LoopLag, Monitor, health, request_target
from meshflow.testing import wait_until


def test_healthy_while_connected_and_the_loop_keeps_up() -> None:
    lag = LoopLag(max_lag=5.0)
    lag.measured(at=100.0, lag=4.9)
    assert health(now=100.0, lag=lag, connected=True) == []


def test_a_lag_over_the_limit_fails_health_for_the_hold_then_passes() -> None:
    lag = LoopLag(max_lag=5.0)
    lag.measured(at=100.0, lag=7.5)
    lag.measured(at=100.5, lag=0.001)  # the stall has ended; still held against the worker
    (reason,) = health(now=100.5, lag=lag, connected=True)
    assert "lagged 7.50 s (limit 5 s)" in reason
    assert health(now=100.0 + LAG_HOLD - 0.01, lag=lag, connected=True) != []
    assert health(now=100.0 + LAG_HOLD, lag=lag, connected=True) == []


def test_the_worst_recent_lag_is_reported_and_a_new_stall_restarts_the_hold() -> None:
    lag = LoopLag(max_lag=1.0)
    lag.measured(at=10.0, lag=3.0)
    lag.measured(at=12.0, lag=2.0)
    assert lag.over(12.0) == 3.0
    assert lag.over(10.0 + LAG_HOLD) == 3.0  # held from the last stall
    assert lag.over(12.0 + LAG_HOLD) is None
    lag.measured(at=30.0, lag=1.5)
    assert lag.over(30.0) == 1.5  # an old stall's worst is forgotten


def test_disconnected_from_nats_fails_health() -> None:
    assert health(now=0.0, lag=LoopLag(5.0), connected=False) == ["not connected to NATS (reconnecting)"]


def test_request_target_reads_method_and_path_without_query() -> None:
    assert request_target(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == ("GET", "/metrics")
    for bad in (b"GET /metrics\r\n\r\n", b"\x16\x03\x01 TLS hello\r\n\r\n", b"GET metrics HTTP/1.1\r\n\r\n"):
        with pytest.raises(ValueError):  # noqa: PT011 - any malformed head
            request_target(bad)


@pytest.fixture
async def monitor() -> AsyncIterator[Monitor]:
    served = Monitor(WorkerMetrics(), lambda: True, host="127.0.0.1", port=0, max_lag=5.0)
    await served.start()
    yield served
    await served.stop()


async def ask(monitor: Monitor, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", monitor.port)
    writer.write(request)
    await writer.drain()
    response = await reader.read()  # the server closes after one response
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return status, headers, body


async def test_health_and_metrics_answer_over_http(monitor: Monitor) -> None:
    status, headers, body = await ask(monitor, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    report = json.loads(body)
    assert report["status"] == "ok"
    assert report["nats_connected"] is True
    assert report["event_loop_lag_seconds"] >= 0
    status, headers, body = await ask(monitor, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE meshflow_runs_started_total counter" in body
    assert int(headers["content-length"]) == len(body)


async def test_other_requests_get_clear_errors(monitor: Monitor) -> None:
    assert (await ask(monitor, b"GET / HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
    assert (await ask(monitor, b"POST /health HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 405 Method Not Allowed"
    assert (await ask(monitor, b"nonsense\r\n\r\n"))[0] == "HTTP/1.1 400 Bad Request"
    status, headers, body = await ask(monitor, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert body == b""
    assert int(headers["content-length"]) > 0


async def test_a_port_taken_fails_the_start_clearly(monitor: Monitor) -> None:
    second = Monitor(WorkerMetrics(), lambda: True, host="127.0.0.1", port=monitor.port, max_lag=5.0)
    with pytest.raises(MeshflowError, match=f"cannot serve metrics on 127.0.0.1:{monitor.port}"):
        await second.start()
    await second.stop()


async def test_stop_ends_a_connection_that_never_sends_its_request() -> None:
    served = Monitor(WorkerMetrics(), lambda: True, host="127.0.0.1", port=0, max_lag=5.0)
    await served.start()
    silent = socket.create_connection(("127.0.0.1", served.port))
    try:
        await wait_until(lambda: served._handling, message="the connection accepted")
        await served.stop()
    finally:
        silent.close()
