"""The example apps run as their docstrings say."""

from __future__ import annotations

import meshflow
from examples.approval import app as finance_app
from examples.approval import approve_expense
from examples.digest import app as digest_app
from examples.digest import user_digest
from meshflow.server import EmbeddedServer


async def test_the_approval_example_pays_an_approved_expense(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    async with meshflow.Worker(finance_app, nats=nats_server.url, namespace=namespace):
        submitted = meshflow.Event(name="expense/submitted", data={"expense_id": "e-1", "amount": 420})
        await client.send(submitted)
        await client.send(
            meshflow.Event(name="expense/decided", data={"expense_id": "e-1", "approved": True, "by": "ann"})
        )
        run = await client.wait_for_run(approve_expense.run_id_for(submitted), timeout=20)
    assert run.output == {"status": "paid", "paid": 420, "expense_id": "e-1"}


async def test_the_digest_example_makes_one_digest_per_user_and_week(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    async with meshflow.Worker(digest_app, nats=nats_server.url, namespace=namespace):
        first = meshflow.Event(name="digest/user.due", data={"user": "ann", "week": "w1"})
        again = meshflow.Event(name="digest/user.due", data={"user": "ann", "week": "w1"})
        await client.send([first, again])
        run = await client.wait_for_run(user_digest.run_id_for(first), timeout=20)
        other = meshflow.Event(name="digest/user.due", data={"user": "ann", "week": "w2"})
        await client.send(other)
        await client.wait_for_run(user_digest.run_id_for(other), timeout=20)
        duplicate = await client.runs_for_event(again.id)
    assert run.output == {"user": "ann", "summary": "3 new things for ann"}
    assert duplicate == []


async def test_the_csv_example_imports_every_chunk_once_despite_a_flaky_crm(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    from examples import csv_import

    fast = meshflow.Retry(retries=3, backoff=("50ms",))
    app = meshflow.App("imports")
    app.function("import-csv", trigger="csv/uploaded", retries=fast)(csv_import.import_csv.handler)
    [fn] = app.functions
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        upload = meshflow.Event(
            name="csv/uploaded", data={"name": "c.csv", "csv": "email,name\na@b.c,Ann\nb@c.d,Bob\nc@d.e,Cy"}
        )
        await client.send(upload)
        run = await client.wait_for_run(fn.run_id_for(upload), timeout=20)
    assert run.output == {"file": "c.csv", "rows": 3}
    chunks = [s for s in run.steps if s.id == "import-chunk"]
    assert [s.attempts for s in chunks] == [2, 2]
