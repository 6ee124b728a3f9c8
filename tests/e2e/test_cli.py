"""The command line as users run it: ``meshflow dev``, ``send``, ``run``, ``cancel`` and ``replay``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until

from .devstack import ROOT, DevStack


def meshflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshflow", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
async def test_dev_serves_the_examples_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    async with DevStack(tmp_path) as dev:
        url, web = dev.nats, dev.web_port
        assert f"nats-server  {url}" in dev.log()
        assert f"dashboard    http://127.0.0.1:{web}" in dev.log()

        sent = meshflow("send", "user/signup", "--data", '{"email": "ada@example.com"}', "--nats", url)
        assert sent.returncode == 0, sent.stderr
        event_id = sent.stdout.strip()
        await wait_until(lambda: "shop-audit-user-events" in dev.log() and "run completed" in dev.log())

        bad = meshflow("send", "user signup", "--nats", url)
        assert bad.returncode == 1
        assert "invalid event name" in bad.stderr

        from examples.signup import process_signup

        def signup_sleeping() -> bool:
            shown = meshflow("run", process_signup.run_id_for(event_id), "--nats", url)
            return shown.returncode == 0 and json.loads(shown.stdout)["status"] == "sleeping"

        await wait_until(signup_sleeping, timeout=30, message="the signup run sleeps for 3 days")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web}") as http:
            page = await http.get(f"/runs/{process_signup.run_id_for(event_id)}")
        assert page.status_code == 200
        assert "wait-for-onboarding" in page.text

        cancelled = meshflow("cancel", process_signup.run_id_for(event_id), "--nats", url)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() == "cancelling"

        def signup_cancelled() -> bool:
            shown = meshflow("run", process_signup.run_id_for(event_id), "--nats", url)
            return shown.returncode == 0 and json.loads(shown.stdout)["status"] == "cancelled"

        await wait_until(signup_cancelled, timeout=30, message="the signup run is cancelled")
        replayed = meshflow("replay", process_signup.run_id_for(event_id), "--nats", url)
        assert replayed.returncode == 0, replayed.stderr
        unknown = meshflow("cancel", "01NOSUCHRUN0000000000000000", "--nats", url)
        assert unknown.returncode == 1
        assert "does not exist" in unknown.stderr
    assert dev.code == 0, dev.log()[-3000:]
    assert "meshflow dev stopped" in dev.log()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_command_or_the_dashboard_with_nothing_listening_says_so_within_seconds() -> None:
    nats = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    send = start("send", "user/signup", "--nats", nats)
    board = start("dashboard", "--nats", nats, "--port", str(free_port()))  # at the same time
    for proc in (send, board):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "nothing is listening there" in err
        assert "Traceback" not in err
        assert "http://127.0.0.1" not in out  # the dashboard never said it was up
    assert time.monotonic() - started < 15  # 5 s of retries, not 30


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshflow", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_http_url_is_refused_saying_what_to_use() -> None:
    shown = meshflow("run", "01J0000000000000000000000", "--nats", "http://127.0.0.1:8222")
    assert shown.returncode == 1
    assert "use nats://host:4222" in shown.stderr
    assert "monitoring port" in shown.stderr


@pytest.mark.slow
async def test_a_second_dev_stack_on_the_same_data_is_refused_before_it_opens_the_store(
    tmp_path: Path,
) -> None:
    async with DevStack(tmp_path) as dev:
        second = meshflow("dev", "--data", str(tmp_path / "data"), "--port", str(free_port()))
        assert second.returncode == 1
        assert "in use by process" in second.stderr
        assert "Traceback" not in second.stderr
        assert meshflow("send", "user/signup", "--nats", dev.nats).returncode == 0  # the first serves on


async def test_a_worker_serves_metrics_and_health_on_the_port_it_is_given(
    nats_server: EmbeddedServer, namespace: str
) -> None:
    port = free_port()
    command = [sys.executable, "-m", "meshflow", "worker", "examples:apps", "--nats", nats_server.url]
    command += ["--namespace", namespace, "--metrics-port", str(port)]
    worker = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            async def healthy() -> bool:
                try:
                    return (await http.get("/health")).status_code == 200
                except httpx.TransportError:  # not listening yet
                    return False

            await wait_until(healthy, timeout=30, message="the worker's /health")
            metrics = await http.get("/metrics")
        assert "meshflow_nats_connected 1.0" in metrics.text
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output[-3000:]
    assert f"url=http://127.0.0.1:{port}/metrics" in output
