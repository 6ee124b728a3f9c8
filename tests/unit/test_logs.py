"""The pure parts of a run's logs: bounding a record, the shipper's queue and markers, following
without duplicates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec

from meshflow.logs import LogRecord, LogShipper, capped, decode_record, encode_record, follow, render
from meshflow.names import Names


def _record(message: str = "hi", **kw: object) -> LogRecord:
    return LogRecord(run_id="r1", ts=1_700_000_000_000, level="info", message=message, **kw)  # type: ignore[arg-type]


def test_fields_over_the_cap_are_replaced_by_a_note_and_the_record_is_kept() -> None:
    record = _record(fields={f"k{i}": "v" * 1000 for i in range(40)})
    back = decode_record(encode_record(record))
    assert back.message == "hi"
    assert back.fields["meshflow.note"].startswith("fields not kept:")


def test_an_undecodable_record_reads_as_a_marker() -> None:
    back = decode_record(b"{not json", seq=42)
    assert back.marker == "unreadable"
    assert "record 42" in back.message


async def test_the_shipper_drops_past_its_queue_cap_and_says_how_many() -> None:
    sent: list[tuple[str, bytes]] = []

    async def publish(subject: str, data: bytes) -> None:
        sent.append((subject, data))

    shipper = LogShipper(publish, Names("t"), worker="w", queue_cap=3)
    for i in range(5):
        shipper.put(_record(f"line {i}"))
    await shipper.flush()
    records = [decode_record(data) for _, data in sent]
    assert [r.message for r in records[:3]] == ["line 0", "line 1", "line 2"]
    assert records[3].marker == "dropped"
    assert records[3].message.startswith("2 log records of this run were dropped")
    assert {subject for subject, _ in sent} == {"t.log.r1"}


async def test_the_shipper_publishes_records_put_from_other_threads() -> None:
    sent: list[bytes] = []
    arrived = asyncio.Event()

    async def publish(subject: str, data: bytes) -> None:
        sent.append(data)
        if len(sent) == 100:
            arrived.set()

    shipper = LogShipper(publish, Names())
    shipper.start()
    try:
        await asyncio.to_thread(lambda: [shipper.put(_record(str(i))) for i in range(100)])
        await asyncio.wait_for(arrived.wait(), 5)
    finally:
        await shipper.stop()
    assert [decode_record(d).message for d in sent] == [str(i) for i in range(100)]


async def test_follow_gives_each_record_once_and_ends_after_a_last_read() -> None:
    a, b, c = (msgspec.json.encode(_record(m)) for m in "abc")
    reads = [[(1, a)], [(1, a), (2, b), (3, c)]]
    live: asyncio.Queue[bytes] = asyncio.Queue()
    live.put_nowait(a)  # published before the first read, so read and received live
    live.put_nowait(b)

    async def subscription() -> AsyncIterator[bytes]:
        while True:
            yield await live.get()

    async def read() -> list[tuple[int, bytes]]:
        return reads.pop(0)

    async def ended() -> bool:
        return True

    got = [r.message async for r in follow(subscription(), read, ended, poll=0.05)]
    assert got == ["a", "b", "c"]


def test_capped_says_older_records_are_gone_when_the_run_has_as_many_as_kept() -> None:
    records = [_record(str(i)) for i in range(3)]
    assert capped(records, "r1", 4) == records
    marked = capped(records, "r1", 3)
    assert marked[0].marker == "capped"
    assert marked[1:] == records


def test_render_is_one_line_with_where_it_was_logged() -> None:
    line = render(_record("paid", step_id="charge", attempt=2, fields={"amount": 3, "who": "x"}))
    assert line == "2023-11-14T22:13:20.000Z info     charge#2 paid amount=3 who=x"
