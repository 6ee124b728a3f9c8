"""``/metrics`` in the Prometheus text format, labelled by function.

Two kinds of figures:

- counted as runs start and finish, from the start announcements workers publish (core
  messages) and the ``meshflow/function.finished`` events the dashboard follows from its start
  (counters restart with the dashboard, as Prometheus expects):
  ``meshflow_runs_started_total{function}``, ``meshflow_runs_finished_total{function,status}``,
  ``meshflow_steps_total{function,kind,status}`` and
  ``meshflow_step_duration_seconds{function,kind}`` (a histogram);
- read at scrape time: ``meshflow_trigger_events_total{function}`` (events each function's
  trigger consumer handled: the runs it started, plus events its ``if_`` or flow control turned
  away), ``meshflow_consumer_pending{function,consumer}`` and
  ``meshflow_consumer_ack_pending{function,consumer}`` (the backlog of each function's events
  and runs consumers), ``meshflow_workers`` and ``meshflow_recent_runs{function,status}`` (the
  statuses of the most recently created runs, a bounded sample).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response

import meshflow

log = structlog.get_logger("meshflow.dashboard")

_RECENT = 2000
FINISHED = "meshflow/function.finished"
T = TypeVar("T")


class Metrics:
    """The counters fed by finished runs, and the scrape-time gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "meshflow_runs_finished",
            "Runs that ended, by status",
            ["function", "status"],
            registry=self.registry,
        )
        self.steps = Counter(
            "meshflow_steps",
            "Steps of ended runs, by kind and status",
            ["function", "kind", "status"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "meshflow_step_duration_seconds",
            "How long steps of ended runs took (a sleep or wait counts its time suspended)",
            ["function", "kind"],
            buckets=(0.005, 0.025, 0.1, 0.5, 1, 5, 30, 60, 600, 3600, 86400),
            registry=self.registry,
        )
        self.started = Counter(
            "meshflow_runs_started",
            "Runs that started (their first pass began)",
            ["function"],
            registry=self.registry,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._followed: set[str] = set()
        self.following = asyncio.Event()  # set once runs starting and finishing from now on count

    def start(self, client: meshflow.Client) -> None:
        async def count_start(function: str) -> None:
            self.started.labels(function).inc()

        async def count_end(event: meshflow.Event) -> None:
            await self._count(client, event)

        self._tasks = [
            asyncio.create_task(
                self._follow("finished runs", lambda: client.follow_events(FINISHED), count_end)
            ),
            asyncio.create_task(self._follow("run starts", client.follow_starts, count_start)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(
        self,
        what: str,
        subscribe: Callable[[], Awaitable[AsyncIterator[T]]],
        count: Callable[[T], Awaitable[None]],
    ) -> None:
        """Count what ``subscribe`` yields, subscribing again after a failure."""
        while True:
            try:
                items = await subscribe()
                self._followed.add(what)
                if len(self._followed) == len(self._tasks):
                    self.following.set()
                async for item in items:
                    await count(item)
            except meshflow.MeshflowError as exc:
                log.warning(f"metrics: following {what} failed; retrying", error=str(exc))
                await asyncio.sleep(1)

    async def _count(self, client: meshflow.Client, event: meshflow.Event) -> None:
        function = str(event.data.get("function_id", ""))
        self.runs.labels(function, str(event.data.get("status", ""))).inc()
        run_id = event.data.get("run_id")
        if not isinstance(run_id, str):
            return
        for step in await client.step_memos(run_id):
            self.steps.labels(function, step.kind, step.status).inc()
            if step.started_at and step.ended_at:
                self.durations.labels(function, step.kind).observe((step.ended_at - step.started_at) / 1000)

    async def render(self, client: meshflow.Client) -> bytes:
        scrape = CollectorRegistry()
        pending = Gauge(
            "meshflow_consumer_pending",
            "Messages not yet delivered",
            ["function", "consumer"],
            registry=scrape,
        )
        acking = Gauge(
            "meshflow_consumer_ack_pending",
            "Messages delivered, not yet acknowledged",
            ["function", "consumer"],
            registry=scrape,
        )
        recent = Gauge(
            "meshflow_recent_runs",
            f"Statuses of the {_RECENT} most recently created runs",
            ["function", "status"],
            registry=scrape,
        )
        workers = Gauge("meshflow_workers", "Workers running now", registry=scrape)
        handled = Counter(
            "meshflow_trigger_events",
            "Events a function's trigger consumer has handled (each started a run or was turned away)",
            ["function"],
            registry=scrape,
        )
        for info in await client.functions():
            handled.labels(info.full_id).inc(await client.events_handled(info.full_id))
            for consumer, (waiting, unacked) in (await client.backlog(info.full_id)).items():
                pending.labels(info.full_id, consumer).set(waiting)
                acking.labels(info.full_id, consumer).set(unacked)
        runs, _ = await client.list_runs(limit=_RECENT, budget=_RECENT)
        for run in runs:
            recent.labels(run.function_id, run.status.value).inc()
        workers.set(len(await client.workers()))
        return generate_latest(self.registry) + generate_latest(scrape)


async def endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    body = await metrics.render(request.app.state.client)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
