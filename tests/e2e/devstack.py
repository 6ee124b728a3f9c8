"""``meshflow dev`` as users start it: a nats-server, a worker for the examples and the dashboard,
in a child process on free loopback ports, stopped with Ctrl-C (SIGINT) as users stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from meshflow.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DevStack:
    """``async with DevStack(tmp) as dev``: up once its worker has started; ``dev.code`` is the
    exit code after Ctrl-C, and ``dev.log()`` what it printed."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.web_port = free_port(), free_port()
        self.nats = f"nats://127.0.0.1:{self.port}"
        self.web = f"http://127.0.0.1:{self.web_port}"
        self._tmp = tmp
        self._log = tmp / "dev.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.code: int | None = None

    def log(self) -> str:
        return self._log.read_text()

    async def __aenter__(self) -> DevStack:
        cmd = [sys.executable, "-m", "meshflow", "dev", "--port", str(self.port)]
        cmd += ["--dashboard-port", str(self.web_port), "--data", str(self._tmp / "data")]
        with self._log.open("w") as out:
            self._proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        try:
            await wait_until(lambda: "worker started" in self.log(), timeout=30, message="dev stack is up")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)
        try:
            self.code = self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self.code = self._proc.wait(10)
