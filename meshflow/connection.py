"""How meshflow authenticates to NATS: user and password, token, nkey seed, ``.creds`` file, TLS.

Every process (worker, client, dashboard, CLI) takes the same `NatsAuth`; the CLI fills it from
``--nats-*`` flags or ``MESHFLOW_NATS_*`` environment variables (`NatsAuth.from_env`). Files are
checked when the options are built, so a wrong path is a clear error, not a failed handshake.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

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
