"""The dashboard's Starlette app: pages, the JSON API, static files, all behind `security.Guard`.

It reads and acts only through meshflow's public client (`meshflow.connect`), never through the
worker or the engine, so it runs against any deployment: ``meshflow dashboard --nats URL``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import meshflow

from . import api, metrics, views
from .common import templates
from .security import Auth, Guard

HERE = Path(__file__).parent


def create_app(
    nats: str | Sequence[str] = "nats://127.0.0.1:4222",
    *,
    namespace: str = "mf",
    auth: Auth | None = None,
    client: meshflow.Client | None = None,
    nats_auth: meshflow.NatsAuth | None = None,
) -> Guard:
    """The dashboard as an ASGI app.

    Args:
        nats: the NATS server URL(s) of the deployment to show.
        namespace: its namespace.
        auth: who may sign in (`Auth`); none means open to whoever reaches it (bind loopback only).
        client: an already connected client to use instead of connecting (tests).
        nats_auth: credentials and TLS for NATS.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if client is None:
                app.state.client = await stack.enter_async_context(
                    # read_only: cancel and replay are asked of a worker, so the dashboard's
                    # NATS identity needs no right to write run records (deploy/nats/accounts.conf)
                    meshflow.connect(nats, namespace=namespace, auth=nats_auth, read_only=True)
                )
            app.state.metrics.start(app.state.client)
            stack.push_async_callback(app.state.metrics.stop)
            yield

    app = Starlette(
        routes=[
            *views.routes(),
            Mount("/api", routes=api.routes()),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
            Route("/healthz", views.healthz),
            Route("/metrics", metrics.endpoint),
        ],
        lifespan=lifespan,
        exception_handlers={meshflow.NatsError: unavailable},
    )
    app.state.templates = templates()
    app.state.metrics = metrics.Metrics()
    app.state.namespace = namespace
    if client is not None:
        app.state.client = client
    return Guard(app, auth or Auth())


async def unavailable(request: Request, exc: Exception) -> Response:
    """NATS could not do what was asked (no worker to carry out a cancel, a server down): 503,
    saying why, as JSON under /api/ and as a page elsewhere."""
    if request.url.path.startswith("/api/"):
        return api.error(str(exc), 503)
    return views.problem(request, str(exc), 503)
