"""Who may use the dashboard, and what a browser may do with its pages.

- Binding: 127.0.0.1 (or another loopback address) by default. Any other address is refused
  unless authentication is configured, so the dashboard is never an open door on a network.
- Authentication: a token and/or a username and password. API clients send
  ``Authorization: Bearer <token>``; browsers use HTTP Basic (any username with the token as the
  password, or the configured username and password).
- CSRF: every POST carries the token of the ``mf_csrf`` cookie (SameSite=Strict, HttpOnly) in a
  form field or an ``X-CSRF-Token`` header; a bearer-token request, which a browser never sends
  on its own, is exempt.
- Headers: a strict Content-Security-Policy (scripts, styles and requests from this origin only,
  no inline script, no framing), no sniffing, no referrer.

Event and step data are only ever rendered as escaped text (Jinja2 autoescaping; ``|tojson`` in
<pre> blocks), never as HTML.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from meshflow.errors import ConfigError

CSRF_COOKIE = "mf_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@dataclass(frozen=True)
class Auth:
    """Credentials the dashboard accepts. Empty: nobody needs to sign in (loopback only)."""

    token: str | None = None
    username: str | None = None
    password: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.token or (self.username and self.password))

    def check(self, header: str | None) -> str | None:
        """Who the ``Authorization`` header names, if its credentials are valid; else None."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.token:
            return "token" if hmac.compare_digest(value.strip(), self.token) else None
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if self.token and hmac.compare_digest(password, self.token):
            return user or "token"
        if self.username and self.password:
            ok = hmac.compare_digest(user, self.username) and hmac.compare_digest(password, self.password)
            return user if ok else None
        return None


def check_bind(host: str, auth: Auth) -> None:
    """Refuse to serve on a non-loopback address without authentication."""
    if auth.enabled or _loopback(host):
        return
    raise ConfigError(
        f"refusing to serve the dashboard on {host} without authentication: anyone who can reach "
        "it could cancel runs and send events. Set a token (--token or MESHFLOW_DASHBOARD_TOKEN) "
        "or a username and password, or bind 127.0.0.1"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]
]


class Guard:
    """ASGI middleware: authentication, CSRF on POST, security headers, and the CSRF cookie."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        who = "local"
        if self.auth.enabled:
            found = self.auth.check(request.headers.get("authorization"))
            if found is None:
                await _with_headers(
                    PlainTextResponse(
                        "authentication required",
                        status_code=401,
                        headers={"www-authenticate": 'Basic realm="meshflow", charset="UTF-8"'},
                    )
                )(scope, receive, send)
                return
            who = found
        scope.setdefault("state", {})["user"] = who
        cookie = request.cookies.get(CSRF_COOKIE)
        token = cookie or secrets.token_urlsafe(32)
        scope["state"]["csrf"] = token
        if request.method == "POST" and not _bearer(request):
            body = await request.body()
            if not _csrf_ok(request, body, cookie):
                await _with_headers(PlainTextResponse("missing or wrong CSRF token", status_code=403))(
                    scope, receive, send
                )
                return
            receive = _replay(body)  # the handler reads the body we consumed

        async def send_secured(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for key, value in SECURITY_HEADERS.items():
                    if key.encode() not in names:
                        headers.append((key.encode(), value.encode()))
                if cookie is None:
                    headers.append(
                        (
                            b"set-cookie",
                            f"{CSRF_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict".encode(),
                        )
                    )
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_secured)


def _bearer(request: Request) -> bool:
    return request.headers.get("authorization", "").lower().startswith("bearer ")


def _csrf_ok(request: Request, body: bytes, cookie: str | None) -> bool:
    if not cookie:
        return False
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        values = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get(CSRF_FIELD)
        sent = values[0] if values else None
    return sent is not None and hmac.compare_digest(sent, cookie)


def _replay(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _with_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response
