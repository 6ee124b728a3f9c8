"""The client's read API: waiting for runs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

import meshflow
from meshflow.runs import RunRecord, RunStatus


async def test_wait_for_run_sees_a_write_its_live_subscription_missed(
    client: meshflow.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write can reach core subscribers before the stream stores it, so a waiter that subscribes
    in between hears nothing and reads the old record; the wait must still see the new one."""
    store = client._store
    now = time.time_ns() // 1_000_000
    record = RunRecord(
        id=meshflow.Event(name="x/y").id,
        app="a",
        function="a-f",
        fn="f",
        status=RunStatus.RUNNING,
        events=[],
        created_at=now,
        updated_at=now,
    )
    rev = await store.create_run(record)
    assert rev is not None
    subscribe = store.nc.subscribe

    async def deaf(subject: str, **kw: Any) -> Any:  # the live update never arrives
        return await subscribe(subject + ".nobody-publishes-here", **kw)

    first_read = asyncio.Event()
    get_run = store.get_run

    async def get_run_and_tell(run_id: str) -> Any:
        got = await get_run(run_id)
        first_read.set()
        return got

    monkeypatch.setattr(store.nc, "subscribe", deaf)
    monkeypatch.setattr(store, "get_run", get_run_and_tell)
    waiting = asyncio.ensure_future(client.wait_for_run(record.id, timeout=10, steps=False))
    await asyncio.wait_for(first_read.wait(), 5)  # the waiter read the record while it was running
    assert not waiting.done()
    await store.update_run(msgspec.structs.replace(record, status=RunStatus.COMPLETED), rev)
    run = await waiting
    assert run.status is meshflow.RunStatus.COMPLETED


async def test_sending_more_events_than_one_window_stores_every_one_in_order(client: meshflow.Client) -> None:
    events = [meshflow.Event(name="bulk/imported", data={"row": i}) for i in range(2500)]
    ids = await client.send(events)
    assert ids == [e.id for e in events]
    info = await client._bus.js.stream_info(client.names.events_stream)
    assert info.state.messages == 2500
    assert await client.send(events[:10]) == ids[:10]  # a resend is deduplicated, not stored again
    info = await client._bus.js.stream_info(client.names.events_stream)
    assert info.state.messages == 2500
