"""A document pipeline whose middle step fails transiently; retries carry it through."""

from __future__ import annotations

import random

import meshflow

app = meshflow.App("docs")


def extract(url: str) -> dict[str, str]:
    return {"url": url, "text": f"contents of {url}"}


def summarize(doc: dict[str, str]) -> str:
    if random.random() < 0.5:  # noqa: S311 - a flaky upstream API, simulated
        raise RuntimeError("summarizer timed out (transient)")
    return doc["text"][:40]


async def failed(ctx: meshflow.Context) -> None:
    ctx.logger.error("pipeline failed for good", run=ctx.event.data["run_id"], error=ctx.event.data["error"])


@app.function(
    "summarize-document",
    trigger="doc/uploaded",
    retries=meshflow.Retry(retries=5, backoff=("1s", "2s", "4s")),
    on_failure=failed,
)
async def summarize_document(ctx: meshflow.Context) -> dict[str, str]:
    doc = await ctx.step.run("extract", extract, ctx.event.data["url"])
    summary = await ctx.step.run("summarize", summarize, doc)
    await ctx.step.run("store", lambda: None)
    return {"summary": summary}
