"""Functions the fault tests run in worker subprocesses (``meshflow worker tests.faults.apps:app``).

Every step appends ``{run} {step} {start|end} {pid} {time_ns}`` to the ledger file named by
``MESHFLOW_TEST_LEDGER`` (``end`` just before it returns), and the function body appends
``{run} body returned {pid} {time_ns}`` when it returns, so a test can count, across processes,
how often each step of each run executed, when, and how often a function body ran to its end.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import meshflow

app = meshflow.App("faults")


def ledger(run_id: str, step: str, what: str) -> None:
    with Path(os.environ["MESHFLOW_TEST_LEDGER"]).open("a") as fh:
        fh.write(f"{run_id} {step} {what} {os.getpid()} {time.time_ns()}\n")


def step(run_id: str, name: str) -> str:
    ledger(run_id, name, "start")
    ledger(run_id, name, "end")
    return name


def gated(run_id: str, name: str) -> str:
    """Runs until the gate file named by ``MESHFLOW_TEST_GATE`` exists (at most 2 minutes)."""
    ledger(run_id, name, "start")
    gate = Path(os.environ["MESHFLOW_TEST_GATE"])
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    ledger(run_id, name, "end")
    return name


@app.function("stall", trigger="faults/stall", retries=meshflow.Retry(retries=3, backoff=("100ms",)))
async def stall(ctx: meshflow.Context) -> str:
    await ctx.step.run("b1", step, ctx.run_id, "b1")
    await ctx.step.run("b2", gated, ctx.run_id, "b2")
    await ctx.step.run("b3", step, ctx.run_id, "b3")
    ledger(ctx.run_id, "body", "returned")
    return "ok"


# --- the chaos run's functions (``tests.faults.chaos``): one event starts a run of each ----------

CHAOS_EVENT = "faults/chaos"
#: Each function's steps in the order they run (a sleep of `NAP_MS` sits between a2 and a3).
CHAOS_STEPS = {"faults-alpha": ["a1", "a2", "a3"], "faults-beta": ["b1", "b2", "b3"]}
NAP_MS = 1000
_RETRY = meshflow.Retry(retries=20, backoff=("100ms", "200ms", "500ms"))


async def work(run_id: str, name: str) -> str:
    """A step with some work in it (up to 40 ms), so that kills and stalls land inside steps."""
    ledger(run_id, name, "start")
    await asyncio.sleep(random.random() * 0.04)
    ledger(run_id, name, "end")
    return name


@app.function("alpha", trigger=CHAOS_EVENT, retries=_RETRY)
async def alpha(ctx: meshflow.Context) -> str:
    await ctx.step.run("a1", work, ctx.run_id, "a1")
    await ctx.step.run("a2", work, ctx.run_id, "a2")
    await ctx.step.sleep("nap", f"{NAP_MS}ms")
    await ctx.step.run("a3", work, ctx.run_id, "a3")
    ledger(ctx.run_id, "body", "returned")
    return "alpha"


@app.function("beta", trigger=CHAOS_EVENT, retries=_RETRY)
async def beta(ctx: meshflow.Context) -> str:
    for name in CHAOS_STEPS["faults-beta"]:
        await ctx.step.run(name, work, ctx.run_id, name)
    ledger(ctx.run_id, "body", "returned")
    return "beta"


CHAOS_FUNCTIONS = (alpha, beta)
