"""The meshflow web dashboard: every event, run and step in the browser; replay, cancel, send.

``meshflow dashboard --nats URL`` serves it alone; ``meshflow dev`` serves it beside the embedded
server and a worker, on http://127.0.0.1:8288. See `dashboard.security` for who may use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import uvicorn

import meshflow

from .app import create_app
from .security import Auth, check_bind

__all__ = ["DEFAULT_PORT", "Auth", "Dashboard", "create_app"]

DEFAULT_PORT = 8288


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the process that embeds the dashboard owns SIGINT and SIGTERM


class Dashboard:
    """The dashboard served by uvicorn inside the caller's event loop.

    Refuses (`ConfigError`) a non-loopback ``host`` unless ``auth`` is configured. Give it a
    ``client`` connected already (read-only) to learn of a NATS problem before serving.
    """

    def __init__(
        self,
        nats: str | Sequence[str],
        *,
        namespace: str = "mf",
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        auth: Auth | None = None,
        nats_auth: meshflow.NatsAuth | None = None,
        client: meshflow.Client | None = None,
    ) -> None:
        auth = auth or Auth()
        check_bind(host, auth)
        self.url = f"http://{host}:{port}"
        app = create_app(nats, namespace=namespace, auth=auth, nats_auth=nats_auth, client=client)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="on", access_log=False
        )
        self._server = _Server(config)

    async def serve(self) -> None:
        """Serve until `stop` is called."""
        await self._server.serve()

    def stop(self) -> None:
        self._server.should_exit = True
