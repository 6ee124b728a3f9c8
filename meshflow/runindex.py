"""The runs index: every run newest first by creation, and the runs in each status, as subjects
of two streams that the server filters for a page of runs.

- ``{NS}_INDEX``, append only: ``{ns}.idx.new.{function}.{run}``, written once just before the
  run's record is created (its order in the stream is the runs' creation order), and
  ``{ns}.idx.end.{status}.{function}.{run}``, written once just before the record that ends the
  run. Each message's data is the run's ``created_at`` (epoch ms).
- ``{NS}_LIVE``, one message per subject: ``{ns}.live.{status}.{function}.{run}``, the status
  of a run that has not ended, written before every record that changes it; once the record
  is written the run's older live entries are purged (one purge filtered to the run, sent
  without waiting for its answer), and all of them once it has ended. Entering ``running``
  writes nothing (a pass is under way, and every pass enters it): the run keeps the entry of
  the status it came from, and ``status=running`` reads every live entry and keeps the runs
  whose record says running. That halves what a run's passes add to its writes.

Two streams because a batched direct get costs the server far more on a stream with deleted
messages among those it reads (measured: a page of 150 entries 3 ms without, 67 ms with a
third of the sequences deleted, 100,000 runs): what is written once stays apart from what is
rewritten. A page, filtered by function and/or status or not at all, is a read of one subject
filter backwards through one of them (the unfiltered list reads by sequence, no filter), then
one batched read of the records it names. Every entry is checked against its record before it
is shown: an entry can be stale (a crash between the entry and the record, a pass that lost
its compare-and-set, a purge that got lost), never missing for long. Writing the index never
fails a run: a write that fails is logged, and the sweeper, which reads every record anyway,
puts right what is missing or stale (`repair`) every five minutes. A deployment whose runs
predate the index gets it filled in by the first sweep, which then writes ``{ns}.idx.ready``;
until then the runs list reads the records themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from .durations import now_ms
from .errors import NatsError
from .names import HDR_EXPECTED_LAST_SUBJECT_SEQ, Names, kv_stream, kv_subject, stream_purge_subject
from .requests import NATS_ERRORS, ApiError, Requester
from .runs import RunRecord, RunStatus, decode_run
from .streams import Streams, stored_ms

log = structlog.get_logger("meshflow.index")

_BATCH = 1024  # the most messages one batched direct get returns
_TIMEOUT = 10.0
_READ_ERRORS: tuple[type[BaseException], ...] = (ApiError, *NATS_ERRORS)
_WRONG_LAST_SEQUENCE = 10071  # a write-once entry exists already
_ONCE = {HDR_EXPECTED_LAST_SUBJECT_SEQ: "0"}
#: Workers' clocks (which set ``created_at``) and the server's (which orders and stamps the
#: entries) may differ by this much; time filters read this far past their bound.
CLOCK_SKEW_MS = 60_000
#: How old an entry that disagrees with its record must be before `repair` removes it: a pass
#: writes the entry just before the record, and that write may be in flight.
REPAIR_GRACE_MS = 120_000
_MAX_READS = 16  # index reads per page at most
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a function's full id: "{app}-{fn}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One index message: where it is, and what it says about which run."""

    kind: str  # "new", "end" or "live"
    seq: int
    subject: str
    run_id: str
    function: str
    status: str | None  # None for a "new" entry
    created_at: int
    stored_at: int


def parse_entry(names: Names, seq: int, subject: str, data: bytes, stored_at: int) -> Entry | None:
    """An index message as an `Entry`; None for one that is not an entry (the ready marker)."""
    tokens = subject[len(names.ns) + 1 :].split(".")
    try:
        created = int(data)
    except ValueError:
        return None
    if len(tokens) == 4 and tokens[:2] == ["idx", "new"]:
        return Entry("new", seq, subject, tokens[3], tokens[2], None, created, stored_at)
    if len(tokens) == 5 and tokens[:2] == ["idx", "end"]:
        return Entry("end", seq, subject, tokens[4], tokens[3], tokens[2], created, stored_at)
    if len(tokens) == 4 and tokens[0] == "live":
        return Entry("live", seq, subject, tokens[3], tokens[2], tokens[1], created, stored_at)
    return None


def next_window(window: int, examined: int, matched: int, wanted: int) -> int:
    """How many sequences the next read should cover, from what the reads so far found:
    ``matched`` entries in ``examined`` sequences, ``wanted`` still to find. The density seen
    so far sizes it (a quarter more, to overshoot rather than read twice), growing at least
    twofold and at most sixteenfold a read; nothing seen yet: eightfold."""
    if matched == 0:
        return window * 8
    need = math.ceil(wanted * examined / matched * 1.25)
    return max(window * 2, min(need, window * 16))


class RunsIndex:
    """Writes a run's entries as its record changes, and reads pages of them back."""

    def __init__(self, requests: Requester, streams: Streams, names: Names) -> None:
        self.requests = requests
        self.streams = streams
        self.names = names
        self.enabled = True  # False: the streams do not exist here (nothing is written)
        self._ready = False  # the index holds every run (cached once seen)
        # The ready marker's sequence: "new" entries after it were written as their runs were
        # created (stored when created); those before it may have been filled in by a sweep.
        self._ready_seq = 0
        self._failing = False  # a write failed; logged once until one succeeds again

    # --- writing ---------------------------------------------------------------------------
    def _status_entry(self, record: RunRecord) -> tuple[str, bytes, dict[str, str] | None]:
        n, value = self.names, str(record.created_at).encode()
        if record.status.terminal:
            return n.index_end_subject(record.status, record.function, record.id), value, _ONCE
        return n.live_subject(record.status, record.function, record.id), value, None

    async def created(self, record: RunRecord) -> None:
        """Before a run's record is created: its "new" entry (unless it exists) and its status."""
        if not self.enabled:
            return
        status = self._status_entry(record)
        new = (self.names.index_new_subject(record.function, record.id), status[1], _ONCE)
        try:
            results = await self.requests.publish_batch([new, status], _TIMEOUT)
        except NATS_ERRORS as exc:
            return self._failed(record.id, exc)
        for result in results:
            if isinstance(result, BaseException) and not _written_before(result):
                return self._failed(record.id, result)
        self._failing = False

    async def moving(self, record: RunRecord) -> int | None:
        """Before a record that changes the run's status is written: the new status entry. What
        `moved` needs (the live entry's sequence, 0 for an end), or None if it was not written."""
        if not self.enabled or record.status is RunStatus.RUNNING:
            return None  # a run keeps its last live entry while a pass runs it (see `page`)
        return await self._put_status(record)

    async def _put_status(self, record: RunRecord) -> int | None:
        subject, value, headers = self._status_entry(record)
        try:
            ack = await self.requests.publish(subject, value, headers, _TIMEOUT)
        except _READ_ERRORS as exc:
            if not _written_before(exc):
                self._failed(record.id, exc)
                return None
            return 0
        self._failing = False
        return 0 if record.status.terminal else int(ack.seq)

    async def moved(self, record: RunRecord, seq: int) -> None:
        """After the record is written: purge the run's live entries older than ``seq`` (all of
        them when it has ended)."""
        request: dict[str, Any] = {"filter": self.names.live_filter(None, record.function, record.id)}
        if seq:
            request["seq"] = seq
        try:  # no answer awaited: a purge that is lost leaves a stale entry, which readers skip
            subject = stream_purge_subject(self.names.live_stream)
            await self.requests.nc.publish(subject, msgspec.json.encode(request))
        except NATS_ERRORS as exc:
            self._failed(record.id, exc)

    def _failed(self, run_id: str, exc: BaseException) -> None:
        if not self._failing:
            log.warning(
                "cannot write the runs index; the sweeper puts it right within minutes",
                run_id=run_id,
                error=repr(exc),
            )
        self._failing = True

    # --- reading ---------------------------------------------------------------------------
    async def ready(self) -> bool:
        """Whether the index holds every run (a deployment made with it, or one the sweeper filled in)."""
        if not self._ready:
            stream = self.names.index_stream
            try:
                got = await self.requests.direct_get(stream, self.names.index_ready_subject, _TIMEOUT)
            except _READ_ERRORS:
                return False  # no index stream (a deployment from before it), or not readable
            if got is not None:
                self._ready, self._ready_seq = True, got[1]
        return self._ready

    async def mark_ready(self) -> None:
        ack = await self.requests.publish(self.names.index_ready_subject, b"1", None, _TIMEOUT)
        self._ready, self._ready_seq = True, int(ack.seq)

    async def page(
        self,
        *,
        status: RunStatus | None,
        function: str | None,
        since: int,
        until: int,
        before: int | None,
        want: int,
        budget: int,
        read: Callable[[list[str]], Awaitable[dict[str, RunRecord]]],
    ) -> tuple[list[RunRecord], int | None]:
        """The newest ``want`` runs matching the filters below sequence ``before`` (of the
        stream the filters read), and the cursor for the next page (None: no older ones).
        Newest first by creation; with a ``status``, newest first by when they took it.
        ``read`` fetches records by id. Reads stop once ``budget`` sequences of the index are
        read (the last read may pass it): a page may come back short, with a cursor to go on.
        Before the index holds
        every run, the records are read instead (`_scan`)."""
        if function is not None and not _TOKEN.fullmatch(function):
            return [], None  # no function has that id (and it must not reach a subject filter)
        if not await self.ready():
            return await self._scan(status, function, since, until, before, want, budget)
        stream, subject, kind = self._source(status, function)
        state = await self.streams.stream_state(stream)
        cursor = min(before or state.last_seq + 1, state.last_seq + 1)
        live = max(self._ready_seq, state.first_seq)  # "new" entries after it are in creation order
        if kind == "new" and until < 2**62 and cursor > live:  # skip the runs created after ``until``
            cursor = await self._seek(stream, live, cursor, until + CLOCK_SKEW_MS)
        found: list[RunRecord] = []
        pending: list[Entry] = []  # entries read, newest first, not yet checked against records

        async def check() -> int | None:
            return await _check(pending, found, want, status, read)

        window, examined, matched = want * 2 + 16, 0, 0
        for _ in range(_MAX_READS):
            if cursor <= state.first_seq or examined >= budget:
                break
            start = max(state.first_seq, cursor - window)
            entries = [e for e in await self._read(stream, subject, start, cursor) if e.kind == kind]
            examined += cursor - start
            matched += len(entries)
            pending.extend(e for e in reversed(entries) if since <= e.created_at < until)
            cursor = start
            past = bool(entries) and _before(entries[0], since, live)
            if past or len(pending) >= want - len(found):
                if (last := await check()) is not None:
                    return found, last
            if past:
                return found, None  # nothing older was created after ``since``
            window = next_window(window, examined, matched, want - len(found))
        if (last := await check()) is not None:
            return found, last
        return found, (cursor if cursor > state.first_seq else None)

    async def _scan(
        self,
        status: RunStatus | None,
        function: str | None,
        since: int,
        until: int,
        before: int | None,
        want: int,
        budget: int,
    ) -> tuple[list[RunRecord], int | None]:
        """`page` before the index holds every run: the run records themselves, most recently
        updated first (the runs bucket's stream backwards), ``budget`` of them at most."""

        def keep(data: bytes) -> bool:
            try:
                record = decode_run(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return False  # a record nobody can read is left out of the list (get_run says why)
            return (
                (status is None or record.status == status)
                and (function is None or record.function == function)
                and since <= record.created_at < until
            )

        bucket = self.names.runs_bucket
        found, cursor = await self.streams.newest(
            kv_stream(bucket), kv_subject(bucket, ">"), before=before, want=want, keep=keep, budget=budget
        )
        return [decode_run(data) for _, data, _ in found], cursor

    def _source(self, status: RunStatus | None, function: str | None) -> tuple[str, str | None, str]:
        """Where a page with these filters reads: (stream, subject filter or None, entry kind)."""
        n = self.names
        if status is None:  # no filter at all: a read by sequence, which costs the server least
            return n.index_stream, n.index_new_filter(function) if function else None, "new"
        if status.terminal:
            return n.index_stream, n.index_end_filter(status, function), "end"
        if status is RunStatus.RUNNING:  # the live entries of running runs say what came before
            return n.live_stream, n.live_filter(None, function), "live"
        return n.live_stream, n.live_filter(status, function), "live"

    async def _seek(self, stream: str, low: int, high: int, at_ms: int) -> int:
        """A sequence in (``low``, ``high``] at and after which every "new" entry was created at
        or after ``at_ms``: a binary search over the part of the stream written as runs were
        created (so in creation order); ``high`` when it finds nothing to skip."""
        while high - low > 64:
            mid = (low + high) // 2
            batch = await self._batch(stream, {"seq": mid, "batch": 16})
            entries = [e for e in (self._entry(h, d) for h, d in batch) if e and e.kind == "new"]
            if not entries:  # the server finds the next one (a filter costs it more: only then)
                request = {"seq": mid, "batch": 1, "next_by_subj": self.names.index_new_filter(None)}
                entries = [e for e in (self._entry(h, d) for h, d in await self._batch(stream, request)) if e]
            entries = [e for e in entries if e.seq < high]
            if not entries:
                return high  # nothing to go by: read from here
            if entries[0].created_at >= at_ms:
                high = entries[0].seq
            else:
                low = entries[0].seq
        return high

    async def _read(self, stream: str, subject: str | None, start: int, end: int) -> list[Entry]:
        """The entries on ``subject`` (None: all) from sequence ``start`` up to ``end`` (excluded)."""
        out: list[Entry] = []
        seq = start
        while seq < end:
            request: dict[str, Any] = {"seq": seq, "batch": min(_BATCH, end - seq)}
            if subject is not None:
                request["next_by_subj"] = subject
            batch = await self._batch(stream, request)
            for headers, data in batch:
                seq = int(headers.get("Nats-Sequence", "0")) + 1
                if seq > end:
                    return out
                entry = self._entry(headers, data)
                if entry is not None:
                    out.append(entry)
            if len(batch) < request["batch"]:
                break
        return out

    async def _batch(self, stream: str, request: dict[str, Any]) -> list[tuple[dict[str, str], bytes]]:
        try:
            return await self.requests.direct_batch(stream, request, _TIMEOUT)
        except _READ_ERRORS as exc:
            raise NatsError(f"cannot read the runs index ({stream}): {exc!r}") from exc

    async def entries(self, stream: str) -> AsyncIterator[Entry]:
        """Every entry of one of the index's streams, oldest first."""
        seq = 1
        while True:
            batch = await self._batch(stream, {"seq": seq, "batch": _BATCH})
            for headers, data in batch:
                seq = int(headers.get("Nats-Sequence", "0")) + 1
                entry = self._entry(headers, data)
                if entry is not None:
                    yield entry
            if len(batch) < _BATCH:
                return

    def _entry(self, headers: dict[str, str], data: bytes) -> Entry | None:
        seq = int(headers.get("Nats-Sequence", "0"))
        return parse_entry(self.names, seq, headers.get("Nats-Subject", ""), data, stored_ms(headers))

    # --- repairing -------------------------------------------------------------------------
    async def repair(self, records: AsyncIterator[RunRecord]) -> tuple[int, int]:
        """Make the index agree with ``records`` (every run): write the entries that are missing
        (runs from before the index, writes that failed), the missing "new" ones in creation
        order, and remove the status entries their record contradicts (older than
        `REPAIR_GRACE_MS`). Then mark the index ready. (entries written, entries removed).
        Reads ``records`` to the end even where there is no index."""
        if not self.enabled:
            async for _ in records:
                pass
            return 0, 0
        news, statuses = await self._by_run()
        missing: list[RunRecord] = []
        written = removed = 0
        old = now_ms() - REPAIR_GRACE_MS
        async for record in records:
            mine = statuses.pop(record.id, [])
            if record.id not in news:
                missing.append(record)
            elif not any(_describes(e, record) for e in mine):
                await self._put_status(record)
                written += 1
            for entry in mine:
                if not _describes(entry, record) and entry.stored_at < old:
                    removed += await self._remove(entry)
        for record in sorted(missing, key=lambda r: (r.created_at, r.id)):
            await self.created(record)
            written += 2
        for entry in (e for mine in statuses.values() for e in mine):  # entries of runs that are gone
            if entry.stored_at < old:
                removed += await self._remove(entry)
        if not await self.ready():
            await self.mark_ready()
        return written, removed

    async def _by_run(self) -> tuple[set[str], dict[str, list[Entry]]]:
        """The runs with a "new" entry, and each run's status entries (ended and live)."""
        news: set[str] = set()
        statuses: dict[str, list[Entry]] = {}
        for stream in (self.names.index_stream, self.names.live_stream):
            async for entry in self.entries(stream):
                if entry.kind == "new":
                    news.add(entry.run_id)
                else:
                    statuses.setdefault(entry.run_id, []).append(entry)
        return news, statuses

    async def _remove(self, entry: Entry) -> int:
        stream = self.names.live_stream if entry.kind == "live" else self.names.index_stream
        request = {"filter": entry.subject, "seq": entry.seq + 1}  # that message, not a newer one
        try:
            purge = stream_purge_subject(stream)
            await self.requests.request(purge, msgspec.json.encode(request), None, _TIMEOUT)
        except _READ_ERRORS as exc:
            raise NatsError(f"cannot tidy the runs index: {exc!r}") from exc
        return 1


async def _check(
    pending: list[Entry],
    found: list[RunRecord],
    want: int,
    status: RunStatus | None,
    read: Callable[[list[str]], Awaitable[dict[str, RunRecord]]],
) -> int | None:
    """Check ``pending`` entries (newest first) against their records, adding the runs that
    match to ``found``; the sequence of the entry that filled the page, if one did. Records are
    read for as many entries as the page still needs (and a few more), not for all."""
    at = 0
    while at < len(pending):
        chunk = pending[at : at + want - len(found) + 4]
        at += len(chunk)
        records = await read([e.run_id for e in chunk])
        for entry in chunk:
            record = records.get(entry.run_id)
            if record is not None and (status is None or record.status == status):
                found.append(record)
                if len(found) == want:
                    return entry.seq
    pending.clear()
    return None


def _describes(entry: Entry, record: RunRecord) -> bool:
    """Whether a status entry agrees with the run's record: the same status, or any live entry
    for a running run (entering ``running`` writes none: a pass is under way)."""
    if record.status is RunStatus.RUNNING:
        return entry.kind == "live"
    return entry.status == record.status


def _before(oldest: Entry, since: int, live: int) -> bool:
    """Whether no entry older than ``oldest`` (the oldest a read found) can be of a run created
    at or after ``since``: it was stored before (so created before), or it is a "new" entry
    written as its run was created, in creation order (after ``live``), created before."""
    bound = since - CLOCK_SKEW_MS
    in_order = oldest.kind == "new" and oldest.seq > live
    return oldest.stored_at < bound or (in_order and oldest.created_at < bound)


def _written_before(exc: BaseException) -> bool:
    """Whether a write-once entry's write failed because it was written before."""
    return isinstance(exc, ApiError) and exc.err_code == _WRONG_LAST_SEQUENCE
