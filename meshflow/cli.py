"""The ``meshflow`` command: ``dev``, ``worker``, ``send`` and ``run``.

    meshflow dev [APP]                 embedded nats-server + a worker for APP (default: the examples)
    meshflow worker APP --nats URL     a worker process; run any number, anywhere
    meshflow send NAME --data JSON     send an event
    meshflow run RUN_ID                show a run, its steps, output or error

APP is ``module:attribute`` naming an `App` (or a list of apps). The NATS URL and namespace come
from ``--nats`` / ``--namespace`` or ``MESHFLOW_NATS`` / ``MESHFLOW_NAMESPACE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
from collections.abc import AsyncGenerator, Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec

from . import bench
from .bus import ACK_WAIT
from .client import connect
from .connection import NatsAuth
from .errors import MeshflowError
from .events import Event
from .functions import App
from .logging import configure_logging
from .logs import LogRecord, render
from .names import DEFAULT_NAMESPACE
from .server import EmbeddedServer
from .worker import Worker

#: Where ``meshflow dev`` and ``meshflow dashboard`` serve the dashboard (``dashboard.DEFAULT_PORT``).
DASHBOARD_PORT = 8288

DEFAULT_URL = "nats://127.0.0.1:4222"
DEV_APP = "examples:apps"


def load_apps(spec: str) -> list[App]:
    """Import ``module:attribute`` and return the `App` (or apps) it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise MeshflowError(f"invalid app {spec!r}: use module:attribute, like myservice.flows:app")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like uvicorn: modules next to where you run it
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MeshflowError(f"cannot import {module_name!r} for app {spec!r}: {exc}") from exc
    target = getattr(module, attr or "app", None)
    apps = target if isinstance(target, list | tuple) else [target]
    if not apps or not all(isinstance(a, App) for a in apps):
        raise MeshflowError(f"{spec!r} is not a meshflow.App (or a list of them)")
    return list(apps)


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _worker(args: argparse.Namespace) -> None:
    worker = Worker(
        *load_apps(args.app),
        nats=args.nats.split(","),
        namespace=args.namespace,
        concurrency=args.concurrency,
        ack_wait=args.ack_wait,
        auth=_auth(args),
        replicas=args.replicas,
        monitor=args.nats_monitor,
        shutdown_grace=args.shutdown_grace,
        capture_logging=args.capture_logging,
        log_retention=args.log_retention,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        health_max_lag=args.health_max_lag,
    )
    if args.provision_only:  # create streams, buckets and consumers, register the functions, exit
        await worker.start()
        await worker.stop()
        return
    await worker.serve()


def _command() -> str:
    """How to call this ``meshflow`` again from the current directory (it may not be on PATH)."""
    exe = Path(sys.argv[0])
    if exe.name == "meshflow" and exe.is_absolute():
        try:
            return str(exe.relative_to(Path.cwd()))
        except ValueError:
            return str(exe)
    return "meshflow"


async def _dev(args: argparse.Namespace) -> None:
    from dashboard import Dashboard  # imported here: workers and other commands do not need it

    apps = load_apps(args.app)
    data = args.data_dir
    server = EmbeddedServer(data, port=args.port)
    server.start()  # blocks the loop for the server's start-up only; nothing else runs yet
    try:
        worker = Worker(*apps, nats=server.url, namespace=args.namespace, capture_logging=True)
        board = Dashboard(server.url, namespace=args.namespace, port=args.dashboard_port)
        cmd = _command()
        print(
            f"meshflow dev\n"
            f"  dashboard    {board.url}\n"
            f"  nats-server  {server.url}  (JetStream data in {data})\n"
            f"  functions    {', '.join(sorted(f.full_id for a in apps for f in a.functions))}\n"
            f'  send events  {cmd} send user/signup --data \'{{"email": "a@b.c"}}\' --nats {server.url}\n'
            f"  show a run   {cmd} run RUN_ID --nats {server.url}\n"
            f"  its logs     {cmd} logs RUN_ID --follow --nats {server.url}\n"
            f"  Ctrl-C stops everything.",
            flush=True,
        )
        web = asyncio.create_task(board.serve())
        try:
            await worker.serve()
        finally:
            board.stop()
            await web
    finally:
        server.stop()
        print("meshflow dev stopped", flush=True)


async def _dashboard(args: argparse.Namespace) -> None:
    from dashboard import Auth, Dashboard

    auth = Auth(token=args.token or None, username=args.user or None, password=args.password or None)
    servers = args.nats.split(",")
    # connected first: a NATS problem is one clear line, not a served URL and a traceback
    async with connect(servers, namespace=args.namespace, auth=_auth(args), read_only=True) as client:
        board = Dashboard(
            servers,
            namespace=args.namespace,
            host=args.host,
            port=args.port,
            auth=auth,
            nats_auth=_auth(args),
            client=client,
        )
        print(f"meshflow dashboard  {board.url}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, board.stop)
        await board.serve()


async def _send(args: argparse.Namespace) -> None:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise MeshflowError(f"--data is not valid JSON: {exc}") from None
    kwargs: dict[str, Any] = {"name": args.name, "data": data}
    if args.id:
        kwargs["id"] = args.id
    async with connect(
        args.nats.split(","), namespace=args.namespace, auth=_auth(args), provision=False
    ) as client:
        ids = await client.send(Event(**kwargs))
    print(ids[0])


async def _show_run(args: argparse.Namespace) -> None:
    async with connect(args.nats.split(","), namespace=args.namespace, auth=_auth(args)) as client:
        run = await client.get_run(args.run_id)
    print(json.dumps(msgspec.to_builtins(run), indent=2))


async def _logs(args: argparse.Namespace) -> None:
    async with connect(args.nats.split(","), namespace=args.namespace, auth=_auth(args)) as client:
        records = client.follow_logs(args.run_id) if args.follow else _each(await client.logs(args.run_id))
        async for record in records:
            print(msgspec.json.encode(record).decode() if args.json else render(record), flush=True)


async def _each(items: Sequence[LogRecord]) -> AsyncGenerator[LogRecord, None]:
    for item in items:
        yield item


async def _cancel(args: argparse.Namespace) -> None:
    async with connect(args.nats.split(","), namespace=args.namespace, auth=_auth(args)) as client:
        asked = await client.cancel(args.run_id, reason=args.reason)
    print("cancelling" if asked else "already finished")


async def _replay(args: argparse.Namespace) -> None:
    async with connect(args.nats.split(","), namespace=args.namespace, auth=_auth(args)) as client:
        print(await client.replay(args.run_id))


_AUTH_FLAGS = (
    ("--nats-user", "user", "NATS user (env MESHFLOW_NATS_USER; with --nats-password)"),
    ("--nats-password", "password", "env MESHFLOW_NATS_PASSWORD"),
    ("--nats-token", "token", "NATS token (env MESHFLOW_NATS_TOKEN)"),
    ("--nats-nkey", "nkey_seed", "nkey seed file (env MESHFLOW_NATS_NKEY)"),
    ("--nats-creds", "creds", ".creds file (env MESHFLOW_NATS_CREDS)"),
    ("--nats-tls-ca", "tls_ca", "CA bundle (env MESHFLOW_NATS_TLS_CA)"),
    ("--nats-tls-cert", "tls_cert", "client certificate (env MESHFLOW_NATS_TLS_CERT)"),
    ("--nats-tls-key", "tls_key", "client key (env MESHFLOW_NATS_TLS_KEY)"),
    ("--nats-inbox-prefix", "inbox_prefix", "reply subjects prefix (env MESHFLOW_NATS_INBOX_PREFIX)"),
)


def _auth(args: argparse.Namespace) -> NatsAuth:
    return NatsAuth(**{field: getattr(args, f"nats_{field}", None) for _, field, _ in _AUTH_FLAGS})


def _parser() -> argparse.ArgumentParser:
    env_nats = os.environ.get("MESHFLOW_NATS", DEFAULT_URL)
    env_ns = os.environ.get("MESHFLOW_NAMESPACE", DEFAULT_NAMESPACE)
    parser = argparse.ArgumentParser(prog="meshflow", description="Durable functions on NATS JetStream.")
    parser.add_argument("--log-level", default=os.environ.get("MESHFLOW_LOG_LEVEL", "info"))
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nats", default=env_nats, help="NATS URL(s), comma separated (env MESHFLOW_NATS)")
        p.add_argument("--namespace", default=env_ns, help="deployment namespace (env MESHFLOW_NAMESPACE)")
        env = NatsAuth.from_env()
        for flag, field, what in _AUTH_FLAGS:
            p.add_argument(flag, dest=f"nats_{field}", default=getattr(env, field), help=what)

    p = sub.add_parser("worker", help="run a worker for an app")
    p.add_argument("app", help="module:attribute naming a meshflow.App")
    common(p)
    p.add_argument("--concurrency", type=int, default=64, help="events and runs worked on at once")
    p.add_argument(
        "--ack-wait", type=float, default=ACK_WAIT, help="seconds before a dead worker's work moves on"
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="replicas of the streams and buckets, existing ones too (default: 3 on a cluster, new ones)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds a stopping worker waits for the steps it runs (a second signal stops it at once)",
    )
    p.add_argument(
        "--capture-logging",
        action="store_true",
        help="keep the stdlib logging records emitted while a run's code runs with its logs",
    )
    p.add_argument(
        "--log-retention",
        default=None,
        help="how long runs' logs are kept, e.g. 7d (default 7 days; applied to the stream)",
    )
    p.add_argument(
        "--provision-only",
        action="store_true",
        help="create the streams, buckets and consumers and register the functions, then exit",
    )
    p.add_argument(
        "--nats-monitor",
        default=os.environ.get("MESHFLOW_NATS_MONITOR"),
        help="the server's monitoring URL, to check it syncs every write (env MESHFLOW_NATS_MONITOR)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics (Prometheus) and /health on this port (0: a free one, logged); default: off",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="the address /metrics and /health bind")
    p.add_argument(
        "--health-max-lag",
        type=float,
        default=5.0,
        help="seconds of event-loop lag past which /health answers 503",
    )
    p.set_defaults(func=_worker)

    p = sub.add_parser("dev", help="embedded nats-server and a worker for an app (default: the examples)")
    p.add_argument("app", nargs="?", default=DEV_APP, help=f"module:attribute (default {DEV_APP})")
    p.add_argument("--port", type=int, default=4222, help="nats-server client port on 127.0.0.1")
    p.add_argument("--data", default=".meshflow", help="where the embedded server keeps its data")
    p.add_argument("--namespace", default=env_ns)
    p.add_argument(
        "--dashboard-port", type=int, default=DASHBOARD_PORT, help="the dashboard's port on 127.0.0.1"
    )
    p.set_defaults(func=_dev)

    p = sub.add_parser("dashboard", help="the web dashboard for a deployment")
    common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; other than loopback needs auth")
    p.add_argument("--port", type=int, default=DASHBOARD_PORT)
    p.add_argument(
        "--token", default=os.environ.get("MESHFLOW_DASHBOARD_TOKEN"), help="env MESHFLOW_DASHBOARD_TOKEN"
    )
    p.add_argument(
        "--user", default=os.environ.get("MESHFLOW_DASHBOARD_USER"), help="env MESHFLOW_DASHBOARD_USER"
    )
    p.add_argument(
        "--password",
        default=os.environ.get("MESHFLOW_DASHBOARD_PASSWORD"),
        help="env MESHFLOW_DASHBOARD_PASSWORD",
    )
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("send", help="send an event")
    p.add_argument("name", help="event name, like user/signup")
    p.add_argument("--data", default="{}", help="the event's data as a JSON object")
    p.add_argument("--id", default=None, help="event id (default: a new ULID); the dedupe key")
    common(p)
    p.set_defaults(func=_send)

    p = sub.add_parser("run", help="show a run: status, steps, output or error")
    p.add_argument("run_id")
    common(p)
    p.set_defaults(func=_show_run)

    p = sub.add_parser("logs", help="what a run logged (ctx.logger), one line per record")
    p.add_argument("run_id")
    p.add_argument("--follow", "-f", action="store_true", help="then what it logs, live, until it ends")
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    common(p)
    p.set_defaults(func=_logs)

    p = sub.add_parser("cancel", help="cancel a run (it stops before its next step)")
    p.add_argument("run_id")
    p.add_argument("--reason", default="cancelled from the command line")
    common(p)
    p.set_defaults(func=_cancel)

    p = sub.add_parser("replay", help="run a run's function again from the same event; prints the new run id")
    p.add_argument("run_id")
    common(p)
    p.set_defaults(func=_replay)

    p = sub.add_parser("bench", help="benchmark workloads against the raw JetStream limit")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dev":
        args.data_dir = Path(args.data).resolve()
    configure_logging(args.log_level, json=args.log_json)
    try:
        _run(args.func(args))
    except KeyboardInterrupt:
        return 130
    except MeshflowError as exc:
        print(f"meshflow: {exc}", file=sys.stderr)
        return 1
    return 0
