"""``meshflow bench`` as users run it: every workload it runs prints one JSON line of figures.

Tiny scale and no assertion about speed: this defends the harness (servers and workers started
and stopped, every figure present and numeric), not meshflow's performance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FIGURES = {
    "RAW": ["kv_create_per_s", "publish_per_s", "step_seq_per_s", "step_pipelined_per_s"],
    "W1": ["runs_per_s", "steps_per_s", "wall_s"],
    "W2": ["p50_ms", "p95_ms", "p99_ms"],
    "W3": ["lateness_p50_ms", "lateness_p99_ms", "early_wakes", "wall_s"],
    "W4": ["p50_ms", "p95_ms", "p99_ms", "runs_per_s"],
    "W5": [
        "routed_0_per_s",
        "routed_1_per_s",
        "routed_n_per_s",
        "routed_n_vs_0",
        "routed_n_vs_1",
        "worker_rss_waiting_mb",
        "resume_p50_ms",
        "resume_p99_ms",
        "resumes_per_s",
    ],
    "W7": ["events_per_s"],
    "D1": [
        "first_page_p50_ms",
        "deep_page_p50_ms",
        "failed_page_p50_ms",
        "function_page_p50_ms",
        "run_detail_p50_ms",
        "events_page_p50_ms",
        "event_search_p50_ms",
        "html_runs_p50_ms",
        "html_failed_p50_ms",
        "limit_p50_ms",
        "first_page_vs_limit",
        "none_calls",
    ],
}
RATIOS = {"W1", "W7"}


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_bench_prints_one_line_of_numeric_figures_per_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    args = [*FIGURES, "--runs", "1", "--scale", "0.01", "--out", str(out)]
    bench = subprocess.Popen(
        [sys.executable, "-m", "meshflow", "bench", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        bench.terminate()  # SIGTERM: the bench stops its server and workers on the way out
        _, stderr = bench.communicate(timeout=30)
        pytest.fail(f"meshflow bench did not finish within 180 s:\n{stderr[-3000:]}")
    assert bench.returncode == 0, stderr[-3000:]
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["workload"] for line in lines] == list(FIGURES)
    assert out.read_text().splitlines() == stdout.splitlines()

    for line in lines:
        name = line["workload"]
        assert line["runs"] == 1
        assert line["sync_interval"] == "default"
        assert line["incomplete"] is False, line
        for figure in FIGURES[name]:
            stats = line[figure]
            assert set(stats) == {"median", "min", "max"}, (name, figure)
            assert all(is_number(v) for v in stats.values()), (name, figure, stats)
        assert is_number(line["cpu_s"]["server"]["median"])
        assert is_number(line["cpu_s"]["driver"]["median"])
        if name != "RAW":
            assert is_number(line["cpu_s"]["worker"]["median"])
            assert set(line["raw"]) == set(FIGURES["RAW"])
        if name in RATIOS:
            assert is_number(line["ratio"]["value"])
    by_name = {line["workload"]: line for line in lines}
    assert by_name["W3"]["early_wakes"]["max"] == 0  # a sleep never wakes early
    assert by_name["W5"]["completed"]["min"] == 100  # 10,000 at --scale 0.01: every waiter resumed
    assert by_name["D1"]["stored_runs"]["min"] == 1000  # 100,000 at --scale 0.01, all listed
    assert by_name["D1"]["none_runs"]["max"] == 0  # no run is cancelled: that filter finds nothing
    assert "W1 run 1/1" in stderr


@pytest.mark.timeout(120)
def test_bench_trace_traces_every_run_and_counts_its_spans(tmp_path: Path) -> None:
    """``--trace``: each W1 run (3 steps) makes a span per pass and per step attempt, and the
    worker exported every one of them."""
    args = ["W1", "--runs", "1", "--scale", "0.01", "--trace"]
    done = subprocess.run(
        [sys.executable, "-m", "meshflow", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    raw, w1 = (json.loads(line) for line in done.stdout.splitlines())
    assert raw["tracing"] is True
    assert w1["tracing"] is True
    completed = w1["completed"]["median"]
    assert completed == 20  # 2,000 at --scale 0.01
    spans = w1["spans"]["median"]
    assert spans % 4 == 0  # one pass and three steps a run, warm-up runs included
    assert spans >= 4 * completed
