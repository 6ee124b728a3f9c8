"""Connecting with credentials: user and password, token; bad settings are clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import meshflow
from meshflow.server import EmbeddedServer


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A nats-server that only lets user "svc" with password "pw" in."""
    config = 'authorization { user: "svc", password: "pw" }'
    server = EmbeddedServer(tmp_path_factory.mktemp("locked"), extra_config=config).start()
    yield server
    server.stop()


async def test_a_worker_and_a_client_sign_in_with_user_and_password(locked: EmbeddedServer) -> None:
    auth = meshflow.NatsAuth(user="svc", password="pw")
    app = meshflow.App("signed")

    @app.function("hello", trigger="signed/hello")
    async def hello(ctx: meshflow.Context) -> str:
        return "hi"

    async with (
        meshflow.Worker(app, nats=locked.url, auth=auth),
        meshflow.connect(locked.url, auth=auth) as client,
    ):
        event = meshflow.Event(name="signed/hello")
        await client.send(event)
        run = await client.wait_for_run(hello.run_id_for(event))
    assert run.output == "hi"


async def test_wrong_or_missing_credentials_are_refused_clearly(locked: EmbeddedServer) -> None:
    for auth in (None, meshflow.NatsAuth(user="svc", password="nope")):
        with pytest.raises(meshflow.NatsError, match="cannot connect to NATS"):
            await meshflow.connect(locked.url, auth=auth)


async def test_a_token(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path, extra_config='authorization { token: "s3cret" }') as server:
        async with meshflow.connect(server.url, auth=meshflow.NatsAuth(token="s3cret")) as client:
            assert await client.functions() == []


def test_bad_auth_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(meshflow.ConfigError, match="user and password go together"):
        meshflow.NatsAuth(user="svc").options()
    with pytest.raises(meshflow.ConfigError, match="creds file"):
        meshflow.NatsAuth(creds=str(tmp_path / "missing.creds")).options()
    with pytest.raises(meshflow.ConfigError, match="needs its key"):
        meshflow.NatsAuth(tls_cert=str(tmp_path)).options()
    for prefix in ("_INBOX.>", "_INBOX.*", "my inbox", "", "a..b"):
        with pytest.raises(meshflow.ConfigError, match="inbox prefix"):
            meshflow.NatsAuth(inbox_prefix=prefix).options()
    assert meshflow.NatsAuth(inbox_prefix="_INBOX_worker").options() == {"inbox_prefix": "_INBOX_worker"}
    env = {"MESHFLOW_NATS_USER": "u", "MESHFLOW_NATS_PASSWORD": "p", "MESHFLOW_NATS_NKEY": "/k"}
    env["MESHFLOW_NATS_INBOX_PREFIX"] = "_INBOX_w"
    expected = meshflow.NatsAuth(user="u", password="p", nkey_seed="/k", inbox_prefix="_INBOX_w")
    assert meshflow.NatsAuth.from_env(env) == expected
