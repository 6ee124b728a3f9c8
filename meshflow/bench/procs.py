"""Processes of a benchmark: worker subprocesses, and CPU and memory read from ``/proc``.

Every worker this module starts is remembered until it has been reaped, so ``kill_leftovers``
can SIGKILL whatever is still alive when the benchmark ends abnormally (an error, Ctrl-C).
CPU is ``utime + stime`` of ``/proc/<pid>/stat`` (all threads of the process); memory is
``VmRSS`` of ``/proc/<pid>/status``. Both are ``None`` where ``/proc`` has no such process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import meshflow
from meshflow.errors import MeshflowError

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_started: set[subprocess.Popen[bytes]] = set()


class BenchError(MeshflowError):
    """A benchmark could not run: a worker died or never came up, the server refused a setup."""


def cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process has used so far."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / _CLK_TCK


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MB (``VmRSS``)."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


class CpuMeter:
    """CPU seconds used by named processes between its creation and `read`."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self._pids = dict(pids)
        self._start = {name: cpu_seconds(pid) for name, pid in self._pids.items()}

    def read(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for name, pid in self._pids.items():
            start, now = self._start[name], cpu_seconds(pid)
            if start is not None and now is not None:
                used[name] = now - start
        return used


class WorkerProcess:
    """``meshflow worker APP`` as a child process, its output in a log file.

    Args:
        app: ``module:attribute`` of the app to serve.
        url: the NATS URL.
        namespace: the deployment namespace.
        log_path: where the worker's stdout and stderr go.
        metrics: serve ``/metrics`` (on a free port), so that the worker counts every run.
    """

    def __init__(self, app: str, url: str, namespace: str, log_path: Path, *, metrics: bool = False) -> None:
        self.metrics = metrics
        self.app = app
        self.url = url
        self.namespace = namespace
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "meshflow", "--log-level", "warning", "worker", self.app]
        cmd += ["--nats", self.url, "--namespace", self.namespace]
        if self.metrics:
            cmd += ["--metrics-port", "0"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter with arguments we build
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        _started.add(self.proc)

    def exited(self) -> int | None:
        """The exit code if the worker has exited (or never started), else None."""
        if self.proc is None:
            return -1
        return self.proc.poll()

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def wait_registered(
        self, client: meshflow.Client, full_ids: Collection[str], within: float
    ) -> None:
        """Wait up to ``within`` seconds until the worker has registered every one of ``full_ids``."""
        deadline = time.monotonic() + within
        want = set(full_ids)
        while True:
            # The registry is the only "ready" signal a worker gives; the bench may read it.
            got = {f.full_id for f in await client._store.list_functions()}
            if want <= got:
                return
            code = self.exited()
            if code is not None:
                raise BenchError(
                    f"worker {self.app} exited with {code} before registering:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"worker {self.app} registered {sorted(got)} of {sorted(want)} in {within}s")
            await asyncio.sleep(0.05)

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it is still running after ``grace`` seconds; reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        _started.discard(proc)


def kill_leftovers() -> None:
    """SIGKILL and reap every worker this module started that is still alive."""
    for proc in list(_started):
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                continue
        _started.discard(proc)
