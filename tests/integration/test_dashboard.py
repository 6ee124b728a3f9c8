"""The dashboard's pages, API and guards, in-process (httpx against the ASGI app), over a real
nats-server with real runs."""

from __future__ import annotations

import asyncio
import base64
import html
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

import meshflow
from dashboard import Auth, Dashboard, create_app
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until

XSS = '<script>alert("x")</script>"><img src=x onerror=alert(1)>'


def demo_app() -> tuple[meshflow.App, meshflow.Function, meshflow.Function]:
    app = meshflow.App("demo")

    @app.function("greet", trigger="demo/greet", retries=0)
    async def greet(ctx: meshflow.Context) -> dict[str, Any]:
        text = await ctx.step.run("compose", lambda: f"hello {ctx.event.data['who']}")
        if ctx.event.data.get("fail"):
            await ctx.step.run("explode", _explode)
        return {"text": text}

    @app.function("nap", trigger="demo/nap")
    async def nap(ctx: meshflow.Context) -> None:
        await ctx.step.sleep("long", "1h")

    return app, greet, nap


def _explode() -> None:
    raise ValueError("boom <b>bold</b>")


@pytest.fixture
async def web(client: meshflow.Client) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(client=client))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        yield http


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


async def test_runs_run_detail_events_functions_and_workers_pages_show_real_runs(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, web: httpx.AsyncClient
) -> None:
    app, greet, _ = demo_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace, worker_id="w-dash"):
        ok = meshflow.Event(name="demo/greet", data={"who": "ann"})
        bad = meshflow.Event(name="demo/greet", data={"who": "bob", "fail": True})
        await client.send([ok, bad])
        done = await client.wait_for_run(greet.run_id_for(ok))
        failed = await client.wait_for_run(greet.run_id_for(bad))

        runs = await web.get("/runs")
        assert runs.status_code == 200
        assert done.id in runs.text
        assert failed.id in runs.text
        only_failed = await web.get("/runs", params={"status": "failed"})
        assert failed.id in only_failed.text
        assert done.id not in only_failed.text
        by_event = await web.get("/runs", params={"q": ok.id})
        assert done.id in by_event.text
        assert failed.id not in by_event.text

        detail = await web.get(f"/runs/{failed.id}")
        assert detail.status_code == 200
        assert "compose" in detail.text
        assert "explode" in detail.text
        assert "ValueError: boom &lt;b&gt;bold&lt;/b&gt;" in detail.text  # the error, escaped

        events = await web.get("/events")
        assert ok.id in events.text
        functions = await web.get("/functions")
        assert "demo-greet" in functions.text
        assert "demo/greet" in functions.text
        workers = await web.get("/workers")
        assert "w-dash" in workers.text

        api_runs = (await web.get("/api/runs", params={"function": "demo-greet"})).json()
        assert {r["id"] for r in api_runs["runs"]} == {done.id, failed.id}
        api_run = (await web.get(f"/api/runs/{done.id}")).json()
        assert api_run["output"] == {"text": "hello ann"}
        assert [s["id"] for s in api_run["steps"]] == ["compose"]
        assert (await web.get("/api/runs/nope")).status_code == 404
        assert (await web.get("/api/runs", params={"status": "weird"})).status_code == 400
        spec = (await web.get("/api/openapi.json")).json()
        assert "/api/runs/{run_id}/cancel" in spec["paths"]


async def test_event_and_step_data_render_inert(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, web: httpx.AsyncClient
) -> None:
    app, greet, _ = demo_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="demo/greet", data={"who": XSS})
        await client.send(event)
        run = await client.wait_for_run(greet.run_id_for(event))
        pages = [await web.get(f"/runs/{run.id}"), await web.get("/events"), await web.get("/runs")]
    for page in pages:
        assert "<script>alert" not in page.text
        assert "<img src=x" not in page.text
        assert "onerror=alert(1)>" not in page.text.replace("&gt;", "")  # only ever as escaped text
    assert "&lt;script&gt;alert" in pages[0].text
    assert "script-src 'self'" in pages[0].headers["content-security-policy"]


async def test_a_post_without_the_csrf_token_is_refused_and_with_it_cancels_and_replays(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, web: httpx.AsyncClient
) -> None:
    app, _, nap = demo_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="demo/nap")
        await client.send(event)
        run_id = nap.run_id_for(event)
        await client.wait_for_run(run_id, until=meshflow.RunStatus.SLEEPING)

        refused = await web.post(f"/runs/{run_id}/cancel")
        assert refused.status_code == 403
        token = csrf_of(await web.get(f"/runs/{run_id}"))
        forged = await web.post(f"/runs/{run_id}/cancel", data={"csrf_token": "not-the-cookie"})
        assert forged.status_code == 403
        assert (await client.get_run(run_id)).status is meshflow.RunStatus.SLEEPING

        cancelled = await web.post(f"/runs/{run_id}/cancel", data={"csrf_token": token})
        assert cancelled.status_code == 303
        run = await client.wait_for_run(run_id)
        assert run.status is meshflow.RunStatus.CANCELLED

        replayed = await web.post(f"/api/runs/{run_id}/replay", headers={"x-csrf-token": token})
        assert replayed.status_code == 201
        again = await client.wait_for_run(replayed.json()["run_id"], until=meshflow.RunStatus.SLEEPING)
        assert again.replay_of == run_id
        await client.cancel(again.id)


async def test_with_no_worker_to_cancel_or_replay_the_dashboard_says_so_with_a_503(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, _, nap = demo_app()
    event = meshflow.Event(name="demo/nap")
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        await client.send(event)
        await client.wait_for_run(nap.run_id_for(event), until=meshflow.RunStatus.SLEEPING)
    run_id = nap.run_id_for(event)  # sleeping; its worker has stopped
    async with meshflow.connect(nats_server.url, namespace=namespace, read_only=True) as viewer:
        transport = httpx.ASGITransport(app=create_app(client=viewer))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as web:
            token = csrf_of(await web.get(f"/runs/{run_id}"))
            page = await web.post(f"/runs/{run_id}/cancel", data={"csrf_token": token})
            assert page.status_code == 503
            assert "no worker is running" in page.text
            api = await web.post(f"/api/runs/{run_id}/replay", headers={"x-csrf-token": token})
            assert api.status_code == 503
            assert "no worker is running" in api.json()["error"]
    assert (await client.get_run(run_id)).status is meshflow.RunStatus.SLEEPING


async def test_sending_an_event_from_the_form_validates_it(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, web: httpx.AsyncClient
) -> None:
    app, greet, _ = demo_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        token = csrf_of(await web.get("/send"))
        bad_json = await web.post("/send", data={"csrf_token": token, "name": "demo/greet", "data": "{nope"})
        assert bad_json.status_code == 400
        assert "not JSON" in bad_json.text
        bad_name = await web.post("/send", data={"csrf_token": token, "name": "demo greet", "data": "{}"})
        assert bad_name.status_code == 400
        assert "invalid event name" in bad_name.text
        sent = await web.post(
            "/send", data={"csrf_token": token, "name": "demo/greet", "data": '{"who": "cy"}'}
        )
        assert sent.status_code == 303
        event_id = sent.headers["location"].rsplit("=", 1)[1]
        run = await client.wait_for_run(greet.run_id_for(event_id))
    assert run.output == {"text": "hello cy"}


async def test_with_auth_configured_every_page_needs_credentials(
    client: meshflow.Client,
) -> None:
    auth = Auth(token="s3cret", username="ops", password="pw")
    transport = httpx.ASGITransport(app=create_app(client=client, auth=auth))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        assert (await http.get("/runs")).status_code == 401
        assert (await http.get("/api/runs", headers={"authorization": "Bearer wrong"})).status_code == 401
        assert (await http.get("/api/runs", headers={"authorization": "Bearer s3cret"})).status_code == 200
        basic = base64.b64encode(b"ops:pw").decode()
        assert (await http.get("/runs", headers={"authorization": f"Basic {basic}"})).status_code == 200
        # a bearer token is never sent by a browser on its own: no CSRF token needed
        sent = await http.post(
            "/api/events",
            json={"name": "demo/greet", "data": {"who": "api"}},
            headers={"authorization": "Bearer s3cret"},
        )
        assert sent.status_code == 201


def test_binding_a_public_address_without_auth_is_refused() -> None:
    with pytest.raises(meshflow.ConfigError, match="without authentication"):
        Dashboard("nats://127.0.0.1:4222", host="0.0.0.0")  # noqa: S104 - the point of the test
    Dashboard("nats://127.0.0.1:4222", host="0.0.0.0", auth=Auth(token="t"))  # noqa: S104
    Dashboard("nats://127.0.0.1:4222", host="::1")


async def test_metrics_count_finished_runs_and_steps_and_show_backlogs(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app, greet, _ = demo_app()
    board = create_app(client=client)
    board.app.state.metrics.start(client)  # what the lifespan does when uvicorn serves it
    transport = httpx.ASGITransport(app=board)
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http,
            meshflow.Worker(app, nats=nats_server.url, namespace=namespace),
        ):
            await asyncio.wait_for(board.app.state.metrics.following.wait(), 5)
            event = meshflow.Event(name="demo/greet", data={"who": "m"})
            await client.send(event)
            await client.wait_for_run(greet.run_id_for(event))

            async def scraped() -> str | None:
                text = (await http.get("/metrics")).text
                finished = (
                    'meshflow_runs_finished_total{function="demo-greet",status="completed"} 1.0' in text
                    and 'meshflow_runs_started_total{function="demo-greet"} 1.0' in text
                )
                handled = 'meshflow_trigger_events_total{function="demo-greet"} 1.0' in text  # acked last
                return text if finished and handled else None

            text = await wait_until(scraped, timeout=10)
    finally:
        await board.app.state.metrics.stop()
    assert 'meshflow_runs_started_total{function="demo-greet"} 1.0' in text
    assert 'meshflow_steps_total{function="demo-greet",kind="run",status="completed"} 1.0' in text
    assert 'meshflow_step_duration_seconds_count{function="demo-greet",kind="run"} 1.0' in text
    assert 'meshflow_consumer_pending{consumer="events",function="demo-greet"} 0.0' in text
    assert "meshflow_workers 1.0" in text
    assert 'meshflow_trigger_events_total{function="demo-greet"} 1.0' in text


async def test_odd_ids_and_names_in_urls_are_not_found_not_errors(web: httpx.AsyncClient) -> None:
    for path in ("/runs/a%20b", "/runs/a.%3E", "/api/runs/*", "/runs?q=x%20y%20>"):
        page = await web.get(path)
        assert page.status_code in (200, 404), path
    assert (await web.get("/events", params={"name": "a b"})).status_code == 400
    assert (await web.get("/api/events", params={"name": "a.>"})).status_code == 400
    assert (await web.get("/healthz")).status_code == 200


async def test_bulk_replay_of_failed_runs_and_bulk_cancel(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, web: httpx.AsyncClient
) -> None:
    app, greet, nap = demo_app()
    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        failing = [meshflow.Event(name="demo/greet", data={"who": f"f{i}", "fail": True}) for i in range(3)]
        fine = meshflow.Event(name="demo/greet", data={"who": "ok"})
        naps = [meshflow.Event(name="demo/nap") for _ in range(2)]
        await client.send([*failing, fine, *naps])
        for e in [*failing, fine]:
            await client.wait_for_run(greet.run_id_for(e))
        for e in naps:
            await client.wait_for_run(nap.run_id_for(e), until=meshflow.RunStatus.SLEEPING)
        token = csrf_of(await web.get("/runs"))

        replayed = await web.post(
            "/runs/bulk", data={"csrf_token": token, "action": "replay", "function": "demo-greet"}
        )
        assert replayed.status_code == 200
        assert "Bulk replay: 3 runs of demo-greet" in replayed.text
        new_ids = re.findall(r'href="/runs/([0-9A-Z]{26})"', replayed.text)
        assert len(new_ids) == 3
        originals = {greet.run_id_for(e) for e in failing}
        assert {(await client.wait_for_run(r)).replay_of for r in new_ids} == originals

        cancelled = await web.post(
            "/runs/bulk", data={"csrf_token": token, "action": "cancel", "function": "demo-nap"}
        )
        assert "Bulk cancel: 2 runs of demo-nap" in cancelled.text
        for e in naps:
            assert (await client.wait_for_run(nap.run_id_for(e))).status is meshflow.RunStatus.CANCELLED
        bad = await web.post(
            "/runs/bulk", data={"csrf_token": token, "action": "explode", "function": "demo-nap"}
        )
        assert bad.status_code == 400


async def test_the_run_page_shows_every_attempt_of_a_retried_step_with_its_error_as_text(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, web: httpx.AsyncClient
) -> None:
    app = meshflow.App("tries")
    calls = [0]

    def flaky() -> str:
        calls[0] += 1
        if calls[0] <= 2:
            raise ConnectionError(f"{XSS} try {calls[0]}")
        return "done"

    @app.function("flaky", trigger="tries/go", retries=meshflow.Retry(retries=3, backoff=("100ms",)))
    async def fn(ctx: meshflow.Context) -> str:
        return str(await ctx.step.run("call", flaky))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace, worker_id="w-page"):
        event = meshflow.Event(name="tries/go")
        await client.send(event)
        run = await client.wait_for_run(fn.run_id_for(event), timeout=30)
    page = await web.get(f"/runs/{run.id}")
    assert page.status_code == 200
    rows = re.findall(r'<tr class="attempt">(.*?)</tr>', page.text, re.S)
    assert len(rows) == 3
    assert "ConnectionError: &lt;script&gt;" in rows[0]  # rendered as text, never as markup
    assert "try 1" in rows[0]
    assert "try 2" in rows[1]
    assert "succeeded" in rows[2]
    assert all("w-page" in row for row in rows)
    assert "<script>alert" not in page.text
    assert page.text.count('class="s-failed"') >= 2  # each failed attempt marked on the timeline


async def test_the_run_page_shows_each_steps_input_as_escaped_text_folding_a_long_one(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client, web: httpx.AsyncClient
) -> None:
    app = meshflow.App("inputs")

    @app.function("echo", trigger="inputs/go", retries=0)
    async def echo(ctx: meshflow.Context) -> int:
        await ctx.step.run("short", lambda text: len(text), XSS)
        await ctx.step.run("long", len, list(range(50)))
        await ctx.step.run("opaque", lambda thing: 0, object())
        return 0

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="inputs/go")
        await client.send(event)
        run = await client.wait_for_run(echo.run_id_for(event), timeout=30)
    page = await web.get(f"/runs/{run.id}")
    assert page.status_code == 200
    inputs = re.findall(
        r'<details class="input"( open)?><summary>Input</summary><pre class="input">(.*?)</pre>',
        page.text,
        re.S,
    )
    assert [(opened, json.loads(html.unescape(text))) for opened, text in inputs] == [
        (" open", [XSS]),
        ("", [list(range(50))]),  # 50 lines and more: folded
    ]
    assert "&lt;script&gt;alert" in inputs[0][1]  # as text, never as markup
    marker = "&lt;not JSON: TypeError: cannot encode a value of type builtins.object&gt;"
    assert f'<p class="input">Input {marker}</p>' in page.text
    assert "<script>alert" not in page.text
    api = (await web.get(f"/api/runs/{run.id}")).json()
    assert [s["input"] for s in api["steps"]] == [
        [XSS],
        [list(range(50))],
        "<not JSON: TypeError: cannot encode a value of type builtins.object>",
    ]
