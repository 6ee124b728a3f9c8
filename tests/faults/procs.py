"""Worker processes the fault tests start, stop, kill, pause and resume (always by their pid)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """``meshflow worker tests.faults.apps:app`` as a child process, logging to ``log``."""

    def __init__(
        self,
        url: str,
        namespace: str,
        ledger: Path,
        gate: Path,
        log: Path,
        *,
        ack_wait: float,
        grace: float = 30.0,
        password: str = "",
    ) -> None:
        env = {
            **os.environ,
            "MESHFLOW_TEST_LEDGER": str(ledger),
            "MESHFLOW_TEST_GATE": str(gate),
            "PYTHONPATH": str(ROOT),
        }
        if password:  # a cluster's admin: the fault runs are about faults, not permissions
            env |= {"MESHFLOW_NATS_USER": "admin", "MESHFLOW_NATS_PASSWORD": password}
        cmd = [sys.executable, "-m", "meshflow", "--log-level", "info", "worker", "tests.faults.apps:app"]
        cmd += ["--nats", url, "--namespace", namespace, "--ack-wait", str(ack_wait)]
        cmd += ["--shutdown-grace", str(grace)]
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def pause(self) -> None:
        """SIGSTOP: the process holds everything and does nothing, as in a long GC or swap pause."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no chance to ack, nak or release anything."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._out.close()

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, in case it is paused); SIGKILL if it does not exit in 20 s."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()

    def logged(self, text: str) -> int:
        """How many lines of this worker's log contain ``text``."""
        return sum(text in line for line in self.log.read_text(errors="replace").splitlines())


class Entry(NamedTuple):
    """One line of the ledger."""

    run: str
    step: str
    what: str  # start, end (a step's), or returned (the function body's)
    pid: int
    ns: int  # wall clock, ns


class Ledger:
    """The ledger file the fault apps write: ``{run} {step} {what} {pid} {time_ns}`` per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[Entry]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) == 5:  # a line cut short by a kill -9 is left out
                run, step, what, pid, ns = parts
                out.append(Entry(run, step, what, int(pid), int(ns)))
        return out

    def count(self, what: str = "end", *, pid: int | None = None) -> Counter[tuple[str, str]]:
        """(run, step) -> how many times it reached ``what`` (in process ``pid``, if given)."""
        return Counter((e.run, e.step) for e in self.lines() if e.what == what and pid in (None, e.pid))
