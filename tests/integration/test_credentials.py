"""Connecting with an nkey seed, a ``.creds`` file (operator mode) and TLS client certificates.

Each mode gets a real nats-server that lets in only that kind of identity. A worker and a client
signed in that way run a function end to end; an identity the server does not know is refused with
`meshflow.NatsError`.

The ``.creds`` test needs an operator, an account and a user, which the ``nsc`` tool would make.
The test signs their JWTs itself (`_jwt`), the way the NATS jwt v2 library does. An operator-mode
server only starts JetStream when it has a system account, so the operator JWT names one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]
import pytest
import trustme

import meshflow
from meshflow.server import EmbeddedServer


@dataclass(frozen=True)
class Locked:
    """A nats-server that only lets one kind of identity in, and the auth of one it lets in."""

    server: EmbeddedServer
    auth: meshflow.NatsAuth


async def run_hello(url: str, auth: meshflow.NatsAuth, app_name: str) -> Any:
    """Run a function end to end: a worker and a client both signed in with ``auth``."""
    app = meshflow.App(app_name)

    @app.function("hello", trigger=f"{app_name}/hello")
    async def hello(ctx: meshflow.Context) -> str:
        return f"hi from {app_name}"

    async with (
        meshflow.Worker(app, nats=url, auth=auth),
        meshflow.connect(url, auth=auth) as client,
    ):
        event = meshflow.Event(name=f"{app_name}/hello")
        await client.send(event)
        run = await client.wait_for_run(hello.run_id_for(event))
    return run.output


def new_keypair(prefix: int) -> Any:
    """A fresh nkey pair of one role (``nkeys.PREFIX_BYTE_USER``, ``_ACCOUNT``, ``_OPERATOR``)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public(keypair: Any) -> str:
    return str(keypair.public_key.decode())


# nkey seed


@pytest.fixture(scope="module")
def nkey_locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    """A nats-server that only lets in the user with one nkey; the auth has its seed file."""
    tmp = tmp_path_factory.mktemp("nkey")
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    seed = tmp / "user.nk"
    seed.write_bytes(user.seed + b"\n")
    config = f'authorization {{ users = [ {{ nkey: "{public(user)}" }} ] }}'
    server = EmbeddedServer(tmp / "server", extra_config=config).start()
    yield Locked(server, meshflow.NatsAuth(nkey_seed=str(seed)))
    server.stop()


async def test_a_worker_and_a_client_sign_in_with_an_nkey_seed(nkey_locked: Locked) -> None:
    assert await run_hello(nkey_locked.server.url, nkey_locked.auth, "nkey") == "hi from nkey"


async def test_an_unknown_nkey_is_refused(nkey_locked: Locked, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(new_keypair(nkeys.PREFIX_BYTE_USER).seed)
    with pytest.raises(meshflow.NatsError, match="cannot connect to NATS"):
        await meshflow.connect(nkey_locked.server.url, auth=meshflow.NatsAuth(nkey_seed=str(stranger)))


# .creds file (decentralized JWT auth)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT about ``subject``, signed by the ``issuer`` key pair.

    Like the jwt v2 library: the ID (jti) is the base32 SHA-512/256 of the standard claims with an
    empty ID, and the signature (ed25519) covers ``header.payload``. The server does not check
    the ID; it does check the signature, the issuer and the ``nats`` claims.
    """
    claims: dict[str, Any] = {"jti": "", "iat": int(time.time()), "iss": public(issuer), "name": name}
    claims["sub"] = subject
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    claims["nats"] = nats
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = _b64url(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def _account_jwt(operator: Any, account: Any, name: str, *, jetstream: bool) -> str:
    nats: dict[str, Any] = {"type": "account", "version": 2}
    if jetstream:
        limits: dict[str, Any] = dict.fromkeys(
            ("subs", "data", "payload", "imports", "exports", "conn", "leaf"), -1
        )
        limits.update(dict.fromkeys(("mem_storage", "disk_storage", "streams", "consumer"), -1))
        nats["limits"] = limits | {"wildcards": True}
    return _jwt(operator, public(account), name, nats)


def creds_file(path: Path, account: Any, user: Any) -> Path:
    """Write a ``.creds`` file, as ``nsc`` does, for ``user`` in ``account``."""
    user_nats = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}
    user_jwt = _jwt(account, public(user), "meshflow", user_nats)
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )
    return path


@pytest.fixture(scope="module")
def operator_mode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    """A nats-server in operator mode that knows one account (with JetStream) and its system
    account; the auth has a ``.creds`` file of a user of that account."""
    tmp = tmp_path_factory.mktemp("creds")
    operator = new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    system = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_nats = {"system_account": public(system), "type": "operator", "version": 2}
    config = "\n".join(
        [
            f"operator: {_jwt(operator, public(operator), 'meshflow-test', operator_nats)}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f"  {public(system)}: {_account_jwt(operator, system, 'SYS', jetstream=False)}",
            f"  {public(account)}: {_account_jwt(operator, account, 'app', jetstream=True)}",
            "}",
        ]
    )
    creds = creds_file(tmp / "user.creds", account, new_keypair(nkeys.PREFIX_BYTE_USER))
    server = EmbeddedServer(tmp / "server", extra_config=config).start()
    yield Locked(server, meshflow.NatsAuth(creds=str(creds)))
    server.stop()


async def test_a_worker_and_a_client_sign_in_with_a_creds_file(operator_mode: Locked) -> None:
    assert await run_hello(operator_mode.server.url, operator_mode.auth, "creds") == "hi from creds"


async def test_a_user_of_an_unknown_account_is_refused(operator_mode: Locked, tmp_path: Path) -> None:
    stranger = creds_file(
        tmp_path / "stranger.creds",
        new_keypair(nkeys.PREFIX_BYTE_ACCOUNT),
        new_keypair(nkeys.PREFIX_BYTE_USER),
    )
    with pytest.raises(meshflow.NatsError, match="cannot connect to NATS"):
        await meshflow.connect(operator_mode.server.url, auth=meshflow.NatsAuth(creds=str(stranger)))


# TLS with client certificates


@pytest.fixture(scope="module")
def mutual_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    """A nats-server that requires TLS and a client certificate signed by its CA; the auth has
    the CA and such a certificate."""
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_pem.write_to_path(str(tmp / "server-key.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    client_cert = ca.issue_cert("meshflow-client@example.com")
    client_cert.private_key_pem.write_to_path(str(tmp / "client-key.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp / "client.pem"))
    config = (
        f'tls {{ cert_file: "{tmp / "server.pem"}", key_file: "{tmp / "server-key.pem"}", '
        f'ca_file: "{tmp / "ca.pem"}", verify: true }}'
    )
    server = EmbeddedServer(tmp / "server", extra_config=config).start()
    auth = meshflow.NatsAuth(
        tls_ca=str(tmp / "ca.pem"), tls_cert=str(tmp / "client.pem"), tls_key=str(tmp / "client-key.pem")
    )
    yield Locked(server, auth)
    server.stop()


async def test_a_worker_and_a_client_sign_in_with_a_client_certificate(mutual_tls: Locked) -> None:
    assert await run_hello(mutual_tls.server.url, mutual_tls.auth, "tls") == "hi from tls"


async def test_a_client_without_a_certificate_is_refused_at_once_saying_why(mutual_tls: Locked) -> None:
    only_ca = meshflow.NatsAuth(tls_ca=mutual_tls.auth.tls_ca)
    started = time.monotonic()
    with pytest.raises(meshflow.NatsError, match=r"cannot connect to NATS.*(?i:certificate)"):
        await meshflow.connect(mutual_tls.server.url, auth=only_ca)
    # not taken for a server that is not up yet, which is retried for 30 s (connection.CONNECT_WAIT)
    assert time.monotonic() - started < 20


async def test_a_server_certificate_from_another_ca_is_refused(mutual_tls: Locked) -> None:
    stranger = trustme.CA()
    with stranger.cert_pem.tempfile() as ca:
        auth = meshflow.NatsAuth(
            tls_ca=ca, tls_cert=mutual_tls.auth.tls_cert, tls_key=mutual_tls.auth.tls_key
        )
        with pytest.raises(meshflow.NatsError, match=r"(?i:certificate verify failed)"):
            await meshflow.connect(mutual_tls.server.url, auth=auth)
