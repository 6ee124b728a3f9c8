"""D1, dashboard pages: what the runs and events pages cost with N = 100,000 runs in the store.

`runstore.seed` writes the runs, their events and step memos first (untimed; the CPU meter
restarts after it). Then, each `REPS` times one after another, p50 and p95 in ms of:

- ``first_page``: ``client.list_runs(limit=50)``, what ``/runs`` reads;
- ``deep_page``: the page after following the cursor `DEPTH` pages down (``walk_page_ms`` is
  the mean of those `DEPTH` pages);
- ``failed_page``: ``status=failed`` (1 % of the runs); ``function_page``: one function of 20;
- ``run_detail``: ``client.get_run`` (record and step memos), a different run each time;
- ``events_page``: ``client.list_events(limit=50)``;
- ``event_search``: ``client.runs_for_event``, a different event each time (what ``/runs?q=``
  does for an event id after the run lookup misses);
- ``html_runs``, ``html_failed``: ``GET /runs`` and ``GET /runs?status=failed`` through the
  dashboard's ASGI app in this process (``httpx.ASGITransport``): its client calls and rendering;
- ``limit``: one ``STREAM.INFO`` and one batched direct get of 50 run records, over the same
  connection: the two round trips no page can do without. ``<figure>_vs_limit`` divide p50s.
  Beside it ``batch1`` (a batched direct get of one record: what each request of a page costs
  whatever its size) and ``key_get`` (a direct get of one run record by its key).

And filters rarer than one budget of ``list_runs`` can serve, followed page by page (a user
clicking "next") until 50 runs are found or the stream's start is reached, `FILL_REPS` times:
``rare`` (``status=failed`` of one function: 0.05 %), ``range`` (created in one hour a day
ago) and ``none`` (``status=cancelled``: no run matches, so every call reads a whole budget).
For each: ``_calls``, ``_runs`` found, ``_ms`` in all, and ``_first_ms`` (its first page).

``--scale`` scales N, the repetitions and the depth alike (at least 5, 1 and 2).
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from meshflow.client import Client
from meshflow.durations import from_ms, now_ms
from meshflow.names import kv_stream, kv_subject
from meshflow.runs import RunStatus
from meshflow.streams import StreamState

from . import apps, runstore
from .harness import Ctx, Measured
from .procs import BenchError
from .stats import percentile

PAGE = 50
DEPTH = 50
REPS = 30
FILL_REPS = 3
HOUR_MS = 3_600_000


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def _timed(reps: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    samples = []
    for k in range(reps):
        started = time.perf_counter()
        await call(k)
        samples.append(_ms(started))
    return samples


def _pager(client: Client, **arguments: Any) -> Callable[[int], Awaitable[object]]:
    """One ``list_runs`` page with these arguments, as `_timed` calls it."""

    async def page(_: int) -> object:
        return await client.list_runs(limit=PAGE, **arguments)

    return page


async def _fill(client: Client, **filters: Any) -> tuple[int, int, float, float]:
    """Follow ``list_runs`` pages until `PAGE` runs or the end: (calls, runs, ms, first call ms)."""
    calls = found = 0
    cursor: int | None = None
    first = 0.0
    started = time.perf_counter()
    while True:
        runs, cursor = await client.list_runs(before=cursor, limit=PAGE, **filters)
        calls += 1
        found += len(runs)
        first = first or _ms(started)
        if cursor is None or found >= PAGE:
            return calls, found, _ms(started), first


def _check(what: str, got: list[str], want: str) -> None:
    if not got or got[0] != want:
        raise BenchError(f"D1: {what} starts with {got[:1]}, expected run {want}")


def _latency(figures: dict[str, float], name: str, samples: list[float]) -> None:
    figures[f"{name}_p50_ms"] = percentile(samples, 50)
    figures[f"{name}_p95_ms"] = percentile(samples, 95)


async def d1(ctx: Ctx) -> Measured:
    n = ctx.n(100_000)
    now = now_ms()
    started = time.perf_counter()
    seeded = await runstore.seed(ctx.client, apps.DASHBOARD, n, now, ctx.deadline)
    seed_s = time.perf_counter() - started
    figures: dict[str, float] = {
        "stored_runs": len(seeded.run_ids),
        "seed_s": seed_s,
        "seed_writes_per_s": seeded.writes / seed_s,
        "store_bytes": await ctx.target.admin.store_bytes(ctx.names),
    }
    wrote = f"{len(seeded.run_ids)} runs ({seeded.writes} messages)"
    print(f"D1: wrote {wrote} in {seed_s:.1f} s", file=sys.stderr)
    if len(seeded.run_ids) < n:
        return Measured(figures, incomplete=True)
    ctx.begin()
    try:
        async with asyncio.timeout(ctx.remaining()):
            await _measure(ctx, seeded, now, figures)
    except TimeoutError:
        print("D1: the deadline passed while measuring", file=sys.stderr)  # explains "incomplete"
        return Measured(figures, incomplete=True)
    return Measured(figures)


async def _measure(ctx: Ctx, seeded: runstore.Seeded, now: int, figures: dict[str, float]) -> None:
    """Every timing of the module docstring, into ``figures``."""
    client, n = ctx.client, len(seeded.run_ids)
    reps, fill_reps, depth = ctx.n(REPS), ctx.n(FILL_REPS, minimum=1), ctx.n(DEPTH, minimum=2)
    newest = seeded.run_ids[-1]
    rnd = random.Random(2)  # noqa: S311 - which runs to open, the same every run; no secret
    function = apps.DASHBOARD[0].full_id

    first, _ = await client.list_runs(limit=PAGE)
    _check("the first page", [r.id for r in first], newest)
    _latency(figures, "first_page", await _timed(reps, _pager(client)))

    depth = min(depth, n // PAGE - 1)
    cursor: int | None = None
    walk = time.perf_counter()
    for _ in range(depth):
        _, cursor = await client.list_runs(before=cursor, limit=PAGE)
    figures["walk_page_ms"] = _ms(walk) / depth
    deep, _ = await client.list_runs(before=cursor, limit=PAGE)
    _check(f"page {depth + 1}", [r.id for r in deep], seeded.run_ids[-1 - depth * PAGE])
    _latency(figures, "deep_page", await _timed(reps, _pager(client, before=cursor)))

    filtered: dict[str, dict[str, Any]] = {
        "failed_page": {"status": RunStatus.FAILED},
        "function_page": {"function_id": function},
    }
    for name, filters in filtered.items():
        page, _ = await client.list_runs(limit=PAGE, **filters)
        figures[f"{name}_runs"] = len(page)
        _latency(figures, name, await _timed(reps, _pager(client, **filters)))

    runs = rnd.sample(seeded.run_ids, reps)
    _latency(figures, "run_detail", await _timed(reps, lambda k: client.get_run(runs[k])))
    _latency(figures, "events_page", await _timed(reps, lambda _: client.list_events(limit=PAGE)))
    events = rnd.sample(range(n), reps)
    found = await client.runs_for_event(seeded.event_ids[events[0]])
    _check("the runs of an event", [r.id for r in found], seeded.run_ids[events[0]])
    searches = await _timed(reps, lambda k: client.runs_for_event(seeded.event_ids[events[k]]))
    _latency(figures, "event_search", searches)

    for name, samples in (await _html(client, newest, reps)).items():
        _latency(figures, name, samples)
    _latency(figures, "limit", await _timed(reps, lambda _: _limit(client)))
    state = await client._store.streams.stream_state(kv_stream(client.names.runs_bucket))
    _latency(figures, "batch1", await _timed(reps, lambda _: _limit(client, state, size=1)))
    _latency(figures, "key_get", await _timed(reps, lambda k: client._store.get_run(runs[k])))
    for name in ("first_page", "deep_page", "failed_page", "function_page", "events_page", "html_runs"):
        figures[f"{name}_vs_limit"] = figures[f"{name}_p50_ms"] / figures["limit_p50_ms"]

    day_ago = now - 24 * HOUR_MS
    rare: dict[str, dict[str, Any]] = {
        "rare": {"status": RunStatus.FAILED, "function_id": function},
        "range": {"since": from_ms(day_ago - HOUR_MS), "until": from_ms(day_ago)},
        "none": {"status": RunStatus.CANCELLED},
    }
    for name, filters in rare.items():
        fills = [await _fill(client, **filters) for _ in range(fill_reps)]
        figures[f"{name}_calls"] = fills[0][0]
        figures[f"{name}_runs"] = fills[0][1]
        figures[f"{name}_ms"] = percentile([f[2] for f in fills], 50)
        figures[f"{name}_first_ms"] = percentile([f[3] for f in fills], 50)


async def _limit(client: Client, state: StreamState | None = None, size: int = PAGE) -> None:
    """What any page costs at least: the stream's state, then one batch of ``size`` records
    (given the ``state``: the batch alone, from the same place)."""
    store, bucket = client._store, client.names.runs_bucket
    stream = kv_stream(bucket)
    state = state or await store.streams.stream_state(stream)
    start = max(state.first_seq, state.last_seq - 4 * PAGE)  # 2 writes a run: about 100 live
    request = {"seq": start, "next_by_subj": kv_subject(bucket, ">"), "batch": size}
    got = await store.requests.direct_batch(stream, request)
    if len(got) < size:
        raise BenchError(f"D1: the limit's batch returned {len(got)} of {size} records")


async def _html(client: Client, newest: str, reps: int) -> dict[str, list[float]]:
    """GET /runs and /runs?status=failed through the dashboard app in this process."""
    try:  # imported here: only D1 needs them, and httpx is a test dependency
        import httpx

        from dashboard import create_app
    except ImportError as exc:
        raise BenchError(f"D1 renders the dashboard in-process and needs httpx: {exc}") from exc
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would drown the progress
    transport = httpx.ASGITransport(app=create_app(client=client))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        first = await http.get("/runs")
        if first.status_code != 200 or newest not in first.text:
            raise BenchError(f"D1: GET /runs answered {first.status_code} without run {newest}")
        pages = {"html_runs": {}, "html_failed": {"status": "failed"}}
        return {name: await _timed(reps, _getter(http, params)) for name, params in pages.items()}


def _getter(http: Any, params: dict[str, str]) -> Callable[[int], Awaitable[object]]:
    async def get(_: int) -> object:
        response = await http.get("/runs", params=params)
        if response.status_code != 200:
            raise BenchError(f"D1: GET /runs?{params} answered {response.status_code}")
        return response

    return get
