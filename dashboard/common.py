"""What the dashboard's pages and API share: templates and their filters, the client, the audit log."""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from pathlib import Path
from typing import Any

import jinja2
import msgspec
import structlog
from starlette.requests import Request
from starlette.templating import Jinja2Templates

import meshflow
from meshflow.durations import from_ms

HERE = Path(__file__).parent
log = structlog.get_logger("meshflow.dashboard")


def _when(ms: int | None) -> str:
    if not ms:
        return "—"
    return from_ms(ms).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _duration(ms: int | None) -> str:
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    return str(dt.timedelta(milliseconds=ms)).split(".")[0]


def _pretty(value: Any) -> str:
    """JSON text of a value, for a <pre> block (escaped by the template like any other text)."""
    return json.dumps(msgspec.to_builtins(value), indent=2, ensure_ascii=False, default=str)


def templates() -> Jinja2Templates:
    """Jinja2 templates with autoescaping on for every file (event and step data stay text)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    t = Jinja2Templates(env=env)
    t.env.filters["when"] = _when
    t.env.filters["duration"] = _duration
    t.env.filters["pretty"] = _pretty
    return t


def client_of(request: Request) -> meshflow.Client:
    c: meshflow.Client = request.app.state.client
    return c


def audit(request: Request, action: str, **fields: Any) -> None:
    """Log a mutating action with who did it."""
    log.info("dashboard action", action=action, user=request.scope.get("state", {}).get("user"), **fields)


def csrf(request: Request) -> str:
    token: str = request.scope.get("state", {}).get("csrf", "")
    return token


def user(request: Request) -> str:
    who: str = request.scope.get("state", {}).get("user", "local")
    return who


async def form_of(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (the dashboard's forms post nothing else: no multipart)."""
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}


class BadRequest(Exception):
    """A query or form value the user must fix; shown to them as is."""


def when_param(request: Request, name: str) -> dt.datetime | None:
    """A time filter from the query string: ISO-8601 (``2026-11-22T10:00``, UTC if no zone)."""
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name}: {raw!r} is not a date and time like 2026-11-22T10:00") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def int_param(
    request: Request, name: str, default: int | None = None, *, low: int = 0, high: int = 10**15
) -> int | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"{name}: expected a whole number from {low} to {high}, got {raw!r}")
    return int(raw)


def status_param(request: Request) -> meshflow.RunStatus | None:
    raw = request.query_params.get("status", "").strip()
    if not raw:
        return None
    try:
        return meshflow.RunStatus(raw)
    except ValueError:
        names = ", ".join(s.value for s in meshflow.RunStatus)
        raise BadRequest(f"status: {raw!r} is not one of {names}") from None


async def run_page(request: Request, limit: int = 50) -> dict[str, Any]:
    """The runs a list page shows (filters from the query string) and the next page's cursor."""
    client = client_of(request)
    function = request.query_params.get("function", "").strip() or None
    runs, cursor = await client.list_runs(
        before=int_param(request, "before"),
        limit=int_param(request, "limit", limit, low=1, high=500) or limit,
        status=status_param(request),
        function_id=function,
        since=when_param(request, "since"),
        until=when_param(request, "until"),
    )
    return {"runs": runs, "cursor": cursor}
