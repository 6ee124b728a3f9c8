"""The JSON API under ``/api/``: the pages' data as JSON, the same actions, and an OpenAPI document."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import meshflow

from .common import BadRequest, audit, client_of, int_param, run_page, user


def ok(value: Any, status_code: int = 200) -> Response:
    return JSONResponse(msgspec.to_builtins(value), status_code=status_code)


def error(message: str, status_code: int = 400) -> Response:
    return JSONResponse({"error": message}, status_code=status_code)


async def list_runs(request: Request) -> Response:
    try:
        data = await run_page(request)
    except BadRequest as exc:
        return error(str(exc))
    return ok({"runs": data["runs"], "next_before": data["cursor"]})


async def get_run(request: Request) -> Response:
    try:
        return ok(await client_of(request).get_run(request.path_params["run_id"]))
    except meshflow.RunNotFoundError:
        return error("no such run", 404)


async def cancel_run(request: Request) -> Response:
    run_id = request.path_params["run_id"]
    try:
        asked = await client_of(request).cancel(
            run_id, reason=f"cancelled through the API by {user(request)}"
        )
    except meshflow.RunNotFoundError:
        return error("no such run", 404)
    audit(request, "cancel", run_id=run_id, asked=asked)
    return ok({"cancelling": asked})


async def replay_run(request: Request) -> Response:
    run_id = request.path_params["run_id"]
    try:
        new_id = await client_of(request).replay(run_id)
    except meshflow.RunNotFoundError:
        return error("no such run", 404)
    audit(request, "replay", run_id=run_id, new_run_id=new_id)
    return ok({"run_id": new_id}, 201)


async def list_events(request: Request) -> Response:
    try:
        found, cursor = await client_of(request).list_events(
            before=int_param(request, "before"),
            limit=int_param(request, "limit", 50, low=1, high=500) or 50,
            name=request.query_params.get("name") or None,
        )
    except (BadRequest, meshflow.EventError) as exc:
        return error(str(exc))
    return ok({"events": [{"seq": seq, "event": e} for seq, e in found], "next_before": cursor})


async def get_event(request: Request) -> Response:
    client = client_of(request)
    event = await client.get_event(int(request.path_params["seq"]))
    if event is None:
        return error("no event at that sequence", 404)
    runs = await client.runs_for_event(event.id)
    return ok(
        {
            "event": event,
            "runs": [{"id": r.id, "function_id": r.function_id, "status": r.status} for r in runs],
        }
    )


async def send_event(request: Request) -> Response:
    try:
        body = json.loads(await request.body() or b"null")
    except json.JSONDecodeError as exc:
        return error(f"the body is not JSON: {exc}")
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return error('send {"name": "user/signup", "data": {...}} (and optionally "id")')
    fields = {k: body[k] for k in ("name", "data", "id") if k in body}
    try:
        [event_id] = await client_of(request).send(meshflow.Event(**fields))
    except (meshflow.EventError, TypeError) as exc:
        return error(str(exc))
    audit(request, "send", event_name=fields["name"], event_id=event_id)
    return ok({"id": event_id}, 201)


async def functions(request: Request) -> Response:
    return ok({"functions": await client_of(request).functions()})


async def workers(request: Request) -> Response:
    return ok({"workers": await client_of(request).workers()})


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


def _op(
    summary: str, *, params: tuple[str, ...] = (), body: bool = False, status: str = "200"
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {status: {"description": "OK", "content": {"application/json": {}}}},
    }
    if params:
        op["parameters"] = [
            {"name": p, "in": "query", "required": False, "schema": {"type": "string"}} for p in params
        ]
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    return op


_RUN_ID = [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}]
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "meshflow dashboard API",
        "version": "1",
        "description": "POSTs need the mf_csrf cookie's value in X-CSRF-Token, or a bearer token.",
    },
    "paths": {
        "/api/runs": {
            "get": _op(
                "Runs, newest first by creation (with a status: by when they took it)",
                params=("status", "function", "since", "until", "before", "limit"),
            )
        },
        "/api/runs/{run_id}": {"get": {**_op("A run with its steps"), "parameters": _RUN_ID}},
        "/api/runs/{run_id}/cancel": {"post": {**_op("Cancel a run"), "parameters": _RUN_ID}},
        "/api/runs/{run_id}/replay": {"post": {**_op("Replay a run", status="201"), "parameters": _RUN_ID}},
        "/api/events": {
            "get": _op("Events, newest first", params=("name", "before", "limit")),
            "post": _op("Send an event", body=True, status="201"),
        },
        "/api/events/{seq}": {
            "get": {
                **_op("An event and the runs it started"),
                "parameters": [
                    {"name": "seq", "in": "path", "required": True, "schema": {"type": "integer"}}
                ],
            }
        },
        "/api/functions": {"get": _op("Registered functions and their triggers")},
        "/api/workers": {"get": _op("Workers running now")},
    },
}


def routes() -> list[Route]:
    return [
        Route("/runs", list_runs),
        Route("/runs/{run_id}", get_run),
        Route("/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        Route("/runs/{run_id}/replay", replay_run, methods=["POST"]),
        Route("/events", list_events),
        Route("/events", send_event, methods=["POST"]),
        Route("/events/{seq:int}", get_event),
        Route("/functions", functions),
        Route("/workers", workers),
        Route("/openapi.json", openapi),
    ]
