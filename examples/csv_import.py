"""CSV import: parse the file, then import it in chunks, each a step retried on its own.

    meshflow send csv/uploaded --data '{"name": "contacts.csv", "csv": "email,name\\na@b.c,Ann\\nb@c.d,Bob"}'

The CRM in this example fails the first call of every chunk (a flaky API): watch each chunk's
step retry and the run complete, with the chunks already imported never imported again. What the
run logs shows on its page and in ``meshflow logs RUN_ID``: ``ctx.logger``'s records, and the
stdlib ``logging`` ones of the CRM client (``meshflow dev`` keeps those: ``capture_logging``).
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import meshflow

app = meshflow.App("imports")

CHUNK = 2
_calls: dict[int, int] = {}
crm = logging.getLogger("imports.crm")


def parse(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def import_chunk(index: int, rows: list[dict[str, str]]) -> int:
    _calls[index] = _calls.get(index, 0) + 1
    crm.info("sending chunk %d (%d rows) to the CRM", index, len(rows))
    if _calls[index] == 1:
        crm.warning("the CRM did not answer within 10 s")
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
    ctx.logger.info("parsed the file", file=ctx.event.data["name"], rows=len(rows))
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
