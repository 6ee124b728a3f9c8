"""A worker's own metrics, in a registry of its own, for its ``/metrics`` endpoint (``meshflow.monitor``).

Exported: `WorkerMetrics` (the registry and what the pass executor tells it) and
`start_delay_ms` (how late a run started, pure).

Counted as it happens, by this worker only (each worker counts its own share; Prometheus adds
the ``instance`` label, so there is no worker label):

- ``meshflow_runs_started_total{function}``: runs whose first pass began here;
- ``meshflow_runs_finished_total{function,status}``: runs that ended here, ``completed``,
  ``failed``, ``cancelled``, or ``skipped`` (turned away by a rate limit or singleton);
- ``meshflow_step_attempt_duration_seconds{function,status}`` (a histogram): each attempt of a
  ``step.run`` handler, ``completed`` or ``failed``. Not the dashboard's
  ``meshflow_step_duration_seconds``, which times whole steps of ended runs, sleeps and waits
  included, from their memos;
- ``meshflow_run_start_delay_seconds{function}`` (a histogram): from the triggering event's
  ``ts`` (a delayed start's time, for a run that was to start later; a replay's creation) to the
  run's first pass. Deliberate waits count too: a concurrency queue, a throttle, a debounce or
  batch window.

Read when scraped, from callables the worker hands over: ``meshflow_in_flight`` and
``meshflow_in_flight_limit`` (deliveries handled now, and the ``concurrency`` bound),
``meshflow_nats_connected``, ``meshflow_event_loop_lag_seconds``,
``meshflow_passes_abandoned_total`` and ``meshflow_runs_swept_total`` (`Worker.stats`), and the
process's ``process_*`` figures.

A worker without a metrics port never imports this module (nor ``prometheus_client``): its passes
ask ``Passes.metrics is None`` where a run starts and ends, and nothing wraps its step attempts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Self

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .activations import StepScope
from .durations import now_ms
from .functions import Function
from .runs import RunRecord, StepStatus

StepAttempt = Callable[[StepScope], Any]  # what `Activation.step_attempt` takes, a context manager factory

# Step attempts last from milliseconds (an HTTP call) to an hour (a batch job).
_STEP_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# A run starts milliseconds after its event when workers keep up; seconds to minutes behind a backlog.
_DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def start_delay_ms(record: RunRecord, started_at: int) -> int:
    """How long after it was due the run in ``record`` had its first pass, at ``started_at``.

    It was due at its earliest event's ``ts`` (the sender's clock), or later if it was to start
    later (``not_before``: a future ``ts``, a throttle); a replay was due when it was created (its
    events are the original run's). Never negative: the sender's clock may be ahead.
    """
    if record.replay_of is not None or not record.events:
        due = record.created_at
    else:
        due = max(min(e.ts for e in record.events), record.not_before)
    return max(0, started_at - due)


class WorkerMetrics:
    """One worker's metrics: a registry of its own (never the global one, so two workers in one
    process keep theirs apart), the counters passes feed, and what is read when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.started = Counter(
            "meshflow_runs_started",
            "Runs whose first pass began on this worker",
            ["function"],
            registry=self.registry,
        )
        self.finished = Counter(
            "meshflow_runs_finished",
            "Runs that ended on this worker, by status",
            ["function", "status"],
            registry=self.registry,
        )
        self.attempts = Histogram(
            "meshflow_step_attempt_duration_seconds",
            "How long each attempt of a step.run handler took, by how it ended",
            ["function", "status"],
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.delays = Histogram(
            "meshflow_run_start_delay_seconds",
            "From the triggering event's ts (or the run's delayed start) to the run's first pass",
            ["function"],
            buckets=_DELAY_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        # Each function's labelled children, made once: labels() costs more than what it labels.
        self._of: dict[str, _Children] = {}
        self._ended: dict[tuple[str, str], Counter] = {}

    # --- fed by the pass executor ----------------------------------------------------------------
    def run_started(self, fn: Function, record: RunRecord) -> None:
        """The first pass of ``record`` (leased, its ``started_at`` set) begins now."""
        of = self._children(fn.full_id)
        of.started.inc()
        started_at = record.started_at or now_ms()
        of.delay.observe(start_delay_ms(record, started_at) / 1000)

    def run_finished(self, record: RunRecord) -> None:
        """``record`` was written ended (or created skipped) by this worker."""
        key = (record.function, record.status.value)
        counter = self._ended.get(key)
        if counter is None:
            counter = self._ended[key] = self.finished.labels(*key)
        counter.inc()

    def step_attempts(self, fn: Function, inner: StepAttempt | None) -> StepAttempt:
        """What a pass enters around each step attempt: a timer around ``inner`` (the trace
        span, if any), observed when the handler returns or raises."""
        of = self._children(fn.full_id)
        completed, failed = of.completed, of.failed

        def attempt(scope: StepScope) -> _Timed:
            return _Timed(completed, failed, inner(scope) if inner is not None else None)

        return attempt

    def _children(self, function_id: str) -> _Children:
        of = self._of.get(function_id)
        if of is None:
            of = self._of[function_id] = _Children(
                started=self.started.labels(function_id),
                delay=self.delays.labels(function_id),
                completed=self.attempts.labels(function_id, StepStatus.COMPLETED.value),
                failed=self.attempts.labels(function_id, StepStatus.FAILED.value),
            )
        return of

    # --- read when scraped -----------------------------------------------------------------------
    def read(self, figures: Callable[[], Mapping[str, tuple[str, str, float]]]) -> None:
        """Report what ``figures`` returns at each scrape: ``{name: (kind, help, value)}``, kind
        ``gauge`` or ``counter`` (a counter's name without ``_total``)."""
        self.registry.register(_Read(figures))

    def render(self) -> bytes:
        """Everything, in the Prometheus text format."""
        return generate_latest(self.registry)


class _Children(NamedTuple):
    """A function's labelled counters and histograms."""

    started: Counter
    delay: Histogram
    completed: Histogram
    failed: Histogram


class _Timed:
    """Times one step attempt, entering ``inner`` (a span) inside. Class-based, like the spans:
    one per attempt, no generator frames."""

    __slots__ = ("_completed", "_failed", "_inner", "_start")

    def __init__(self, completed: Histogram, failed: Histogram, inner: Any) -> None:
        self._completed = completed
        self._failed = failed
        self._inner = inner
        self._start = 0.0

    def __enter__(self) -> Self:
        self._start = time.perf_counter()
        if self._inner is not None:
            self._inner.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._inner is not None:
            self._inner.__exit__(kind, exc, tb)
        took = time.perf_counter() - self._start
        if exc is None:
            self._completed.observe(took)
        elif isinstance(exc, Exception):  # a BaseException: the worker stops, the attempt is cut short
            self._failed.observe(took)


class _Read(Collector):
    """Figures read at scrape time from the worker (in flight, connected, lag, its stats)."""

    def __init__(self, figures: Callable[[], Mapping[str, tuple[str, str, float]]]) -> None:
        self._figures = figures

    def collect(self) -> Iterable[Metric]:
        for name, (kind, doc, value) in self._figures().items():
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)
