"""A 3-node JetStream cluster on loopback, started from the project's own ``deploy/nats/node.conf``.

Every node runs the same config file; what differs between nodes (name, ports, store, passwords)
comes from the environment, as in ``compose.yaml``. Nodes can be SIGKILLed and started again on
the same ports and store. Every server started here is stopped by `Cluster.stop`, and dies with
the test process anyway (``PR_SET_PDEATHSIG``), so a failed run never leaves one behind.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import meshflow
from meshflow.server import _die_with_parent, find_binary

ROOT = Path(__file__).resolve().parents[2]
NODE_CONF = ROOT / "deploy" / "nats" / "node.conf"
_READY = b"Server is ready"
_PASSWORDS = ("ADMIN", "WORKER", "DASHBOARD", "PUBLISHER", "SYS")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (held open together, so never the same one)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Node:
    name: str
    client_port: int
    http_port: int
    route_port: int
    store: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    log_offset: int = 0  # where this start's lines begin in the (appended) log

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


class Cluster:
    """Three ``nats-server -c deploy/nats/node.conf`` processes named n1, n2, n3."""

    def __init__(self, root: Path, size: int = 3, *, conf: Path = NODE_CONF) -> None:
        self.conf = conf
        ports = free_ports(3 * size)
        self.nodes = {
            f"n{i + 1}": Node(
                name=f"n{i + 1}",
                client_port=ports[3 * i],
                http_port=ports[3 * i + 1],
                route_port=ports[3 * i + 2],
                store=root / f"n{i + 1}",
                log=root / f"n{i + 1}.log",
            )
            for i in range(size)
        }
        self.passwords = {who: "p" + secrets.token_hex(8) for who in _PASSWORDS}  # never all digits
        self.admin = meshflow.NatsAuth(user="admin", password=self.passwords["ADMIN"])

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    def _env(self, node: Node) -> dict[str, str]:
        env = {
            "NATS_NAME": node.name,
            "NATS_LISTEN": f"127.0.0.1:{node.client_port}",
            "NATS_HTTP": f"127.0.0.1:{node.http_port}",
            "NATS_CLUSTER_LISTEN": f"127.0.0.1:{node.route_port}",
            "NATS_STORE": str(node.store),
        }
        for i, peer in enumerate(self.nodes.values(), start=1):
            env[f"NATS_ROUTE_{i}"] = self.route_url(node, peer)
        for who, password in self.passwords.items():
            env[f"NATS_{who}_PASSWORD"] = password
        return env

    def route_url(self, node: Node, peer: Node) -> str:
        """The URL ``node`` reaches ``peer``'s route port at."""
        return f"nats-route://127.0.0.1:{peer.route_port}"

    def spawn(self, name: str) -> None:
        """Start node ``name`` (again) on its ports and store; `ready` tells when it serves clients.

        Call it from the thread that lives as long as the server should (the test's main thread):
        Linux ties the parent-death signal to the starting thread.
        """
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            raise RuntimeError(f"{name} is running already")
        node.store.mkdir(parents=True, exist_ok=True)
        node.log_offset = node.log.stat().st_size if node.log.exists() else 0
        node.proc = subprocess.Popen(
            [find_binary(), "-c", str(self.conf), "-l", str(node.log)],
            env=self._env(node),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def ready(self, name: str) -> bool:
        """Node ``name`` is running and accepts clients (its log says so since its last start)."""
        node = self.nodes[name]
        if node.proc is None:
            return False
        if node.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {node.proc.returncode}:\n{self.log_tail(name)}")
        try:
            with node.log.open("rb") as fh:
                fh.seek(node.log_offset)
                return _READY in fh.read()
        except FileNotFoundError:
            return False

    def log_tail(self, name: str, chars: int = 3000) -> str:
        node = self.nodes[name]
        return node.log.read_text(errors="replace")[-chars:] if node.log.exists() else ""

    def jsz(self, name: str) -> dict[str, object]:
        """Node ``name``'s JetStream monitoring report (``/jsz``)."""
        url = f"http://127.0.0.1:{self.nodes[name].http_port}/jsz"
        with urllib.request.urlopen(url, timeout=2) as response:
            report: dict[str, object] = json.load(response)
            return report

    def formed(self) -> bool:
        """Every node runs, sees all the others and agrees on a JetStream meta leader."""
        leaders = set()
        for name in self.nodes:
            if not self.ready(name):
                return False
            try:
                meta = self.jsz(name).get("meta_cluster") or {}
            except OSError:
                return False
            assert isinstance(meta, dict)
            if not meta.get("leader") or meta.get("cluster_size") != len(self.nodes):
                return False
            leaders.add(meta["leader"])
        return len(leaders) == 1

    def start(self, timeout: float = 30.0) -> Cluster:
        """Start every node and wait until the cluster has formed; return self."""
        for name in self.nodes:
            self.spawn(name)
        deadline = time.monotonic() + timeout
        while not self.formed():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.nodes)
                raise TimeoutError(f"the cluster did not form within {timeout}s\n{logs}")
            time.sleep(0.1)
        return self

    def kill(self, name: str) -> None:
        """SIGKILL node ``name``, as a crash would."""
        proc, self.nodes[name].proc = self.nodes[name].proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        """SIGTERM every node still running (SIGKILL after 10 s) and wait for each to exit."""
        running = [node for node in self.nodes.values() if node.proc is not None]
        for node in running:
            assert node.proc is not None
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in running:
            proc, node.proc = node.proc, None
            assert proc is not None
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
