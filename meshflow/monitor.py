"""A worker's monitoring endpoint: ``GET /metrics`` (``meshflow.metrics``, Prometheus text) and
``GET /health``, served on the worker's own event loop, and the probe that measures its lag.

Off unless the worker is given a port (`Worker(metrics_port=...)`, ``meshflow worker
--metrics-port``); bound to 127.0.0.1 unless told otherwise (``metrics_host``). Exported:
`Monitor`, and the pure parts it is made of (`LoopLag`, `health`, `request_target`).

``/health`` answers 200 with ``{"status": "ok", ...}``, or 503 with ``{"status": "unhealthy",
"reasons": [...], ...}`` while

- the connection to NATS is down (the worker reconnects on its own meanwhile), or
- the event loop lagged more than ``max_lag`` seconds (default 5) at a probe in the last
  ``LAG_HOLD`` seconds. A probe sleeps ``PROBE_EVERY`` and measures how late it woke: a step that
  blocks the loop (CPU work or a blocking call in an ``async def``) delays every other run, the
  heartbeats that keep leases and the acks. The worst lag is held a while so that a probe
  polling every few seconds sees a stall that has just ended.

While the loop is blocked, nothing answers at all: for a probe with a timeout that is the failure.

Why a few dozen lines of HTTP/1.1 on ``asyncio.start_server`` rather than Starlette and uvicorn
(the dashboard's): two fixed GET routes need no framework, and uvicorn would bring a second
server lifecycle, signal handling and logging setup into every worker. And not a thread
(``prometheus_client.start_http_server``): a thread would go on answering ``/health`` while the
loop it vouches for is stuck. One connection, one request, then ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from .errors import MeshflowError
from .metrics import WorkerMetrics

if TYPE_CHECKING:
    from .worker import Worker

log = structlog.get_logger("meshflow.worker")

PROBE_EVERY = 0.5  # seconds between two measurements of the loop's lag
LAG_HOLD = 10.0  # seconds a lag over the limit keeps /health failing after it was measured
_READ_TIMEOUT = 5.0  # for a client to send its request head
_MAX_HEAD = 8192
_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_JSON_TYPE = "application/json"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class LoopLag:
    """The event loop's lag as the probe measures it: the last measurement, and the worst one
    over the limit within the last ``LAG_HOLD`` seconds (times are the loop's clock)."""

    def __init__(self, max_lag: float) -> None:
        self.max_lag = max_lag
        self.last = 0.0
        self._over = 0.0  # the worst lag over the limit since ``_over_at``
        self._over_at = float("-inf")

    def measured(self, at: float, lag: float) -> None:
        self.last = lag
        if lag > self.max_lag:
            recent = at - self._over_at < LAG_HOLD
            self._over = max(lag, self._over) if recent else lag
            self._over_at = at

    def over(self, now: float) -> float | None:
        """The worst lag over the limit measured in the last ``LAG_HOLD`` seconds, if any."""
        return self._over if now - self._over_at < LAG_HOLD else None


def health(*, now: float, lag: LoopLag, connected: bool) -> list[str]:
    """Why the worker is unhealthy now; empty when it is healthy."""
    reasons = []
    if not connected:
        reasons.append("not connected to NATS (reconnecting)")
    worst = lag.over(now)
    if worst is not None:
        reasons.append(
            f"the event loop lagged {worst:.2f} s (limit {lag.max_lag:g} s) in the last {LAG_HOLD:g} s: "
            "something blocks it (CPU work or a blocking call in an async def)"
        )
    return reasons


def request_target(head: bytes) -> tuple[str, str]:
    """The method and the path (query dropped) of an HTTP/1.x request head; `ValueError` if it
    is not one."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    method, target, version = line.split(" ")  # ValueError unless exactly three parts
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise ValueError(f"not an HTTP/1.x request line: {line!r}")
    return method, target.split("?", 1)[0]


class Monitor:
    """A worker's ``/metrics`` and ``/health`` endpoint, and the probe measuring its loop's lag.

    Args:
        metrics: what ``/metrics`` renders.
        connected: whether the worker is connected to NATS now.
        host: the address to bind.
        port: the port to bind; 0 picks a free one (`port` is the bound one once started).
        max_lag: seconds of event-loop lag past which ``/health`` fails.
    """

    def __init__(
        self, metrics: WorkerMetrics, connected: Callable[[], bool], *, host: str, port: int, max_lag: float
    ) -> None:
        self.metrics = metrics
        self.connected = connected
        self.host = host
        self.port = port
        self.lag = LoopLag(max_lag)
        self._server: asyncio.Server | None = None
        self._probe: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[object]] = set()

    @classmethod
    def of(cls, worker: Worker, host: str, port: int, max_lag: float) -> Monitor:
        """The monitor of ``worker`` (connected, its passes counting into its metrics)."""
        metrics = WorkerMetrics()
        monitor = cls(metrics, lambda: worker.bus.connected, host=host, port=port, max_lag=max_lag)

        def figures() -> dict[str, tuple[str, str, float]]:
            stats = worker.stats
            return {
                "meshflow_in_flight": ("gauge", "Deliveries (events, runs) handled now", stats["in_flight"]),
                "meshflow_in_flight_limit": (
                    "gauge",
                    "The most handled at once",
                    worker.inflight.concurrency,
                ),
                "meshflow_nats_connected": (
                    "gauge",
                    "1 while connected to NATS",
                    float(worker.bus.connected),
                ),
                "meshflow_event_loop_lag_seconds": (
                    "gauge",
                    "How late the last probe woke",
                    monitor.lag.last,
                ),
                "meshflow_passes_abandoned": (
                    "counter",
                    "Passes that stopped because another pass took their run over",
                    stats["passes_abandoned"],
                ),
                "meshflow_runs_swept": ("counter", "Stuck runs the sweeper woke", stats["runs_swept"]),
            }

        metrics.read(figures)
        worker.passes.metrics = metrics
        return monitor

    async def start(self) -> int:
        """Bind and serve, and start measuring the loop's lag; the port bound."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_HEAD)
        except OSError as exc:
            raise MeshflowError(f"cannot serve metrics on {self.host}:{self.port}: {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        self._probe = asyncio.create_task(self._measure())
        log.info("metrics and health served", url=f"http://{self.host}:{self.port}/metrics")
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in [*self._handling, *([self._probe] if self._probe else [])]:
            task.cancel()
        await asyncio.gather(*self._handling, *([self._probe] if self._probe else []), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _measure(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(PROBE_EVERY)
            now = loop.time()
            self.lag.measured(now, max(0.0, now - before - PROBE_EVERY))

    # --- HTTP -------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handling.add(task)
        method = "GET"
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                method, path = request_target(head)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                status, kind, body = 400, "text/plain", b"bad request\n"
            else:
                status, kind, body = self._respond(method, path)
            writer.write(_response(status, kind, b"" if method == "HEAD" else body, len(body)))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            if task is not None:
                self._handling.discard(task)

    def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/health"):
            return 404, "text/plain", b"not found: try /metrics or /health\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/metrics":
            return 200, _METRICS_TYPE, self.metrics.render()
        connected = self.connected()
        reasons = health(now=asyncio.get_running_loop().time(), lag=self.lag, connected=connected)
        report: dict[str, object] = {"status": "unhealthy" if reasons else "ok"}
        if reasons:
            report["reasons"] = reasons
        report |= {"nats_connected": connected, "event_loop_lag_seconds": round(self.lag.last, 4)}
        return (503 if reasons else 200), _JSON_TYPE, json.dumps(report).encode() + b"\n"


def _response(status: int, kind: str, body: bytes, length: int) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
