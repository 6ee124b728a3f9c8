"""D1's store: N runs of 20 functions as a worker would have left them, written straight in.

The dashboard only reads, so D1 does not run N functions (W6 shows that creating 100,000 runs
through a worker takes about 30 s); it writes what they would have stored, with pipelined
publishes (`Bus.publish_many`, 1,024 in flight), a chunk of `CHUNK` runs at a time:

- their trigger events into the events stream: ``d1/<function id>`` with about 200 bytes of
  data, ``ts`` spread evenly over the last `SPAN_MS` (oldest first), with ``Nats-Msg-Id`` as
  ``client.send`` sets it; the functions of ``apps.DASHBOARD`` trigger on other names, so the
  idle worker starts nothing;
- one run record per event in the runs bucket, under the id a worker gives it
  (``run_id_for(function, event id, ts)``, so ``client.runs_for_event`` finds it), of a function
  and a status drawn with a seeded random: 96 % completed, 1 % failed (with a traceback), 2 %
  sleeping, 1 % waiting (each with its pending item), none cancelled. Each record is written
  twice, as a worker writes a run (its claim at creation, then its end): a group of `GROUP`
  runs' first writes, then their final writes, so that live and superseded messages interleave
  in the bucket's stream (history 1) as they do under a worker with runs in flight, and the
  stream holds 2N sequences for N live records;
- two step memos per run (one when the run failed at its first step or is still suspended
  after it), so a run's detail page loads real steps;
- the runs index's entries, as workers write them in a deployment made with the index (in
  creation order, after its ready marker): each run's "new" entry and its "running" live
  entry, then its end entry (or its sleeping or waiting live entry); the "running" ones are
  purged at the end, as a worker purges each when the run moves on.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import msgspec

from meshflow.client import Client
from meshflow.events import Event, encode_event
from meshflow.functions import Function
from meshflow.ids import new_ulid, run_id_for, step_hash
from meshflow.names import HDR_MSG_ID, kv_subject, stream_purge_subject
from meshflow.runs import (
    ErrorInfo,
    Lease,
    Pending,
    PendingKind,
    RunRecord,
    RunStatus,
    StepKind,
    StepMemo,
    StepStatus,
    WaitSpec,
    encode_record,
)

CHUNK = 4096
GROUP = 32
SPAN_MS = 7 * 24 * 3600 * 1000  # events are kept 7 days
#: (status, weight in %): no cancelled runs, so a ``status=cancelled`` page matches nothing.
STATUSES = ((RunStatus.COMPLETED, 96), (RunStatus.FAILED, 1), (RunStatus.SLEEPING, 2), (RunStatus.WAITING, 1))
EVENT_PREFIX = "d1/"
_TRACEBACK = "".join(
    f'  File "/srv/app/shop/{name}.py", line {line}, in {name}\n    result = await client.{name}(payload)\n'
    for name, line in (("charge", 118), ("gateway", 42), ("http", 310))
)
Item = tuple[str, bytes, dict[str, str] | None]


@dataclass
class Seeded:
    """What was written: run ids and their events' ids, oldest first, and how many messages."""

    run_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    writes: int = 0


def _event(fn: Function, i: int, ts: int, rnd: random.Random) -> Event:
    data = {
        "order_id": f"ord_{i:09d}",
        "customer_id": f"cus_{rnd.getrandbits(48):012x}",
        "email": f"customer{i}@example.com",
        "amount_cents": rnd.randrange(100, 50_000),
        "currency": "EUR",
        "items": [{"sku": f"SKU-{rnd.randrange(10_000):04d}", "qty": rnd.randrange(1, 4)} for _ in range(2)],
        "source": "web",
    }
    return Event(name=f"{EVENT_PREFIX}{fn.id}", data=data, id=new_ulid(ts), ts=ts)


def _status(rnd: random.Random) -> RunStatus:
    pick = rnd.randrange(100)
    for status, weight in STATUSES:
        if pick < weight:
            return status
        pick -= weight
    return RunStatus.COMPLETED


def _memo(step_id: str, at: int, output: bytes, error: ErrorInfo | None = None) -> StepMemo:
    return StepMemo(
        id=step_id,
        hash=step_hash(step_id),
        kind=StepKind.RUN,
        status=StepStatus.FAILED if error else StepStatus.COMPLETED,
        output=msgspec.Raw(output),
        error=error,
        attempts=4 if error else 1,
        started_at=at,
        ended_at=at + 40,
    )


def _run(
    fn: Function, event: Event, seq: int, status: RunStatus, now: int, rnd: random.Random
) -> tuple[RunRecord, RunRecord, list[StepMemo]]:
    """A run's first write (claimed, running), its final record and its step memos."""
    ts = event.ts
    started = ts + rnd.randrange(2, 40)
    running = RunRecord(
        id=run_id_for(fn.full_id, event.id, ts),
        app=fn.app_id,
        function=fn.full_id,
        fn=fn.id,
        status=RunStatus.RUNNING,
        events=[event],
        created_at=ts,
        updated_at=started,
        started_at=started,
        seq=seq,
        lease=Lease(worker="bench-d1", until=started + 30_000),
        armed=True,
    )
    memos = [_memo("validate-order", started, b'{"valid":true}')]
    end = started + rnd.randrange(50, 2_000)
    changes: dict[str, object] = {"status": status, "updated_at": end, "lease": None}
    if status is RunStatus.COMPLETED:
        memos.append(_memo("charge", started + 45, f'{{"charged":{event.data["amount_cents"]}}}'.encode()))
        changes.update(ended_at=end, output=msgspec.Raw(b'{"ok":true,"invoice":"inv_%d"}' % seq))
    elif status is RunStatus.FAILED:
        error = ErrorInfo(
            type="PaymentDeclined", message="card declined: insufficient funds", traceback=_TRACEBACK
        )
        memos.append(_memo("charge", started + 45, b"null", error))
        changes.update(ended_at=end, error=error, attempt=3)
    elif status is RunStatus.SLEEPING:
        key = step_hash("wait-for-shipping")
        pending = Pending(
            kind=PendingKind.SLEEP, key=key, step_id="wait-for-shipping", until=now + 3_600_000, since=end
        )
        changes["pending"] = [pending]
    else:  # waiting for the payment's confirmation
        wait = WaitSpec(event="shop/payment.confirmed", match="data.order_id", floor_seq=seq)
        pending = Pending(
            kind=PendingKind.WAIT,
            key=step_hash("confirm"),
            step_id="confirm",
            until=ts + SPAN_MS,
            since=end,
            waits=[wait],
        )
        changes["pending"] = [pending]
    return running, msgspec.structs.replace(running, **changes), memos


async def seed(
    client: Client, functions: tuple[Function, ...], n: int, now: int, deadline: float, random_seed: int = 1
) -> Seeded:
    """Write ``n`` runs (see the module docstring), the newest created just before ``now``; stop
    after the chunk during which the event loop's clock passes ``deadline``."""
    loop = asyncio.get_running_loop()
    rnd = random.Random(random_seed)  # noqa: S311 - seeded on purpose: the same store every run, no secret
    names, bus = client.names, client._bus
    runs, steps = names.runs_bucket, names.steps_bucket
    done = Seeded()
    step_ms = SPAN_MS // n
    for at in range(0, n, CHUNK):
        if loop.time() > deadline:
            break
        ids = range(at, min(n, at + CHUNK))
        fns = [functions[rnd.randrange(len(functions))] for _ in ids]
        events = [_event(fn, i, now - SPAN_MS + i * step_ms, rnd) for fn, i in zip(fns, ids, strict=True)]
        items: list[Item] = [
            (names.event_subject(e.name), encode_event(e), {HDR_MSG_ID: e.id}) for e in events
        ]
        acks = await bus.publish_many(items)
        records: list[Item] = []
        memos: list[Item] = []
        index: list[Item] = []
        for start in range(0, len(events), GROUP):
            finals: list[Item] = []
            statuses: list[Item] = []
            for k in range(start, min(len(events), start + GROUP)):
                status = _status(rnd)
                first, final, steps_of = _run(fns[k], events[k], acks[k].seq, status, now, rnd)
                records.append((kv_subject(runs, first.id), encode_record(first), None))
                finals.append((kv_subject(runs, final.id), encode_record(final), None))
                created = str(final.created_at).encode()
                index.append((names.index_new_subject(final.function, final.id), created, None))
                index.append((names.live_subject(RunStatus.RUNNING, final.function, final.id), created, None))
                if final.status.terminal:
                    entry = names.index_end_subject(final.status, final.function, final.id)
                else:
                    entry = names.live_subject(final.status, final.function, final.id)
                statuses.append((entry, created, None))
                memos.extend(
                    (kv_subject(steps, names.step_key(final.id, m.hash)), encode_record(m), None)
                    for m in steps_of
                )
                done.run_ids.append(final.id)
            records.extend(finals)
            index.extend(statuses)
        await bus.publish_many(records)
        await bus.publish_many(memos)
        await bus.publish_many(index)
        done.event_ids.extend(e.id for e in events)
        done.writes += len(items) + len(records) + len(memos) + len(index)
    purge = {"filter": names.live_filter(RunStatus.RUNNING, None)}
    await client._store.requests.request(stream_purge_subject(names.live_stream), msgspec.json.encode(purge))
    return done
