"""Connecting to NATS: credentials and TLS (`NatsAuth`), connecting and reconnecting
(`open_nats`), and the start-up check that the server syncs every write (`check_durability`).

Every process (worker, client, dashboard, CLI) takes the same `NatsAuth`; the CLI fills it from
``--nats-*`` flags or ``MESHFLOW_NATS_*`` environment variables (`NatsAuth.from_env`). Files are
checked when the options are built, so a wrong path is a clear error, not a failed handshake.

nats-py errors never leave this module: they become `NatsError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient

from .errors import ConfigError, NatsError
from .requests import NATS_ERRORS

#: How long a process waits at start for a NATS server that is not up yet.
CONNECT_WAIT = 30.0

log = structlog.get_logger("meshflow.nats")

_INBOX_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True)
class NatsAuth:
    """Credentials and TLS settings for connecting to NATS (all optional).

    Attributes:
        user, password: a NATS user.
        token: an authorization token.
        nkey_seed: path to an nkey seed file.
        creds: path to a ``.creds`` file (a user JWT and its nkey seed).
        tls_ca: path to the CA bundle that signed the servers' certificates.
        tls_cert, tls_key: paths to this client's certificate and key (mutual TLS).
        inbox_prefix: the subject prefix of this client's reply inboxes (default ``_INBOX``).
            Give each identity its own (``_INBOX_worker``) and allow it only that one, and no
            identity can overhear the replies another one reads (deploy/nats/accounts.conf).
    """

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed: str | None = None
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    inbox_prefix: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> NatsAuth:
        """From ``MESHFLOW_NATS_USER``, ``_PASSWORD``, ``_TOKEN``, ``_NKEY``, ``_CREDS``,
        ``_TLS_CA``, ``_TLS_CERT``, ``_TLS_KEY`` and ``_INBOX_PREFIX``."""
        env = os.environ if environ is None else environ
        names = {"nkey_seed": "NKEY"}
        return cls(
            **{
                f.name: env.get(f"MESHFLOW_NATS_{names.get(f.name, f.name.upper())}") or None
                for f in fields(cls)
            }
        )

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        self._check()
        out: dict[str, Any] = {}
        if self.inbox_prefix is not None:
            out["inbox_prefix"] = self.inbox_prefix
        if self.user is not None:
            out.update(user=self.user, password=self.password)
        if self.token is not None:
            out["token"] = self.token
        if self.nkey_seed is not None:
            out["nkeys_seed"] = self.nkey_seed
        if self.creds is not None:
            out["user_credentials"] = self.creds
        if self.tls_ca is not None or self.tls_cert is not None:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None and self.tls_key is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            out["tls"] = context
        return out

    def _check(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ConfigError("NATS user and password go together: give both or neither")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("a TLS client certificate needs its key (and the key its certificate)")
        for what, path in (
            ("nkey seed", self.nkey_seed),
            ("creds file", self.creds),
            ("TLS CA", self.tls_ca),
            ("TLS certificate", self.tls_cert),
            ("TLS key", self.tls_key),
        ):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"the {what} {path!r} does not exist or is not a file")
        if self.inbox_prefix is not None and not _INBOX_PREFIX.fullmatch(self.inbox_prefix):
            raise ConfigError(
                f"inbox prefix {self.inbox_prefix!r}: subject tokens of letters, digits, '_' and '-' "
                "separated by dots, no wildcards (like _INBOX_worker)"
            )


def _inbox_denied(exc: BaseException, prefix: str) -> bool:
    text = str(exc).lower()
    return "permissions violation for subscription" in text and f'"{prefix.lower()}.' in text


def _refused(exc: BaseException) -> bool:
    """The server turned us away (credentials, or a TLS handshake it or we rejected): retrying
    will not help, unlike a server that is not up yet."""
    if isinstance(exc, ssl.SSLError):
        return True
    text = str(exc).lower()
    return "authori" in text or "authenticat" in text


async def open_nats(
    servers: str | Sequence[str],
    *,
    name: str = "meshflow",
    auth: NatsAuth | None = None,
    wait: float = CONNECT_WAIT,
    on_closed: Callable[[str], Awaitable[None]] | None = None,
) -> NatsClient:
    """Connect to NATS; once connected, reconnect forever when the server restarts.

    A server that is not up yet is retried for ``wait`` seconds; refused credentials fail at once.
    A connection that closes for good anyway (the server refused something for which nats-py does
    not reconnect) calls ``on_closed`` with the reason, unless it was closed on purpose.
    """
    urls = [servers] if isinstance(servers, str) else list(servers)
    for url in urls:
        check_url(url)
    options = (auth or NatsAuth()).options()
    errors: list[BaseException] = []
    connected = False

    refusal = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if connected and _inbox_denied(exc, options.get("inbox_prefix", "_INBOX")):
            log.error(
                "this NATS user may not subscribe to its reply inbox, so no request gets an answer; "
                "give the inbox prefix its permissions allow (--nats-inbox-prefix, "
                "MESHFLOW_NATS_INBOX_PREFIX; deploy/nats/accounts.conf uses _INBOX_worker and "
                "_INBOX_dashboard)",
                error=str(exc),
            )
        elif connected:
            log.warning("nats error", error=repr(exc))
        else:
            errors.append(exc)
            if _refused(exc):
                refusal.set()

    async def closed() -> None:
        nc = client[0] if client else None
        if (
            connected
            and on_closed is not None
            and nc is not None
            and not getattr(nc, "_meshflow_closing", False)
        ):
            await on_closed(repr(nc.last_error) if nc.last_error else "closed by the server")

    client: list[NatsClient] = []

    async def attempt() -> NatsClient:
        connecting = asyncio.ensure_future(
            nats.connect(
                servers=urls,
                name=name,
                max_reconnect_attempts=1,  # the initial attempts; forever once connected (below)
                reconnect_time_wait=0.25,
                connect_timeout=5,
                allow_reconnect=True,
                error_cb=on_error,
                closed_cb=closed,
                **options,
            )
        )
        refused = asyncio.ensure_future(refusal.wait())
        # nats-py 2.16 never returns from connect() when we reject the server's certificate
        # (it reports the error, then hangs): a refusal reported to on_error ends the attempt.
        await asyncio.wait((connecting, refused), return_when=asyncio.FIRST_COMPLETED)
        refused.cancel()
        if connecting.done():
            return connecting.result()
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, *NATS_ERRORS):
            await connecting
        raise nats.errors.NoServersError

    nc = await _retried(attempt, errors, urls, wait)
    connected = True
    client.append(nc)
    nc.options["max_reconnect_attempts"] = -1
    return nc


async def _retried(
    attempt: Callable[[], Awaitable[NatsClient]], errors: list[BaseException], urls: list[str], wait: float
) -> NatsClient:
    """``attempt()`` again until it connects; after ``wait`` seconds (or at once, when the server
    refused us) `NatsError` says why, and after a couple of seconds the log says so already."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    told = False
    while True:
        try:
            return await attempt()
        except NATS_ERRORS as exc:
            refused = next((e for e in errors if _refused(e)), None)
            # what the server said (or the socket) beats nats-py's summary ("NoServersError")
            cause = refused or (errors[-1] if errors else exc)
            why = f"cannot connect to NATS at {', '.join(urls)}: {explain(cause)}"
            if refused is not None or loop.time() >= started + wait:
                raise NatsError(why) from cause
            if not told and loop.time() >= started + _TELL_AFTER:
                log.warning(f"{why}; still trying for {wait - _TELL_AFTER:.0f} s")
                told = True
            await asyncio.sleep(0.5)


#: A process waiting for a server that is not up says so after this many seconds.
_TELL_AFTER = 2.0
_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


def check_url(url: str) -> None:
    """`ConfigError` for a URL that is not a NATS server's (``nats://host:4222``)."""
    scheme, sep, _ = url.partition("://")
    if sep and f"{scheme.lower()}://" not in _SCHEMES:
        hint = (
            " (http is the server's monitoring port, not its client port)"
            if scheme.startswith("http")
            else ""
        )
        raise ConfigError(
            f"NATS URL {url!r}: use nats://host:4222 (or tls://, ws://, wss://), not {scheme}://{hint}"
        )


def explain(exc: BaseException) -> str:
    """What a failed connection attempt means, in words, with the error itself."""
    if isinstance(exc, ConnectionRefusedError) or "connect call failed" in str(exc).lower():
        return f"nothing is listening there (is the nats-server running? `meshflow dev` starts one): {exc}"
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve: {exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"no answer within the connect timeout: {exc!r}"
    return repr(exc)


async def close_nats(nc: NatsClient) -> None:
    """Flush what is buffered (for up to 5 s) and close the connection, on purpose."""
    nc._meshflow_closing = True  # type: ignore[attr-defined]
    with contextlib.suppress(*NATS_ERRORS):
        await nc.flush(timeout=5)
    with contextlib.suppress(*NATS_ERRORS):
        await nc.close()


async def syncs_every_write(nc: NatsClient, monitor: str | None = None) -> bool | None:
    """Whether the server fsyncs every write (``jetstream { sync_interval: always }``): asked of
    its monitoring endpoint (``monitor``, like ``http://host:8222``) or, failing that, of the system
    account; None when neither answers."""
    varz: dict[str, Any] | None = None
    if monitor:
        url = monitor.rstrip("/") + "/varz"
        try:
            raw = await asyncio.to_thread(_fetch, url)
            varz = msgspec.json.decode(raw)
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            log.warning("could not read the server's monitoring endpoint", url=url, error=repr(exc))
    if varz is None:
        try:
            reply = await nc.request("$SYS.REQ.SERVER.PING.VARZ", b"", timeout=1)
            varz = msgspec.json.decode(reply.data).get("data")
        except _VARZ_ERRORS:
            varz = None
    if not isinstance(varz, dict):
        return None
    config = (varz.get("jetstream") or {}).get("config") or {}
    return bool(config.get("sync_always", False))


async def check_durability(nc: NatsClient, monitor: str | None = None) -> None:
    """Warn, once, when the server can lose acknowledged writes on a crash (DESIGN §5)."""
    syncs = await syncs_every_write(nc, monitor)
    if syncs is False:
        log.warning(
            "the NATS server does not sync every write to disk: an OS crash or power loss can lose "
            "acknowledged events and step results. Set `jetstream { sync_interval: always }` in its "
            "config (docs/deploy.md)"
        )
    elif syncs is None:
        log.info(
            "could not tell whether the NATS server syncs every write (give --nats-monitor); "
            "production servers should set `jetstream { sync_interval: always }`"
        )


_VARZ_ERRORS: tuple[type[BaseException], ...] = (*NATS_ERRORS, msgspec.DecodeError, AttributeError)


def _fetch(url: str) -> bytes:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - scheme checked above
        data: bytes = response.read()
        return data
