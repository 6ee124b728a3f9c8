"""``meshflow bench``: the workloads of WORKLOADS.md, measured against the raw JetStream limit.

D1 (dashboard pages with 100,000 runs in the store) is ours, not WORKLOADS.md's; it measures
its own limit (`pages`).

    meshflow bench [WORKLOAD ...] [--nats URL] [--runs 3] [--scale 1.0] [--sync-always] [--out FILE]

Starts an embedded nats-server in a temporary directory (unless ``--nats`` names one), runs RAW
first (every ratio needs it), then each requested workload ``--runs`` times, and prints one JSON
line per workload on stdout: each figure as median, min and max over the runs, CPU seconds of
the worker, the server and this driver over the workload, the RAW medians and the ratio the
workload names. Progress goes to stderr. Every process started is stopped at the end, also on
errors and Ctrl-C. Method and caveats: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from meshflow.functions import Function
from meshflow.server import EmbeddedServer

from . import apps, pages, raw, sleepers, waiters, workloads
from .admin import Admin
from .harness import Body, Measured, Target, with_worker
from .procs import BenchError, CpuMeter, kill_leftovers
from .stats import ratio, rounded, summarize_runs

WORKLOADS = ("RAW", "W1", "W2", "W3", "W4", "W5", "W6", "W7", "D1")
#: Hard limit of one run of a workload, in seconds; W6 creates 100,000 runs, D1 writes them.
DEADLINE_S = 120.0
DEADLINES = {"W6": 300.0, "D1": 300.0}
RAW_STEP = "step_pipelined_per_s"


@dataclass(frozen=True)
class Spec:
    """How to run a workload: the app its worker serves, its body, and its key figures."""

    app: str
    functions: tuple[Function, ...]
    body: Body
    key: str  # the figure the progress line shows
    ratio: tuple[str, str] | None = None  # (figure, RAW figure) whose medians are divided


SPECS = {
    "W1": Spec("w1", (apps.three_steps,), workloads.w1, "steps_per_s", ("steps_per_s", RAW_STEP)),
    "W2": Spec("w2", (apps.one_step,), workloads.w2, "p50_ms"),
    "W3": Spec("w3", (apps.sleeper,), workloads.w3, "lateness_p99_ms"),
    "W4": Spec("w4", apps.FANOUT, workloads.w4, "p50_ms"),
    "W5": Spec("w5", (apps.waiter,), waiters.w5, "resume_p99_ms"),
    "W6": Spec("w6", (apps.long_sleeper,), sleepers.w6, "create_s"),
    # W7's events match no function: its worker (serving W2's function) stays idle.
    "W7": Spec("w2", (apps.one_step,), workloads.w7, "events_per_s", ("events_per_s", "publish_per_s")),
    # D1's worker only registers its 20 functions (the dashboard lists them) and stays idle.
    "D1": Spec("d1", apps.DASHBOARD, pages.d1, "first_page_p50_ms"),
}


def _workload(value: str) -> str:
    name = value.upper()
    if name not in WORKLOADS:
        raise argparse.ArgumentTypeError(f"unknown workload {value!r}: choose from {' '.join(WORKLOADS)}")
    return name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``meshflow bench``."""
    parser.add_argument(
        "workloads",
        nargs="*",
        type=_workload,
        metavar="WORKLOAD",
        help=f"{' '.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument("--nats", default=None, help="benchmark this server instead of an embedded one")
    parser.add_argument("--runs", type=int, default=3, help="runs per workload (figures are medians)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every workload's N by this")
    parser.add_argument(
        "--sync-always", action="store_true", help="embedded server with sync_interval: always"
    )
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace every run (an OpenTelemetry SDK provider whose exporter drops the spans)",
    )
    parser.add_argument("--logs", action="store_true", help="each W1 step logs a line with ctx.logger")
    parser.add_argument(
        "--metrics", action="store_true", help="workers serve /metrics (meshflow worker --metrics-port 0)"
    )


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Bench:
    """One invocation: the target, the RAW medians so far, and where lines go."""

    def __init__(self, target: Target, runs: int, sync: str, out: TextIO | None) -> None:
        self.target = target
        self.runs = runs
        self.sync = sync
        self.out = out
        self.raw: dict[str, float] = {}
        self.failed = 0

    def emit(self, line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if self.out is not None:
            self.out.write(text + "\n")
            self.out.flush()

    def line(self, name: str, results: list[Measured], error: str | None) -> dict[str, Any]:
        line: dict[str, Any] = {
            "workload": name,
            "runs": len(results),
            "scale": self.target.scale,
            "sync_interval": self.sync,
            "tracing": self.target.trace is not None,
            "logs": os.environ.get(apps.LOGS_ENV) == "1",
            "metrics": self.target.metrics,
            "incomplete": any(r.incomplete for r in results),
        }
        line.update(summarize_runs([r.figures for r in results]))
        line["cpu_s"] = summarize_runs([r.cpu for r in results])
        if error is not None:
            line["error"] = error
            self.failed += 1
        return line

    async def run_raw(self) -> None:
        results: list[Measured] = []
        error = None
        for k in range(1, self.runs + 1):
            loop = asyncio.get_running_loop()
            meter = CpuMeter({"server": self.target.server_pid, "driver": os.getpid()})
            try:
                tag = f"{self.target.token}r{k}"
                figures, incomplete = await raw.measure(
                    self.target.url, tag, self.target.scale, loop.time() + DEADLINE_S
                )
            except Exception as exc:  # report it in the JSON line and go on with the workloads
                error = repr(exc)
                _progress(f"RAW run {k}/{self.runs}: failed: {error}")
                break
            results.append(Measured(figures, incomplete, meter.read()))
            _progress(f"RAW run {k}/{self.runs}: {RAW_STEP} {rounded(figures.get(RAW_STEP, 0.0)):g}")
        line = self.line("RAW", results, error)
        self.raw = {k: v["median"] for k, v in line.items() if k.endswith("_per_s") and isinstance(v, dict)}
        self.emit(line)

    async def run(self, name: str) -> None:
        spec = SPECS[name]
        results: list[Measured] = []
        error = None
        for k in range(1, self.runs + 1):
            try:
                limit = DEADLINES.get(name, DEADLINE_S)
                got = await with_worker(self.target, name, k, spec.app, spec.functions, spec.body, limit)
            except Exception as exc:  # report it in the JSON line and go on with the next workload
                error = repr(exc)
                _progress(f"{name} run {k}/{self.runs}: failed: {error}")
                break
            results.append(got)
            value = got.figures.get(spec.key)
            shown = "-" if value is None else f"{rounded(value):g}"
            note = " (incomplete)" if got.incomplete else ""
            _progress(f"{name} run {k}/{self.runs}: {spec.key} {shown}{note}")
        line = self.line(name, results, error)
        if spec.ratio is not None:
            figure, raw_figure = spec.ratio
            mine = line.get(figure, {}).get("median")
            value = ratio(mine, self.raw.get(raw_figure))
            if value is not None:
                line["ratio"] = {"value": value, "of": f"{figure}.median / RAW.{raw_figure}.median"}
        line["raw"] = {k: rounded(v) for k, v in self.raw.items()}
        self.emit(line)


def selected(names: list[str]) -> list[str]:
    """The workloads to run in their canonical order; RAW always, and first."""
    wanted = set(names) or set(WORKLOADS)
    return [w for w in WORKLOADS if w in wanted or w == "RAW"]


async def main(args: argparse.Namespace) -> None:
    """Run the benchmark that ``args`` (from `add_arguments`) describe."""
    if args.runs < 1 or not args.scale > 0:
        raise BenchError("--runs must be at least 1 and --scale above 0")
    names = selected(args.workloads)
    # SIGTERM stops the benchmark like Ctrl-C does: cancelled, so every process it started is
    # stopped on the way out.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    terminated = asyncio.Event()

    def on_sigterm() -> None:
        terminated.set()
        if task is not None:
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(Path(args.out).open("w")) if args.out else None  # noqa: ASYNC230 - once
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshflow-bench-")))
            failed = await _bench(args, names, tmp, out)
    except asyncio.CancelledError:
        if terminated.is_set():
            raise BenchError("stopped by SIGTERM") from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    if failed:
        raise BenchError(f"{failed} workload(s) failed: see their 'error' field")


def _traced(tmp: Path) -> Path:
    """Trace this driver, and have every worker started from now on trace itself too."""
    from . import traced

    directory = tmp / "spans"
    directory.mkdir()
    traced.install()
    os.environ[traced.TRACE_ENV] = str(directory)
    return directory


async def _bench(args: argparse.Namespace, names: list[str], tmp: Path, out: TextIO | None) -> int:
    server: EmbeddedServer | None = None
    try:
        if args.nats:
            url, pid, sync = args.nats, None, "unknown"
        else:
            server = EmbeddedServer(tmp / "nats", sync_always=args.sync_always)
            await asyncio.to_thread(server.start)
            url, pid, sync = server.url, server.pid, "always" if args.sync_always else "default"
        admin = await Admin.connect(url)
        try:
            trace = _traced(tmp) if args.trace else None
            if args.logs:  # the workers started from now on log (W1's steps)
                os.environ[apps.LOGS_ENV] = "1"
            target = Target(url, pid, admin, tmp, secrets.token_hex(2), args.scale, trace, args.metrics)
            bench = _Bench(target, args.runs, sync, out)
            await bench.run_raw()
            for name in names:
                if name != "RAW":
                    await bench.run(name)
            return bench.failed
        finally:
            await admin.close()
    finally:
        kill_leftovers()  # only after an error or Ctrl-C is anything left
        if server is not None:
            server.stop()
