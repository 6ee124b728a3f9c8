"""HTML pages: runs, a run (live), events, an event, functions, workers, and the forms' actions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

import meshflow
from meshflow.durations import now_ms

from .common import BadRequest, audit, client_of, csrf, form_of, int_param, run_page, user, when_param

PAGE = 50


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    context.update(request=request, csrf=csrf(request), user=user(request), nav=template.split(".")[0])
    response: Response = request.app.state.templates.TemplateResponse(
        request, template, context, status_code=status_code
    )
    return response


def problem(request: Request, message: str, status_code: int = 400) -> Response:
    return page(request, "error.html", status_code=status_code, message=message)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def home(request: Request) -> Response:
    return RedirectResponse("/runs", status_code=307)


async def runs(request: Request) -> Response:
    query = request.query_params.get("q", "").strip()
    client = client_of(request)
    if query:  # a run id, or an event id (the runs it started)
        try:
            await client.get_run(query)
            return RedirectResponse(f"/runs/{query}", status_code=303)
        except meshflow.RunNotFoundError:
            found = await client.runs_for_event(query)
            return page(request, "runs.html", runs=found, cursor=None, query=query, functions=[], filters={})
    try:
        data = await run_page(request, PAGE)
    except BadRequest as exc:
        return problem(request, str(exc))
    functions = await client.functions()
    filters = {
        k: v for k, v in request.query_params.items() if k in ("status", "function", "since", "until") and v
    }
    next_url = f"/runs?{urlencode({**filters, 'before': data['cursor']})}" if data["cursor"] else None
    return page(
        request,
        "runs.html",
        **data,
        query="",
        functions=functions,
        filters=filters,
        statuses=[s.value for s in meshflow.RunStatus],
        next_url=next_url,
    )


async def _run_context(request: Request) -> dict[str, Any]:
    client = client_of(request)
    run = await client.get_run(request.path_params["run_id"])
    start = run.created_at
    end = run.ended_at or now_ms()
    span = max(end - start, 1)
    bars = []
    for step in run.steps:
        first = step.history[0].started_at if step.history else step.started_at
        began = first or step.started_at or start
        s0, s1 = began - start, (step.ended_at or end) - start
        bars.append(
            {
                "step": step,
                "left": round(100 * s0 / span, 2),
                "width": max(round(100 * (s1 - s0) / span, 2), 0.5),
                "duration": (step.ended_at - began) if step.ended_at else None,
                # one mark per attempt on the timeline: the gaps between them are the backoffs
                "segments": _segments(step.history, start, end, span),
            }
        )
    children = [s.child_run_id for s in run.steps if s.child_run_id]
    return {"run": run, "bars": bars, "children": children, "span": span}


def _segments(history: list[meshflow.Attempt], start: int, end: int, span: int) -> list[dict[str, Any]]:
    return [_segment(a, start, end, span) for a in history] if len(history) > 1 else []


def _segment(attempt: meshflow.Attempt, start: int, end: int, span: int) -> dict[str, Any]:
    s0 = attempt.started_at - start
    s1 = (attempt.ended_at or end) - start
    if attempt.error is None:
        cls = "s-completed"
    elif attempt.ended_at is None:
        cls = "s-interrupted"
    else:
        cls = "s-failed"
    return {
        "left": round(100 * s0 / span, 2),
        "width": max(round(100 * (s1 - s0) / span, 2), 0.5),
        "cls": cls,
    }


async def run_detail(request: Request) -> Response:
    try:
        context = await _run_context(request)
    except meshflow.RunNotFoundError:
        return problem(request, f"no run {request.path_params['run_id']}", 404)
    logs: list[meshflow.LogRecord] = []
    logs_error = None
    try:
        logs = await client_of(request).logs(context["run"].id)
    except meshflow.NatsError as exc:  # say so on the page; the rest of it still shows
        logs_error = str(exc)
    wheres = sorted({_where(r) for r in logs})
    return page(request, "run.html", **context, logs=logs, logs_error=logs_error, log_wheres=wheres)


def _where(record: meshflow.LogRecord) -> str:
    return record.step_id if record.step_id is not None else "(function)"


async def run_logs_stream(request: Request) -> Response:
    """Server-sent events: the run's log records after the first ``after`` (those the page
    shows already), live, until the run ends (then an ``end`` event) or the page goes."""
    client = client_of(request)
    run_id = request.path_params["run_id"]
    try:
        skip = int_param(request, "after", 0) or 0
    except BadRequest as exc:
        return PlainTextResponse(str(exc), status_code=400)

    async def records() -> AsyncIterator[str]:
        n = 0
        try:
            async for record in client.follow_logs(run_id):
                if await request.is_disconnected():
                    return
                n += 1
                if n > skip:
                    line = msgspec.json.encode({**msgspec.to_builtins(record), "where": _where(record)})
                    yield f"event: log\ndata: {line.decode()}\n\n"
        except meshflow.MeshflowError as exc:
            yield f"event: failed\ndata: {json.dumps(str(exc))}\n\n"
        yield "event: end\ndata: {}\n\n"

    return StreamingResponse(records(), media_type="text/event-stream", headers={"cache-control": "no-store"})


async def run_body(request: Request) -> Response:
    """The run's live part, re-fetched by the page when the run changes."""
    try:
        context = await _run_context(request)
    except meshflow.RunNotFoundError:
        return PlainTextResponse("no such run", status_code=404)
    return page(request, "_run_body.html", **context)


async def run_stream(request: Request) -> Response:
    """Server-sent events: one per change of the run's record, until it ends or the page goes."""
    client = client_of(request)
    run_id = request.path_params["run_id"]

    async def changes() -> AsyncIterator[str]:
        async for run in client.watch_run(run_id):
            if await request.is_disconnected():
                return
            change = json.dumps({"status": run.status.value, "updated_at": run.updated_at})
            yield f"event: run\ndata: {change}\n\n"
            if run.finished:
                return

    return StreamingResponse(changes(), media_type="text/event-stream", headers={"cache-control": "no-store"})


async def cancel_run(request: Request) -> Response:
    run_id = request.path_params["run_id"]
    try:
        asked = await client_of(request).cancel(
            run_id, reason=f"cancelled from the dashboard by {user(request)}"
        )
    except meshflow.RunNotFoundError:
        return problem(request, f"no run {run_id}", 404)
    audit(request, "cancel", run_id=run_id, asked=asked)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


async def replay_run(request: Request) -> Response:
    run_id = request.path_params["run_id"]
    try:
        new_id = await client_of(request).replay(run_id)
    except meshflow.RunNotFoundError:
        return problem(request, f"no run {run_id}", 404)
    audit(request, "replay", run_id=run_id, new_run_id=new_id)
    return RedirectResponse(f"/runs/{new_id}", status_code=303)


async def bulk(request: Request) -> Response:
    """Cancel, or replay, the runs of a function in a time range (replay: its failed runs)."""
    form = await form_of(request)
    action = str(form.get("action", ""))
    function = str(form.get("function", "")).strip()
    if action not in ("cancel", "replay") or not function:
        return problem(request, "bulk actions need an action (cancel or replay) and a function")
    fields = {k: str(form.get(k, "")) for k in ("since", "until")}
    scope = dict(request.scope, query_string=urlencode(fields).encode())
    bounds = Request(scope)
    try:
        since, until = when_param(bounds, "since"), when_param(bounds, "until")
    except BadRequest as exc:
        return problem(request, str(exc))
    client = client_of(request)
    if action == "cancel":
        done = await client.cancel_runs(function, since=since, until=until)
    else:
        done = await _replay_failed(client, function, since, until)
    audit(
        request,
        f"bulk {action}",
        function=function,
        since=fields["since"],
        until=fields["until"],
        runs=len(done),
    )
    return page(request, "done.html", action=action, function=function, run_ids=done)


async def _replay_failed(client: meshflow.Client, function: str, since: Any, until: Any) -> list[str]:
    replayed: list[str] = []
    cursor: int | None = None
    while True:
        batch, cursor = await client.list_runs(
            before=cursor,
            limit=200,
            status=meshflow.RunStatus.FAILED,
            function_id=function,
            since=since,
            until=until,
        )
        for run in batch:
            replayed.append(await client.replay(run.id))
        if cursor is None or len(replayed) >= 10_000:
            return replayed


async def events(request: Request) -> Response:
    name = request.query_params.get("name", "").strip() or None
    try:
        before = int_param(request, "before")
        found, cursor = await client_of(request).list_events(before=before, limit=PAGE, name=name)
    except (BadRequest, meshflow.EventError) as exc:
        return problem(request, str(exc))
    query = {"name": name} if name else {}
    next_url = f"/events?{urlencode({**query, 'before': cursor})}" if cursor else None
    return page(request, "events.html", events=found, name=name or "", next_url=next_url)


async def event_detail(request: Request) -> Response:
    seq = int(request.path_params["seq"])
    client = client_of(request)
    event = await client.get_event(seq)
    if event is None:
        return problem(request, f"no event at sequence {seq} (events are kept 7 days)", 404)
    started = await client.runs_for_event(event.id)
    return page(request, "event.html", event=event, seq=seq, runs=started)


async def functions(request: Request) -> Response:
    client = client_of(request)
    infos = await client.functions()
    counts: dict[str, dict[str, int]] = {}
    recent, _ = await client.list_runs(limit=2000, budget=2000)
    for run in recent:
        counts.setdefault(run.function_id, {}).setdefault(run.status.value, 0)
        counts[run.function_id][run.status.value] += 1
    ticks = {f.full_id: await client.next_ticks(f.full_id) for f in infos if f.crons}
    return page(request, "functions.html", functions=infos, counts=counts, ticks=ticks, sample=len(recent))


async def workers(request: Request) -> Response:
    return page(request, "workers.html", workers=await client_of(request).workers(), now=now_ms())


async def send_form(request: Request) -> Response:
    return page(request, "send.html", name="", data="{}", error=None)


async def send_event(request: Request) -> Response:
    form = await form_of(request)
    name, data = str(form.get("name", "")).strip(), str(form.get("data", "{}"))
    try:
        payload = json.loads(data or "{}")
        if not isinstance(payload, dict):
            raise meshflow.EventError('data must be a JSON object, like {"email": "a@b.c"}')
        [event_id] = await client_of(request).send(meshflow.Event(name=name, data=payload))
    except json.JSONDecodeError as exc:
        return page(
            request, "send.html", status_code=400, name=name, data=data, error=f"data is not JSON: {exc}"
        )
    except meshflow.EventError as exc:
        return page(request, "send.html", status_code=400, name=name, data=data, error=str(exc))
    audit(request, "send", event_name=name, event_id=event_id)
    return RedirectResponse(f"/runs?{urlencode({'q': event_id})}", status_code=303)


def routes() -> list[Route]:
    return [
        Route("/", home),
        Route("/runs", runs),
        Route("/runs/bulk", bulk, methods=["POST"]),
        Route("/runs/{run_id}", run_detail),
        Route("/runs/{run_id}/body", run_body),
        Route("/runs/{run_id}/stream", run_stream),
        Route("/runs/{run_id}/logs/stream", run_logs_stream),
        Route("/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        Route("/runs/{run_id}/replay", replay_run, methods=["POST"]),
        Route("/events", events),
        Route("/events/{seq:int}", event_detail),
        Route("/functions", functions),
        Route("/workers", workers),
        Route("/send", send_form),
        Route("/send", send_event, methods=["POST"]),
    ]
