"""The worker process: connects, provisions, pulls, serves control requests, stops gracefully.

Per function it binds two durable consumers: ``fn-{app}-{fn}`` on the events stream (fan-out: a
trigger claims one run per event, `Triggers`) and ``run-{app}-{fn}`` on the runs stream (advance a
run, `Passes`); and it pulls from the ``route-{name}`` consumers of the event names runs wait for
(`Router`). Everything a run's pass does is in ``meshflow.passes``; this module only moves
deliveries to it. One worker of the namespace at a time also sweeps for stuck runs (`Sweeper`).

In-flight work is bounded by ``concurrency`` (`InFlight`); suspended runs hold nothing here (local
timers for near deadlines aside, see ``timers``). Given a ``metrics_port``, it serves ``/metrics``
and ``/health`` (``meshflow.monitor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import msgspec
import structlog

from . import control
from .bus import (
    ACK_WAIT,
    Bus,
    ConsumerUnavailable,
    Delivery,
    Listening,
    Notice,
    Pull,
    Source,
    decode_run_message,
)
from .connection import NatsAuth, check_durability, open_nats
from .durations import now_ms, parse_duration
from .errors import MeshflowError, NatsError
from .flow.slots import Slots
from .flow.starts import Starts
from .flow.windows import Windows
from .functions import App, Function
from .ids import new_ulid
from .inflight import InFlight
from .lifecycle import Lifecycle
from .logs import LogShipper, capture_stdlib
from .names import Names
from .passes import Passes
from .presence import Presence
from .router import Router
from .settle import Wake
from .store import FunctionInfo, Store
from .sweeper import Sweeper
from .threads import DaemonThreads
from .triggers import Triggers, cron_key

if TYPE_CHECKING:
    from .monitor import Monitor

_FETCH_TIMEOUT = 1.0
_MAX_FETCH = 64

log = structlog.get_logger("meshflow.worker")

Handle = Callable[[Delivery], Awaitable[None]]


class Worker:
    """Serves the functions of one or more apps.

    Args:
        *apps: the apps whose functions this worker runs.
        nats: the NATS server URL (or several, for a cluster).
        namespace: the deployment's namespace (default ``mf``).
        concurrency: how many events and runs it works on at once.
        worker_id: a name for this worker (default: host, pid and a random suffix).
        ack_wait: seconds before a message (and a run lease) held by a silent worker is handed to
            another one; how fast work moves on after a worker dies. The function's consumers take
            the value of the worker that last provisioned them.
        auth: credentials and TLS for NATS (`NatsAuth`).
        replicas: replicas of the streams and buckets; existing ones are changed to this count.
            Default: 3 on a cluster of three or more servers, else 1, for those it creates
            (existing ones are left as they are, with a warning when they have fewer).
        monitor: the server's monitoring URL (``http://host:8222``), to check at start that it
            syncs every write (the system account, if the worker's user has it, works too).
        shutdown_grace: seconds a stopping worker waits for the steps it runs to end (`stop`).
        capture_logging: also keep the stdlib ``logging`` records emitted while a run's code runs
            with the run's logs (``ctx.logger``'s are always kept).
        log_retention: how long the logs stream keeps runs' logs (a duration, default 7 days);
            given, it is applied to the stream as it exists too.
        metrics_port: serve ``/metrics`` and ``/health`` on this port (``meshflow.monitor``; 0: a free
            one, read back from ``metrics_port`` once started); None (default): none, and no metrics.
        metrics_host, health_max_lag: the address they bind (default loopback only); the seconds
            of event-loop lag past which ``/health`` fails.
    """

    def __init__(
        self,
        *apps: App,
        nats: str | Sequence[str] = "nats://127.0.0.1:4222",
        namespace: str = "mf",
        concurrency: int = 64,
        worker_id: str | None = None,
        ack_wait: float = ACK_WAIT,
        auth: NatsAuth | None = None,
        replicas: int | None = None,
        monitor: str | None = None,
        shutdown_grace: float = 30.0,
        capture_logging: bool = False,
        log_retention: str | dt.timedelta | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        health_max_lag: float = 5.0,
    ) -> None:
        if not apps:
            raise MeshflowError("a worker needs at least one App")
        self.functions: dict[str, Function] = {}
        for app in apps:
            for fn in app.functions:
                if fn.full_id in self.functions:
                    raise MeshflowError(f"function {fn.full_id} is served twice by this worker")
                self.functions[fn.full_id] = fn
        self.servers = nats
        self.auth = auth
        self.replicas = replicas
        self.monitor = monitor
        self.names = Names(namespace)
        self.ack_wait = ack_wait
        self.shutdown_grace = shutdown_grace
        self.capture_logging = capture_logging
        self.log_retention = parse_duration(log_retention, what="log_retention") if log_retention else None
        self.metrics_port = metrics_port  # once started, the port bound
        self.metrics_host = metrics_host
        self.health_max_lag = health_max_lag
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_ulid()[-6:]}"
        self.inflight = InFlight(concurrency)
        self.threads = DaemonThreads(concurrency)  # for plain `def` step handlers
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started_at = 0
        self._listening: list[Listening] = []  # cancel signals and control requests
        self.failure: NatsError | None = None  # why the worker stopped on its own, if it did
        self._stopper: asyncio.Future[None] | None = None
        self._forced = asyncio.Event()
        self.bus: Bus
        self.store: Store
        self.passes: Passes
        self.triggers: Triggers
        self.endpoint: Monitor | None = None  # /metrics and /health, given a metrics_port

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, provision streams, buckets and consumers, and start pulling."""
        nc = await open_nats(
            self.servers, name=f"meshflow-worker-{self.id}", auth=self.auth, on_closed=self._connection_lost
        )
        self.bus = bus = Bus(nc, self.names)
        self.store = store = Store(nc, self.names, bus.requests)
        self.router = Router(store, bus, self.names, self._follow_route, ack_wait=self.ack_wait)
        life = Lifecycle(store, bus, self.router, self.functions)
        lease_ms = int(self.ack_wait * 1000)
        self.logs = LogShipper(bus.emit, self.names, worker=self.id, capture_stdlib=self.capture_logging)
        self.passes = Passes(
            worker_id=self.id,
            ack_wait=self.ack_wait,
            store=store,
            bus=bus,
            router=self.router,
            life=life,
            slots=Slots(store, bus, lease_ms),
            inflight=self.inflight,
            threads=self.threads,
            logs=self.logs,
        )
        self.triggers = Triggers(
            worker_id=self.id,
            lease_ms=lease_ms,
            store=store,
            bus=bus,
            life=life,
            starts=Starts(store),
            windows=Windows(store, bus),
            passes=self.passes,
        )
        if self.metrics_port is not None:  # before the first pass, so that every run counts
            from .monitor import Monitor  # here: a worker without the endpoint loads no metrics

            self.endpoint = Monitor.of(self, self.metrics_host, self.metrics_port, self.health_max_lag)
        await store.provision(bus, self.replicas, audit=True, log_retention=self.log_retention)
        self.logs.start()
        if self.capture_logging:
            capture_stdlib()
        for fn in self.functions.values():
            await bus.ensure_consumers(fn, ack_wait=self.ack_wait)
            await store.put_function(FunctionInfo.of(fn))
        n = self.names
        for fn in self.functions.values():
            if fn.triggers:  # a function with cron triggers only has no events consumer
                events = await bus.pull(n.events_stream, n.trigger_consumer(fn.app_id, fn.id), Source.EVENT)
                self._follow(events, fn.full_id, _bound(fn, self.triggers.on_event))
            runs = await bus.pull(n.runs_stream, n.run_consumer(fn.app_id, fn.id), Source.RUN)
            self._follow(runs, fn.full_id, _bound(fn, self._on_run))
        for fn in self.functions.values():
            for spec in fn.cancel_on:
                await self.router.ensure_route(spec.event)
        await self.router.discover()
        self._loops.append(asyncio.create_task(self.router.keep_discovering(self._stopping)))
        self.sweeper = Sweeper(store, bus, self.id)
        self._loops.append(asyncio.create_task(self.sweeper.loop(self._stopping)))
        self._started_at = now_ms()
        await check_durability(nc, self.monitor)
        presence = Presence(store, self.id, self.functions, self._started_at)
        await presence.announce()
        self._loops.append(asyncio.create_task(presence.loop(self._stopping)))
        self._listening.append(await bus.listen(n.cancel_subjects, self._on_cancel_signal))
        self._listening.append(
            await bus.listen(n.control_subjects, self._on_control, queue="meshflow-control")
        )
        for fn in self.functions.values():
            for cron in fn.crons:
                await bus.schedule_cron(fn, cron_key(cron), cron.next_after(now_ms()))
        if self.endpoint is not None:  # last: /health answers once the worker serves
            try:
                self.metrics_port = await self.endpoint.start()
            except MeshflowError:  # the port is taken: a worker that cannot be watched does not run
                await self.stop(grace=0)
                raise
        log.info("worker started", worker=self.id, functions=sorted(self.functions), namespace=n.ns)

    async def stop(self, grace: float | None = None) -> None:
        """Stop pulling, let in-flight work finish for up to ``grace`` seconds (default: the
        worker's ``shutdown_grace``), then disconnect.

        Work still running after ``grace`` (or at once, after `force`) is cancelled: its runs are
        let go, so another worker takes them over at once, and its messages are not acked, so
        they are redelivered; committed steps are never lost or re-run. A step handler still
        running in a thread is left to end with the process (it runs again elsewhere, counted
        as another attempt).
        """
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        self._stopping.set()
        grace = self.shutdown_grace if grace is None else grace
        log.info("worker stopping", worker=self.id)
        for listening in reversed(self._listening):  # control requests go to other workers now
            await listening.close()
        if self._started_at:
            self.passes.timers.close()  # their durable schedules remain
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._started_at:
            self.passes.stopping = True  # passes end after the step they run, and let their runs go
        if self.inflight.tasks:
            log.warning(
                f"waiting up to {grace:.0f} s for {len(self.inflight.tasks)} runs in flight to end the "
                "step they run (signal again to stop now: they are then left to another worker)",
                worker=self.id,
            )
        await self.inflight.drain(grace, self._forced)
        self.threads.close()
        if self._started_at:
            await self.logs.stop()
            with contextlib.suppress(MeshflowError):
                await self.store.drop_worker(self.id)
        if hasattr(self, "bus"):
            await self.bus.close()
        if self.endpoint is not None:
            await self.endpoint.stop()
        self._stopped.set()
        log.info("worker stopped", worker=self.id)

    async def serve(self) -> None:
        """Start, then run until SIGTERM or SIGINT (or `stop`), then stop gracefully.

        Raises:
            NatsError: the connection to NATS closed for good (the worker stopped, so that its
                supervisor can start it again).
        """
        try:
            await self.start()
        except NatsError:
            if self.failure is None:
                raise
            await self._stopped.wait()  # it closed for good while the worker started: say that
            raise self.failure from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal)
        await self._stopped.wait()
        if self.failure is not None:
            raise self.failure

    def _on_signal(self) -> None:
        """SIGTERM or SIGINT: stop gracefully; a second one: stop now (`force`)."""
        if self._stopping.is_set():
            self.force()
        else:
            self._stopper = asyncio.ensure_future(self.stop())

    def force(self) -> None:
        """Stop waiting for the runs in flight: cancel them now (their runs are let go and their
        messages redelivered to another worker)."""
        if not self._forced.is_set():
            log.warning("stopping now: the runs in flight are left to another worker", worker=self.id)
            self._forced.set()

    async def _connection_lost(self, reason: str) -> None:
        """The connection closed for good: a worker serving nothing must not live on."""
        if self._stopping.is_set():
            return
        self.failure = NatsError(f"worker {self.id}: the connection to NATS closed for good ({reason})")
        log.error("the connection to NATS closed for good; the worker stops", worker=self.id, reason=reason)
        self._stopper = asyncio.ensure_future(self.stop(grace=5.0))

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the worker started: passes abandoned because another pass took their
        run over (a stall past the ack wait), runs the sweeper woke, deliveries in flight now."""
        started = self._started_at != 0
        return {
            "passes_abandoned": self.passes.abandoned if started else 0,
            "runs_swept": self.sweeper.woken if started else 0,
            "in_flight": len(self.inflight.tasks),
        }

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- pulling ------------------------------------------------------------------------------
    def _follow(self, pull: Pull, label: str, handle: Handle) -> None:
        self._loops.append(asyncio.create_task(self._pull_loop(pull, label, handle)))

    async def _pull_loop(self, pull: Pull, label: str, handle: Handle) -> None:
        """Fetch as many messages as there are free places and handle each in its own task."""
        backoff = 0.05
        while not self._stopping.is_set():
            await self.inflight.room()  # wait for one free place, then size the batch by all free
            try:
                deliveries = await pull.fetch(min(_MAX_FETCH, self.inflight.free), _FETCH_TIMEOUT)
                backoff = 0.05
            except MeshflowError as exc:  # connection lost, server restarting: keep trying
                deliveries = []
                # A consumer without a leader (just created, or an election: seconds) answers
                # 503; that is routine unless it lasts.
                routine = isinstance(exc, ConsumerUnavailable) and backoff < 2.0
                (log.info if routine else log.warning)(
                    "fetch failed; retrying", consumer=label, error=str(exc)
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            for delivery in deliveries:
                await self.inflight.start(label, delivery, handle)

    async def _on_run(self, fn: Function, delivery: Delivery) -> None:
        try:
            message = decode_run_message(delivery.data)
        except msgspec.DecodeError as exc:
            log.error("undecodable run message dropped", function=fn.full_id, error=str(exc))
            await delivery.term()
            return
        if message.reason == "cron":
            await self.triggers.on_cron(fn, delivery, message)
            return
        await self.passes.resume(fn, delivery, Wake(message.reason, message.key), message.run_id)

    # --- routes: events resume waits ----------------------------------------------------------
    async def _follow_route(self, event_name: str, token: str) -> None:
        pull = await self.bus.pull(self.names.events_stream, self.names.route_consumer(token), Source.ROUTE)
        self._follow(pull, f"route {event_name}", self._on_routed)

    async def _on_routed(self, delivery: Delivery) -> None:
        await self.router.route(delivery.data, delivery.seq, delivery.stored_ms)
        await delivery.ack()

    # --- core messages --------------------------------------------------------------------------
    async def _on_cancel_signal(self, notice: Notice) -> None:
        self.passes.signal_cancel(notice.subject.rpartition(".")[2])

    async def _on_control(self, notice: Notice) -> None:
        await control.serve(self.store, self.bus, notice)


def _bound(fn: Function, handle: Callable[[Function, Delivery], Awaitable[None]]) -> Handle:
    async def bound(delivery: Delivery) -> None:
        await handle(fn, delivery)

    return bound
