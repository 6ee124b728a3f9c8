"""Functions the fault tests run in worker subprocesses (``meshflow worker tests.faults.apps:app``).

Every step appends ``{run} {step} {start|end} {pid}`` to the ledger file named by
``MESHFLOW_TEST_LEDGER`` before it returns, and the function body appends ``{run} body returned
{pid}`` when it returns, so a test can count, across processes, how often each step of each run
executed and how often a function body ran to its end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import meshflow

app = meshflow.App("faults")


def ledger(run_id: str, step: str, what: str) -> None:
    with Path(os.environ["MESHFLOW_TEST_LEDGER"]).open("a") as fh:
        fh.write(f"{run_id} {step} {what} {os.getpid()}\n")


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
