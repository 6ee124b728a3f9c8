"""Least privilege: meshflow runs under the NATS identities of ``deploy/nats/accounts.conf``.

One nats-server loads that file as shipped (included from a small config of the test's own, its
passwords from the environment). The admin provisions; a worker signed in as ``worker`` runs the
functions whose events a ``publisher`` sends; the ``dashboard`` reads runs and cancels them. A
publisher (in an account of its own) sends events and can do nothing else: it cannot read run
records or step results, not even by listening to replies. Only the admin deletes or purges
streams.

The server logs every request it denies, with the user and the connection's name. meshflow's
own connections are named ``meshflow-…``; the test's probes are not. So besides what each test
asserts, none of meshflow's connections may ever be denied anything: a missing rule shows up
there even where meshflow swallows the error (clean-up after a run ended is best effort).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from structlog.testing import capture_logs

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until

ACCOUNTS = Path(__file__).parents[2] / "deploy" / "nats" / "accounts.conf"
USERS = ("admin", "worker", "dashboard", "publisher", "sys")
DENIED_WITHIN = 0.5  # a denied request gets no answer: how long a probe waits for one
_VIOLATION = re.compile(r'"([^"]*)" - "\w+/user:(\w+)" - (\w+) Violation - Subject "([^"]+)"')

# --- the functions the worker serves ----------------------------------------------------------
app = meshflow.App("shop")


def charge(order: str, items: list[int]) -> dict[str, Any]:
    return {"order": order, "total": sum(items), "card": "4242-secret"}


@app.function("checkout", trigger="shop/order.placed", idempotency="event.data.order")
async def checkout(ctx: meshflow.Context) -> dict[str, Any]:
    receipt = await ctx.step.run("charge", charge, ctx.event.data["order"], ctx.event.data["items"])
    ctx.logger.info("charged", order=receipt["order"])  # kept in MF_LOGS by the worker identity
    await ctx.step.sleep("settle", "300ms")
    shipped = await ctx.step.wait_for_event(
        "shipped", event="shop/order.shipped", match="data.order", timeout="30s"
    )
    return {"total": receipt["total"], "carrier": shipped.data["carrier"] if shipped else None}


@app.function(
    "report",
    trigger="shop/report.asked",
    cancel_on=[meshflow.Cancel(event="shop/report.dropped", match="data.report")],
    timeouts=meshflow.Timeouts(finish="1h"),
)
async def report(ctx: meshflow.Context) -> str:
    await ctx.step.run("draft", lambda: "draft")
    await ctx.step.sleep("overnight", "1d")
    return "done"


# --- the server and the identities --------------------------------------------------------------
@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {user: f"{user}-{secrets.token_hex(8)}" for user in USERS}


def start_server(store: Path, passwords: dict[str, str]) -> EmbeddedServer:
    """A nats-server with the shipped accounts; the passwords reach it through its environment."""
    include = os.path.relpath(ACCOUNTS, store)  # nats-server resolves includes from the config's folder
    with pytest.MonkeyPatch.context() as env:
        for user, password in passwords.items():
            env.setenv(f"NATS_{user.upper()}_PASSWORD", password)
        return EmbeddedServer(store, extra_config=f'include "{include}"').start()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, passwords: dict[str, str]) -> Iterator[EmbeddedServer]:
    server = start_server(tmp_path_factory.mktemp("identities"), passwords)
    yield server
    server.stop()


# The reply inboxes each identity may use (accounts.conf): its own, so none overhears another's.
INBOXES = {"worker": "_INBOX_worker", "dashboard": "_INBOX_dashboard"}


@pytest.fixture(scope="module")
def auth(passwords: dict[str, str]) -> dict[str, meshflow.NatsAuth]:
    return {
        user: meshflow.NatsAuth(user=user, password=pw, inbox_prefix=INBOXES.get(user))
        for user, pw in passwords.items()
    }


def violations(server: EmbeddedServer) -> list[tuple[str, str, str, str]]:
    """Every request the server denied so far: (connection name, user, kind, subject)."""
    log = (server.store_dir / "nats-server.log").read_text()  # EmbeddedServer logs there
    return _VIOLATION.findall(log)


def meshflow_denied(server: EmbeddedServer) -> list[tuple[str, str, str, str]]:
    """What the server denied meshflow's own connections (workers, clients): should be nothing."""
    return [v for v in violations(server) if re.search(r":meshflow-", v[0])]


@pytest.fixture(scope="module")
async def worker(
    server: EmbeddedServer, auth: dict[str, meshflow.NatsAuth]
) -> AsyncIterator[meshflow.Worker]:
    """The admin provisions streams and buckets; then a worker runs as ``worker``."""
    async with meshflow.connect(server.url, auth=auth["admin"]):
        pass
    async with meshflow.Worker(app, nats=server.url, auth=auth["worker"], worker_id="w1") as running:
        yield running
    assert meshflow_denied(server) == []


@pytest.fixture
async def publisher(
    server: EmbeddedServer, auth: dict[str, meshflow.NatsAuth]
) -> AsyncIterator[meshflow.Client]:
    async with meshflow.connect(server.url, auth=auth["publisher"], provision=False) as client:
        yield client


@pytest.fixture
async def dashboard(
    server: EmbeddedServer, auth: dict[str, meshflow.NatsAuth]
) -> AsyncIterator[meshflow.Client]:
    """Connected the way the dashboard app connects (checking that streams and buckets exist;
    cancel and replay carried out by a worker)."""
    async with meshflow.connect(server.url, auth=auth["dashboard"], read_only=True) as client:
        yield client


class Probe:
    """A plain nats-py connection as one user, collecting the errors the server sends it."""

    def __init__(self, nc: NatsClient, errors: list[str]) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=DENIED_WITHIN)
        self.errors = errors

    async def denied(self, subject: str) -> None:
        """Wait until the server has told this connection that ``subject`` is denied to it."""
        await wait_until(
            lambda: any(f'violation for publish to "{subject.lower()}"' in e for e in self.errors),
            timeout=2,
            message=f"a permissions violation for {subject}",
        )

    async def cannot_request(self, subject: str, payload: bytes = b"") -> None:
        """A request to ``subject`` is dropped by the server: no answer, and a violation."""
        with pytest.raises(nats.errors.TimeoutError):
            await self.nc.request(subject, payload, timeout=DENIED_WITHIN)
        await self.denied(subject)


OpenProbe = Callable[[str], Awaitable[Probe]]


@pytest.fixture
async def probe(server: EmbeddedServer, passwords: dict[str, str]) -> AsyncIterator[OpenProbe]:
    """``await probe(user)``: a `Probe` signed in as ``user`` (closed after the test)."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_probe(user: str) -> Probe:
            errors: list[str] = []

            async def on_error(exc: Exception) -> None:
                errors.append(str(exc).lower())

            nc = await nats.connect(
                server.url,
                user=user,
                password=passwords[user],
                name=f"probe-{user}",
                error_cb=on_error,
                inbox_prefix=INBOXES.get(user, "_INBOX"),
            )
            stack.push_async_callback(nc.close)
            return Probe(nc, errors)

        yield open_probe


async def place_order(publisher: meshflow.Client, dashboard: meshflow.Client, order: str) -> meshflow.Run:
    """Run one checkout end to end: the publisher sends its events, the dashboard watches."""
    placed = meshflow.Event(name="shop/order.placed", data={"order": order, "items": [30, 12]})
    await publisher.send(placed)
    run_id = checkout.run_id_for(placed)
    await dashboard.wait_for_run(run_id, until=meshflow.RunStatus.WAITING, timeout=10)
    await publisher.send(meshflow.Event(name="shop/order.shipped", data={"order": order, "carrier": "owl"}))
    return await dashboard.wait_for_run(run_id, timeout=10)


# --- the tests ----------------------------------------------------------------------------------
async def test_a_worker_runs_what_a_publisher_sends_with_steps_a_sleep_and_a_wait(
    server: EmbeddedServer,
    worker: meshflow.Worker,
    publisher: meshflow.Client,
    dashboard: meshflow.Client,
) -> None:
    run = await place_order(publisher, dashboard, "o-1")

    assert run.status is meshflow.RunStatus.COMPLETED
    assert run.output == {"total": 42, "carrier": "owl"}
    assert [s.id for s in run.steps] == ["charge", "settle", "shipped"]
    assert [r.message for r in await dashboard.logs(run.id)] == ["charged"]  # read as the dashboard
    assert meshflow_denied(server) == []


async def test_an_order_placed_twice_runs_once(
    server: EmbeddedServer,
    worker: meshflow.Worker,
    publisher: meshflow.Client,
    dashboard: meshflow.Client,
) -> None:
    """The idempotency key is claimed in the flow bucket; the second claim reads who holds it."""
    first = await place_order(publisher, dashboard, "o-6")
    again = meshflow.Event(name="shop/order.placed", data={"order": "o-6", "items": [1]})
    await publisher.send(again)
    await place_order(publisher, dashboard, "o-7")  # placed after it: once it ran, `again` was seen

    assert first.status is meshflow.RunStatus.COMPLETED
    assert await dashboard.runs_for_event(again.id) == []
    assert meshflow_denied(server) == []


async def test_a_publisher_cannot_read_step_results_or_run_records(
    server: EmbeddedServer,
    worker: meshflow.Worker,
    publisher: meshflow.Client,
    dashboard: meshflow.Client,
    probe: OpenProbe,
) -> None:
    run = await place_order(publisher, dashboard, "o-2")
    first_step = json.dumps({"seq": 1, "next_by_subj": f"$KV.mf_steps.{run.id}.>"}).encode()
    record = f"$JS.API.DIRECT.GET.KV_mf_runs.$KV.mf_runs.{run.id}"
    admin, intruder = await probe("admin"), await probe("publisher")

    # What the publisher asks for exists: the admin gets it with the very same requests.
    assert b"4242-secret" in (await admin.nc.request("$JS.API.DIRECT.GET.KV_mf_steps", first_step)).data
    assert b'"total":42' in (await admin.nc.request(record)).data

    await intruder.cannot_request("$JS.API.DIRECT.GET.KV_mf_steps", first_step)
    await intruder.cannot_request(record)
    with pytest.raises(nats.errors.TimeoutError):  # nats-py's own reads: stream info, message get
        await intruder.js.key_value("mf_steps")
    await intruder.denied("$JS.API.STREAM.INFO.KV_mf_steps")
    with pytest.raises(nats.errors.TimeoutError):
        await intruder.js.get_msg("KV_mf_runs", seq=1)
    await intruder.denied("$JS.API.STREAM.MSG.GET.KV_mf_runs")
    await intruder.cannot_request("$JS.API.CONSUMER.CREATE.KV_mf_steps")  # no consumer to read with
    # Nor by listening to the writes as they happen.
    await intruder.nc.subscribe("$KV.mf_steps.>")
    await intruder.nc.subscribe("$KV.mf_runs.>")
    await wait_until(
        lambda: sum("violation for subscription" in e for e in intruder.errors) == 2,
        timeout=2,
        message="both subscriptions refused",
    )
    assert meshflow_denied(server) == []


@pytest.mark.parametrize("user", ["publisher", "dashboard", "worker"])
async def test_only_the_admin_deletes_or_purges_streams(
    server: EmbeddedServer, worker: meshflow.Worker, probe: OpenProbe, user: str
) -> None:
    admin, someone = await probe("admin"), await probe(user)
    before = (await admin.js.stream_info("MF_EVENTS")).state.messages

    attempts = {
        "$JS.API.STREAM.DELETE.MF_EVENTS": lambda: someone.js.delete_stream("MF_EVENTS"),
        "$JS.API.STREAM.PURGE.MF_EVENTS": lambda: someone.js.purge_stream("MF_EVENTS"),
        "$JS.API.STREAM.DELETE.KV_mf_steps": lambda: someone.js.delete_stream("KV_mf_steps"),
        "$JS.API.STREAM.PURGE.KV_mf_runs": lambda: someone.js.purge_stream("KV_mf_runs"),
        "$JS.API.CONSUMER.DELETE.MF_RUNS.run-shop-checkout": lambda: someone.js.delete_consumer(
            "MF_RUNS", "run-shop-checkout"
        ),
    }
    for subject, attempt in attempts.items():
        with pytest.raises(nats.errors.TimeoutError):
            await attempt()
        await someone.denied(subject)

    assert (await admin.js.stream_info("MF_EVENTS")).state.messages >= before > 0
    assert (await admin.js.stream_info("KV_mf_steps")).state.messages > 0
    assert (await admin.js.consumer_info("MF_RUNS", "run-shop-checkout")).name == "run-shop-checkout"


async def test_the_dashboard_reads_runs_cancels_them_and_sends_events(
    server: EmbeddedServer,
    worker: meshflow.Worker,
    publisher: meshflow.Client,
    dashboard: meshflow.Client,
    probe: OpenProbe,
) -> None:
    done = await place_order(publisher, dashboard, "o-3")
    asked = meshflow.Event(name="shop/report.asked", data={"report": "q3"})
    await dashboard.send(asked)  # its "send" page
    run_id = report.run_id_for(asked)
    await dashboard.wait_for_run(run_id, until=meshflow.RunStatus.SLEEPING, timeout=10)

    # Reads: a run with its steps, runs, events, functions, workers, consumer backlogs.
    assert (await dashboard.get_run(done.id)).steps[0].output["card"] == "4242-secret"
    runs, _ = await dashboard.list_runs(limit=100)
    assert {done.id, run_id} <= {r.id for r in runs}
    events, _ = await dashboard.list_events(name="shop/report.asked")
    assert asked.id in {event.id for _, event in events}
    assert "shop-report" in {f.full_id for f in await dashboard.functions()}
    assert [w.id for w in await dashboard.workers()] == ["w1"]
    assert set(await dashboard.backlog("shop-checkout")) == {"events", "runs"}

    # Control: cancel; the worker stops the run and drops its pending timers. Its metrics follow
    # the runs that finish (a plain subscription on meshflow/function.finished).
    async def first(items: AsyncIterator[Any], wanted: Callable[[Any], bool]) -> Any:
        async for item in items:  # other runs of the module's earlier tests may end meanwhile
            if wanted(item):
                return item
        return None

    async with contextlib.aclosing(await dashboard.follow_events("meshflow/function.finished")) as finished:
        assert await dashboard.cancel(run_id)
        ended = await asyncio.wait_for(first(finished, lambda e: e.data["run_id"] == run_id), 10)
        assert ended.data["status"] == "cancelled"
    async with contextlib.aclosing(await dashboard.follow_starts()) as starts:  # and starts
        await place_order(publisher, dashboard, "o-4")
        assert await asyncio.wait_for(first(starts, lambda f: f == "shop-checkout"), 10)
    cancelled = await dashboard.wait_for_run(run_id, timeout=10)
    assert cancelled.status is meshflow.RunStatus.CANCELLED
    admin = await probe("admin")

    async def no_timers_left() -> bool:
        info = await admin.js.stream_info("MF_RUNS", subjects_filter=f"mf.timer.{run_id}.>")
        return not info.state.subjects

    await wait_until(no_timers_left, timeout=10, message="the cancelled run's timers purged")
    assert not await dashboard.cancel(run_id)  # already ended: the worker says so
    with pytest.raises(meshflow.RunNotFoundError):
        await dashboard.cancel("01JUNKUNKNOWNRUN0000000000")

    # Replay, also carried out by a worker: a new run of the same event.
    again = await dashboard.replay(done.id)
    replayed = await dashboard.wait_for_run(again, timeout=10)
    assert (replayed.status, replayed.replay_of) == (meshflow.RunStatus.COMPLETED, done.id)

    # Not: writing any state (a run record, a step memo, the registry), waking or stopping runs
    # itself, emitting meshflow's own events, deleting streams.
    viewer = await probe("dashboard")
    for subject in (
        f"$KV.mf_runs.{done.id}",
        f"$KV.mf_steps.{run_id}.forged",
        "$KV.mf_registry.fn.shop-forged",
        "mf.run.shop.checkout",
    ):
        await viewer.cannot_request(subject, b"{}")
    await viewer.nc.publish(f"mf.cancel.{done.id}", b"")
    await viewer.denied(f"mf.cancel.{done.id}")
    await viewer.cannot_request("mf.ev.meshflow.function.finished", b"{}")
    with pytest.raises(nats.errors.TimeoutError):
        await viewer.js.delete_stream("MF_RUNS")
    await viewer.denied("$JS.API.STREAM.DELETE.MF_RUNS")
    assert meshflow_denied(server) == []


async def test_a_cancel_on_event_from_a_publisher_cancels_a_run(
    server: EmbeddedServer,
    worker: meshflow.Worker,
    publisher: meshflow.Client,
    dashboard: meshflow.Client,
) -> None:
    asked = meshflow.Event(name="shop/report.asked", data={"report": "q4"})
    await publisher.send(asked)
    run_id = report.run_id_for(asked)
    await dashboard.wait_for_run(run_id, until=meshflow.RunStatus.SLEEPING, timeout=10)

    await publisher.send(meshflow.Event(name="shop/report.dropped", data={"report": "q4"}))
    run = await dashboard.wait_for_run(run_id, timeout=10)

    assert run.status is meshflow.RunStatus.CANCELLED
    assert meshflow_denied(server) == []


async def test_a_publisher_sends_events_and_nothing_else(probe: OpenProbe) -> None:
    intruder = await probe("publisher")
    for subject in (
        "mf.ev.meshflow.function.failed",  # meshflow's own events: this one starts failure handlers
        "mf.run.shop.checkout",  # "advance run X"
        "mf.timer.01J0000000000000000000000.nap",  # a timer
        "$KV.mf_runs.01J0000000000000000000000",  # a run record
    ):
        await intruder.cannot_request(subject, b"{}")
    await intruder.nc.publish("mf.cancel.01J0000000000000000000000", b"")  # core: no reply to wait for
    await intruder.denied("mf.cancel.01J0000000000000000000000")


async def test_no_identity_overhears_the_step_results_workers_read(
    server: EmbeddedServer,
    worker: meshflow.Worker,
    publisher: meshflow.Client,
    dashboard: meshflow.Client,
    probe: OpenProbe,
) -> None:
    """Replies (acks, reads) come back on inboxes, and a client must be allowed to listen on its
    inboxes' prefix. Workers and the dashboard each have their own prefix (``_INBOX_worker``,
    ``_INBOX_dashboard``); publishers have an account of their own, where only publishers' acks
    pass. So only the workers hear the step results the workers read."""
    listening = {"publisher": "_INBOX.>", "dashboard": "_INBOX_dashboard.>", "worker": "_INBOX_worker.>"}
    heard: dict[str, list[bytes]] = {user: [] for user in listening}
    for user, subject in listening.items():
        listener = await probe(user)

        async def on_reply(msg: Any, replies: list[bytes] = heard[user]) -> None:
            replies.append(msg.data)

        await listener.nc.subscribe(subject, cb=on_reply)
        await listener.nc.flush()

    placed = meshflow.Event(name="shop/order.placed", data={"order": "o-5", "items": [30, 12]})
    await publisher.send(placed)
    run_id = checkout.run_id_for(placed)
    await dashboard.wait_for_run(run_id, until=meshflow.RunStatus.WAITING, timeout=10, steps=False)
    await publisher.send(meshflow.Event(name="shop/order.shipped", data={"order": "o-5", "carrier": "owl"}))
    run = await dashboard.wait_for_run(run_id, timeout=10, steps=False)
    assert run.output == {"total": 42, "carrier": "owl"}

    # the worker read the step result back when the run resumed: it went over a worker's inbox
    await wait_until(lambda: any(b"4242-secret" in data for data in heard["worker"]), message="a step result")
    await wait_until(lambda: len(heard["publisher"]) >= 2, message="the acks of the order's two events")
    assert all(json.loads(data)["stream"] == "MF_EVENTS" for data in heard["publisher"])
    assert heard["dashboard"]  # it hears its own reads...
    assert not any(b"4242-secret" in data for data in heard["dashboard"])  # ...and nothing else


@pytest.mark.parametrize(
    ("user", "others"),
    [
        ("dashboard", ["_INBOX.>", "_INBOX_worker.>", ">"]),
        ("worker", ["_INBOX.>", "_INBOX_dashboard.>", ">"]),
    ],
)
async def test_workers_and_the_dashboard_cannot_overhear_each_others_replies(
    server: EmbeddedServer, worker: meshflow.Worker, probe: OpenProbe, user: str, others: list[str]
) -> None:
    someone = await probe(user)
    for subject in others:
        await someone.nc.subscribe(subject)
    await wait_until(
        lambda: sum("violation for subscription" in e for e in someone.errors) == len(others),
        timeout=2,
        message="every subscription refused",
    )
    assert meshflow_denied(server) == []


@pytest.mark.parametrize("user", ["publisher", "dashboard"])
async def test_events_cannot_be_wiped_by_a_rollup(
    server: EmbeddedServer, worker: meshflow.Worker, probe: OpenProbe, user: str
) -> None:
    """A message with ``Nats-Rollup: all`` deletes every other message of its stream when the
    stream allows rollups. The events stream does not, so sending events cannot erase them."""
    admin, someone = await probe("admin"), await probe(user)
    await someone.js.publish("mf.ev.shop.noise", b"{}")  # an event it may send
    before = (await admin.js.stream_info("MF_EVENTS")).state.messages
    with pytest.raises(nats.js.errors.APIError, match=r"(?i)rollup"):
        await someone.js.publish("mf.ev.shop.noise", b"{}", headers={"Nats-Rollup": "all"})
    assert (await admin.js.stream_info("MF_EVENTS")).state.messages >= before


async def test_a_process_without_its_inbox_prefix_says_what_to_set(
    passwords: dict[str, str], tmp_path: Path
) -> None:
    """The dashboard's user may only use ``_INBOX_dashboard``: started without that prefix, it
    gets no replies, and says which setting fixes that instead of only timing out. (A server of
    its own: the others' logs must show no denial of meshflow's requests.)"""
    auth = meshflow.NatsAuth(user="dashboard", password=passwords["dashboard"])  # no inbox prefix
    own = start_server(tmp_path, passwords)
    with capture_logs() as logs, own:
        async with meshflow.connect(own.url, auth=auth, provision=False) as client:
            reading = asyncio.create_task(client.get_run("01JUNKUNKNOWNRUN0000000000"))
            await wait_until(
                lambda: any(e["log_level"] == "error" and "--nats-inbox-prefix" in e["event"] for e in logs),
                timeout=5,
                message="an error naming the setting",
            )
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, meshflow.NatsError):
                await reading
