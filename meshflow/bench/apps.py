"""The functions the benchmark runs, served by ``meshflow worker meshflow.bench.apps:ATTR``.

``app`` holds every benchmark function. Each workload's worker serves only the functions that
workload triggers (``w1`` … ``w6`` and ``d1``: apps with the same id ``bench``, so full ids and
run ids are the same as in ``app``): a worker shares its concurrency slots among the pull loops
of all its functions, and idle loops of functions a workload never triggers would hold slots in
long-polling fetches and so distort the figures.

Step handlers are no-op coroutines returning a small dict, so a run costs only meshflow itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

import meshflow
from meshflow.functions import Function, Handler

from . import traced

traced.install_from_env()  # a worker of `meshflow bench --trace` traces itself

app = meshflow.App("bench")

_APPS: dict[str, meshflow.App] = {
    w: meshflow.App("bench") for w in ("w1", "w2", "w3", "w4", "w5", "w6", "d1")
}
w1 = _APPS["w1"]
w2 = _APPS["w2"]
w3 = _APPS["w3"]
w4 = _APPS["w4"]
w5 = _APPS["w5"]
w6 = _APPS["w6"]
d1 = _APPS["d1"]

TRIGGER_W1 = "bench/w1"
TRIGGER_W2 = "bench/w2"
TRIGGER_W3 = "bench/w3"
TRIGGER_W4 = "bench/w4"
TRIGGER_W5 = "bench/w5"
#: What W5's runs wait for, matched on ``data.id``.
EVENT_W5_PAID = "bench/paid"
TRIGGER_W6 = "bench/w6"
#: W7 events match no function: W7 measures ingest alone while its worker stays idle.
TRIGGER_W7 = "bench/w7"

SLEEP_S = 2.0
#: Set (to "1") by ``meshflow bench --logs``: each W1 step logs a line with ``ctx.logger``.
LOGS_ENV = "MESHFLOW_BENCH_LOGS"
_LOGGING = os.environ.get(LOGS_ENV) == "1"


def _function(workload: str, fn_id: str, trigger: str) -> Callable[[Handler], Function]:
    """Register a handler on ``app`` and on its workload's own app; return the ``app`` one."""

    def register(handler: Handler) -> Function:
        _APPS[workload].function(fn_id, trigger=trigger, retries=0)(handler)
        return app.function(fn_id, trigger=trigger, retries=0)(handler)

    return register


async def noop(i: int) -> dict[str, int]:
    """A step that does nothing but return a small dict."""
    return {"step": i}


def _logging(ctx: meshflow.Context) -> Callable[[int], Awaitable[dict[str, int]]]:
    """`noop` that first logs one line into the run's logs (``--logs``)."""

    async def logged(i: int) -> dict[str, int]:
        ctx.logger.info("step ran", step=i)
        return {"step": i}

    return logged


@_function("w1", "three-steps", TRIGGER_W1)
async def three_steps(ctx: meshflow.Context) -> dict[str, int]:
    step = _logging(ctx) if _LOGGING else noop
    for i in range(3):
        await ctx.step.run(f"s{i}", step, i)
    return {"steps": 3}


@_function("w2", "one-step", TRIGGER_W2)
async def one_step(ctx: meshflow.Context) -> dict[str, int]:
    return await ctx.step.run("s0", noop, 0)  # type: ignore[no-any-return]


@_function("w3", "sleeper", TRIGGER_W3)
async def sleeper(ctx: meshflow.Context) -> dict[str, float]:
    # The function re-runs from the top when it wakes: the step memoizes the first t_call, and
    # t_wake is taken on the one pass that gets past the sleep.
    t_call: float = await ctx.step.run("t-call", time.time)
    await ctx.step.sleep("nap", f"{SLEEP_S:g}s")
    t_wake = time.time()
    return {"t_call": t_call, "t_wake": t_wake}


def _fan(k: int) -> Function:
    async def fan(ctx: meshflow.Context) -> dict[str, int]:
        return await ctx.step.run("s0", noop, k)  # type: ignore[no-any-return]

    return _function("w4", f"fan-{k}", TRIGGER_W4)(fan)


FANOUT: tuple[Function, ...] = tuple(_fan(k) for k in range(1, 6))


@_function("w5", "waiter", TRIGGER_W5)
async def waiter(ctx: meshflow.Context) -> dict[str, float] | None:
    paid = await ctx.step.wait_for_event("paid", event=EVENT_W5_PAID, match="data.id", timeout="1h")
    # Like W3's t_wake: the first instruction after the wait, on the one pass that gets past it.
    t_resume = time.time()
    if paid is None:
        return None
    return {"t_send": paid.data["t_send"], "t_resume": t_resume}


@_function("w6", "long-sleeper", TRIGGER_W6)
async def long_sleeper(ctx: meshflow.Context) -> None:
    await ctx.step.sleep("nap", "1h")


#: D1's functions: the dashboard lists their runs, which the bench writes straight into the store.
#: Their triggers name events nobody sends (the stored runs' events are named ``d1/<id>``), so
#: the idle worker that registers them starts no run of its own.
D1_IDS = (
    "send-welcome-email",
    "charge-card",
    "sync-inventory",
    "generate-invoice",
    "ship-order",
    "refund-payment",
    "nightly-report",
    "resize-image",
    "notify-slack",
    "score-lead",
    "import-csv",
    "export-data",
    "reconcile-ledger",
    "expire-trials",
    "send-digest",
    "verify-email",
    "update-search-index",
    "fraud-check",
    "sync-crm",
    "archive-logs",
)


def _listed(fn_id: str) -> Function:
    async def listed(ctx: meshflow.Context) -> dict[str, int]:
        return await ctx.step.run("s0", noop, 0)  # type: ignore[no-any-return]

    return _function("d1", fn_id, f"bench/d1.never.{fn_id}")(listed)


DASHBOARD: tuple[Function, ...] = tuple(_listed(fn_id) for fn_id in D1_IDS)
