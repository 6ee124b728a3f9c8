"""A worker's metrics (``meshflow.metrics``): how late a run started, step attempts timed by how
they ended, and a registry per worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import msgspec
import pytest

import meshflow
from meshflow.activations import StepScope
from meshflow.events import Event
from meshflow.metrics import WorkerMetrics, start_delay_ms
from meshflow.runs import RunRecord, RunStatus, new_run

app = meshflow.App("shop")


@app.function("order", trigger="shop/order")
async def order(ctx: meshflow.Context) -> None:
    return None


def run_of(*stamps: int, created_at: int = 1_000, **fields: object) -> RunRecord:
    events = [Event(name="shop/order", ts=ts) for ts in stamps]
    return new_run("r1", app="shop", fn="order", events=events, now=created_at, **fields)


def test_a_run_is_late_by_the_time_since_its_earliest_event() -> None:
    assert start_delay_ms(run_of(400, 100, 700), started_at=1_100) == 1_000


def test_a_delayed_start_is_late_only_past_the_time_it_was_to_start() -> None:
    assert start_delay_ms(run_of(100, not_before=5_000), started_at=5_250) == 250


def test_a_replay_is_late_by_the_time_since_it_was_created() -> None:
    assert start_delay_ms(run_of(100, created_at=9_000, replay_of="r0"), started_at=9_040) == 40


def test_a_sender_clock_ahead_makes_no_negative_delay() -> None:
    assert start_delay_ms(run_of(2_000), started_at=1_500) == 0


def samples(metrics: WorkerMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_two_workers_in_one_process_count_apart() -> None:
    one, two = WorkerMetrics(), WorkerMetrics()  # no clash: neither uses the global registry
    record = msgspec.structs.replace(run_of(100), status=RunStatus.COMPLETED)
    one.run_finished(record)
    assert samples(one, "meshflow_runs_finished_total") == {
        (("function", "shop-order"), ("status", "completed")): 1
    }
    assert samples(two, "meshflow_runs_finished_total") == {}


def test_a_run_start_counts_and_observes_its_delay() -> None:
    metrics = WorkerMetrics()
    metrics.run_started(order, run_of(100, started_at=2_100))
    assert samples(metrics, "meshflow_runs_started_total") == {(("function", "shop-order"),): 1}
    assert samples(metrics, "meshflow_run_start_delay_seconds_sum") == {(("function", "shop-order"),): 2.0}


def test_step_attempts_are_timed_by_how_they_ended_and_enter_the_span_inside() -> None:
    metrics = WorkerMetrics()
    entered: list[str] = []

    @contextlib.contextmanager
    def span(scope: StepScope) -> Iterator[None]:
        entered.append(f"enter {scope.step_id}")
        try:
            yield
        finally:
            entered.append(f"exit {scope.step_id}")

    attempt = metrics.step_attempts(order, span)
    with attempt(StepScope("charge", 1)):
        pass
    with pytest.raises(ConnectionError), attempt(StepScope("charge", 2)):
        raise ConnectionError("down")
    with pytest.raises(KeyboardInterrupt), attempt(StepScope("charge", 3)):  # cut short: not an attempt's end
        raise KeyboardInterrupt
    assert samples(metrics, "meshflow_step_attempt_duration_seconds_count") == {
        (("function", "shop-order"), ("status", "completed")): 1,
        (("function", "shop-order"), ("status", "failed")): 1,
    }
    assert entered == ["enter charge", "exit charge"] * 3


def test_figures_read_at_scrape_time() -> None:
    metrics = WorkerMetrics()
    in_flight = [3]
    metrics.read(
        lambda: {
            "meshflow_in_flight": ("gauge", "now", in_flight[0]),
            "meshflow_runs_swept": ("counter", "swept", 2),
        }
    )
    in_flight[0] = 5
    text = metrics.render().decode()
    assert "meshflow_in_flight 5.0" in text
    assert "meshflow_runs_swept_total 2.0" in text
