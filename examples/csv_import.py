"""CSV import: parse the file, then import it in chunks, each a step retried on its own.

    meshflow send csv/uploaded --data '{"name": "contacts.csv", "csv": "email,name\\na@b.c,Ann\\nb@c.d,Bob"}'

The CRM in this example fails the first call of every chunk (a flaky API): watch each chunk's
step retry and the run complete, with the chunks already imported never imported again.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import meshflow

app = meshflow.App("imports")

CHUNK = 2
_calls: dict[int, int] = {}


def parse(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def import_chunk(index: int, rows: list[dict[str, str]]) -> int:
    _calls[index] = _calls.get(index, 0) + 1
    if _calls[index] == 1:
        raise ConnectionError("the CRM timed out")  # transient: the step retries
    return len(rows)


@app.function(
    "import-csv",
    trigger="csv/uploaded",
    retries=meshflow.Retry(retries=3, backoff=("1s", "5s")),
    cancel_on=[meshflow.Cancel(event="csv/upload.deleted", match="data.name")],
)
async def import_csv(ctx: meshflow.Context) -> dict[str, Any]:
    rows = await ctx.step.run("parse", parse, ctx.event.data["csv"])
    imported = 0
    for start in range(0, len(rows), CHUNK):
        imported += await ctx.step.run(
            "import-chunk", import_chunk, start // CHUNK, rows[start : start + CHUNK]
        )
    await ctx.step.send_event(
        "announce",
        meshflow.Event(name="csv/imported", data={"name": ctx.event.data["name"], "rows": imported}),
    )
    return {"file": ctx.event.data["name"], "rows": imported}
