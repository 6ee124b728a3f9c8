"""Functions the crash tests run in worker subprocesses (``meshflow worker tests.integration.apps:app``).

Handlers append a line per execution to the ledger file named by ``MESHFLOW_TEST_LEDGER``, so a
test can count how often each step of each run really executed, across processes.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import meshflow

app = meshflow.App("crash")


def record(run_id: str, what: str) -> None:
    with Path(os.environ["MESHFLOW_TEST_LEDGER"]).open("a") as fh:
        fh.write(f"{run_id} {what}\n")


def blocking_step(run_id: str) -> str:
    """Runs until the test creates the gate file (so the test can kill the worker mid-step)."""
    record(run_id, "block-start")
    gate = Path(os.environ["MESHFLOW_TEST_GATE"])
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    record(run_id, "block-end")
    return "unblocked"


@app.function("crashy", trigger="crash/go", retries=meshflow.Retry(retries=3, backoff=("100ms",)))
async def crashy(ctx: meshflow.Context) -> dict[str, str]:
    await ctx.step.run("one", record, ctx.run_id, "one")
    result = await ctx.step.run("block", blocking_step, ctx.run_id)
    await ctx.step.sleep("nap", "1s")
    await ctx.step.run("three", record, ctx.run_id, "three")
    return {"block": result}


def timed(run_id: str, key: str, what: str) -> None:
    """A ledger line with the wall time in ns: ``{ns} {key} {what} {run}`` (for overlap checks)."""
    with Path(os.environ["MESHFLOW_TEST_LEDGER"]).open("a") as fh:
        fh.write(f"{time.time_ns()} {key} {what} {run_id}\n")


def work(run_id: str, key: str, block: bool) -> None:
    timed(run_id, key, "start")
    if block:
        blocking_step(run_id)
    else:
        time.sleep(0.05)
    timed(run_id, key, "end")


@app.function(
    "limited",
    trigger="limited/go",
    concurrency=meshflow.Concurrency(limit=3, key="event.data.key"),
    retries=meshflow.Retry(retries=3, backoff=("100ms",)),
)
async def limited(ctx: meshflow.Context) -> str:
    key, block = ctx.event.data["key"], bool(ctx.event.data.get("block"))
    await ctx.step.run("work", work, ctx.run_id, key, block)
    await ctx.step.sleep("nap", "300ms")  # a sleeping run holds no slot
    await asyncio.gather(  # each executing step counts against the limit, parallel ones too
        ctx.step.run("work-again", work, ctx.run_id, key, False),
        ctx.step.run("work-more", work, ctx.run_id, key, False),
    )
    return key
