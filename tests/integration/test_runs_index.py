"""The runs index: runs newest first by creation, filters answered by the server, and an index
that stays right through status changes, crashes between its writes and deployments from
before it."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

import meshflow
from meshflow import runindex
from meshflow.durations import now_ms
from meshflow.ids import new_ulid
from meshflow.runs import RunRecord, RunStatus, new_run
from meshflow.server import EmbeddedServer
from meshflow.store import Store
from meshflow.testing import wait_until

app = meshflow.App("idx")


@app.function("approve", trigger="idx/asked")
async def approve(ctx: meshflow.Context) -> str:
    got = await ctx.step.wait_for_event("answer", event="idx/answered", timeout="1h", match="data.key")
    return "approved" if got else "timed out"


@app.function("quick", trigger="idx/quick")
async def quick(ctx: meshflow.Context) -> int:
    return int(ctx.event.data["n"])


async def _ids(client: meshflow.Client, **filters: object) -> list[str]:
    """Every run the filters match, page after page (small pages, to cross their boundaries)."""
    out: list[str] = []
    cursor: int | None = None
    while True:
        runs, cursor = await client.list_runs(before=cursor, limit=3, **filters)  # type: ignore[arg-type]
        out.extend(r.id for r in runs)
        if cursor is None:
            return out


async def _make(store: Store, fn: str, status: RunStatus, at: int) -> RunRecord:
    record = new_run(new_ulid(at), app="idx", fn=fn, events=[], now=at, status=status)
    assert await store.create_run(record) is not None
    return record


async def _entries(store: Store, run_id: str) -> list[str]:
    """A run's entries in the index's two streams, as their subjects without the namespace."""
    out: list[str] = []
    for stream in (store.names.index_stream, store.names.live_stream):
        out += [e.subject.split(".", 1)[1] async for e in store.index.entries(stream) if e.run_id == run_id]
    return out


async def test_runs_are_listed_newest_first_by_creation_not_by_their_last_update(
    client: meshflow.Client,
) -> None:
    store = client._store
    base = now_ms()
    first = await _make(store, "a", RunStatus.QUEUED, base)
    second = await _make(store, "b", RunStatus.QUEUED, base + 1)
    third = await _make(store, "a", RunStatus.QUEUED, base + 2)
    got = await store.get_run(first.id)
    assert got is not None
    updated = msgspec.structs.replace(first, status=RunStatus.RUNNING, updated_at=base + 10)
    await store.update_run(updated, got[1], was=RunStatus.QUEUED)  # the oldest is updated last
    assert await _ids(client) == [third.id, second.id, first.id]
    assert await _ids(client, function_id="idx-a") == [third.id, first.id]
    assert await _ids(client, status=meshflow.RunStatus.QUEUED) == [third.id, second.id]
    assert await _ids(client, status=meshflow.RunStatus.RUNNING) == [first.id]
    assert await _ids(client, status=meshflow.RunStatus.RUNNING, function_id="idx-b") == []


async def test_filters_follow_a_run_through_its_statuses_and_leave_no_stale_entry(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    asked = meshflow.Event(name="idx/asked", data={"key": "k1"})
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await client.send(asked)
        run_id = approve.run_id_for(asked)
        await client.wait_for_run(run_id, until=meshflow.RunStatus.WAITING)
        assert await _ids(client, status=meshflow.RunStatus.WAITING) == [run_id]
        assert await _ids(client, status=meshflow.RunStatus.COMPLETED) == []
        await client.send(meshflow.Event(name="idx/answered", data={"key": "k1"}))
        await client.wait_for_run(run_id)
    assert await _ids(client, status=meshflow.RunStatus.WAITING) == []
    assert await _ids(client, status=meshflow.RunStatus.COMPLETED) == [run_id]
    assert await _ids(client, function_id="idx-approve") == [run_id]
    # the older status entries are purged (without waiting for the answer: poll for it)
    entries = await wait_until(
        lambda: _settled(client._store, run_id), timeout=10, message="older status entries purged"
    )
    assert entries == ["idx.new.idx-approve." + run_id, "idx.end.completed.idx-approve." + run_id]


async def _settled(store: Store, run_id: str) -> list[str] | None:
    entries = await _entries(store, run_id)
    return entries if len(entries) == 2 else None


async def test_many_runs_page_by_page_each_once_and_a_rare_status_among_them(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    events = [meshflow.Event(name="idx/quick", data={"n": i}) for i in range(40)]
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await client.send(events)
        for event in events:
            await client.wait_for_run(quick.run_id_for(event), timeout=30)
    store = client._store
    failed = await _make(store, "quick", RunStatus.FAILED, now_ms())
    listed = await _ids(client)
    assert len(listed) == 41
    assert len(set(listed)) == 41
    assert listed[0] == failed.id
    runs, _ = await client.list_runs(limit=41)
    assert [r.id for r in runs] == listed
    assert [r.created_at for r in runs] == sorted((r.created_at for r in runs), reverse=True)
    assert await _ids(client, status=meshflow.RunStatus.FAILED) == [failed.id]
    assert len(await _ids(client, status=meshflow.RunStatus.COMPLETED, function_id="idx-quick")) == 40


async def test_time_bounds_are_on_creation(client: meshflow.Client) -> None:
    store = client._store
    day = 86_400_000
    now = now_ms()
    store.index.enabled = False  # runs from before the index: the sweep fills them in
    old = await _make(store, "a", RunStatus.COMPLETED, now - 3 * day)
    mid = await _make(store, "a", RunStatus.COMPLETED, now - day)
    await client._bus.js.purge_stream(client.names.index_stream)
    await client._bus.js.purge_stream(client.names.live_stream)
    store.index = runindex.RunsIndex(store.requests, store.streams, client.names)
    await store.index.repair(store.iter_runs())
    new = await _make(store, "a", RunStatus.COMPLETED, now)
    since = dt.datetime.fromtimestamp((now - 2 * day) / 1000, dt.UTC)
    until = dt.datetime.fromtimestamp((now - day // 2) / 1000, dt.UTC)
    assert await _ids(client, since=since) == [new.id, mid.id]
    assert await _ids(client, until=until) == [mid.id, old.id]
    assert await _ids(client, since=since, until=until) == [mid.id]
    assert await _ids(client, since=since, status=meshflow.RunStatus.COMPLETED) == [new.id, mid.id]


async def test_a_crash_between_the_entry_and_the_record_shows_nothing_wrong_and_is_repaired(
    client: meshflow.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = client._store
    run = await _make(store, "a", RunStatus.RUNNING, now_ms())
    # a pass wrote the run's next status entry, then died before writing the record
    await store.index.moving(msgspec.structs.replace(run, status=RunStatus.COMPLETED))
    assert await _ids(client, status=meshflow.RunStatus.COMPLETED) == []  # checked against the record
    assert await _ids(client, status=meshflow.RunStatus.RUNNING) == [run.id]
    # a pass wrote the record but its purge of the older entry was lost
    done = await _make(store, "b", RunStatus.RUNNING, now_ms())
    got = await store.get_run(done.id)
    assert got is not None
    monkeypatch.setattr(store.index, "moved", _lost_purge)
    await store.update_run(msgspec.structs.replace(done, status=RunStatus.FAILED), got[1], was=done.status)
    assert await _ids(client, status=meshflow.RunStatus.RUNNING) == [run.id]
    assert await _ids(client, status=meshflow.RunStatus.FAILED) == [done.id]
    # the sweeper removes what contradicts a record (once it is older than a pass's writes)
    monkeypatch.setattr(runindex, "REPAIR_GRACE_MS", -1000)
    written, removed = await store.index.repair(store.iter_runs())
    assert (written, removed) == (0, 2)
    assert await _entries(store, run.id) == ["idx.new.idx-a." + run.id, "live.running.idx-a." + run.id]
    assert await _entries(store, done.id) == ["idx.new.idx-b." + done.id, "idx.end.failed.idx-b." + done.id]


async def _lost_purge(record: RunRecord, seq: int) -> None:
    return None


async def test_a_deployment_from_before_the_index_lists_from_its_records_until_the_sweep_fills_it(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    store = client._store
    base = now_ms()
    runs = [await _make(store, "a", RunStatus.COMPLETED, base + i) for i in range(5)]
    # as if the runs were made by a meshflow without the index: no entries, no ready marker
    await client._bus.js.purge_stream(client.names.index_stream)
    await client._bus.js.purge_stream(client.names.live_stream)
    async with meshflow.connect(nats_server.url, namespace=namespace) as fresh:
        assert not await fresh._store.index.ready()
        assert set(await _ids(fresh)) == {r.id for r in runs}  # read from the records meanwhile
        async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace) as worker:
            await wait_until(worker.store.index.ready, timeout=20, message="the first sweep filled it in")
    async with meshflow.connect(nats_server.url, namespace=namespace) as later:
        assert await _ids(later) == [r.id for r in reversed(runs)]
        assert await _ids(later, status=meshflow.RunStatus.COMPLETED) == [r.id for r in reversed(runs)]


async def test_a_time_range_deep_in_many_runs_is_found_by_a_search_not_by_reading_everything(
    client: meshflow.Client,
) -> None:
    store = client._store
    hour = 3_600_000
    start = now_ms() - 300 * hour
    runs = [await _make(store, "a", RunStatus.COMPLETED, start + i * hour) for i in range(300)]
    since = dt.datetime.fromtimestamp((start + 100 * hour) / 1000, dt.UTC)
    until = dt.datetime.fromtimestamp((start + 110 * hour) / 1000, dt.UTC)
    assert await _ids(client, since=since, until=until) == [r.id for r in reversed(runs[100:110])]
    # where the search puts the first read: past every run created before ``until`` (the
    # allowance for clocks is a minute), well before the newest
    stream = client.names.index_stream
    entries = {e.run_id: e.seq async for e in store.index.entries(stream) if e.kind == "new"}
    state = await store.streams.stream_state(stream)
    at = await store.index._seek(stream, 0, state.last_seq + 1, start + 110 * hour + runindex.CLOCK_SKEW_MS)
    assert entries[runs[110].id] <= at <= entries[runs[110].id] + 64 + 4


async def test_a_function_id_that_cannot_be_one_matches_nothing_and_never_reaches_a_filter(
    client: meshflow.Client,
) -> None:
    await _make(client._store, "a", RunStatus.COMPLETED, now_ms())
    for bad in ("*", ">", "idx-a.*", "idx a", "", "idx-a.>"):
        assert await client.list_runs(function_id=bad) == ([], None)
        assert await client.list_runs(function_id=bad, status=meshflow.RunStatus.COMPLETED) == ([], None)
    assert len((await client.list_runs(function_id="idx-a"))[0]) == 1
