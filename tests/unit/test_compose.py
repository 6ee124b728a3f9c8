"""compose.yaml is valid as far as we can tell without Docker: its services, volumes and files,
the environment every node's config needs, and meshflow commands the CLI accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshflow.cli import _parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def config_variables() -> set[str]:
    """Every $VARIABLE the node config (and what it includes) reads from the environment."""
    text = "".join((ROOT / "deploy/nats" / f).read_text() for f in ("node.conf", "accounts.conf"))
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # comments name them too
    text = re.sub(r'"[^"]*"', "", text)  # quoted subjects like "$JS.API.>" are not variables
    return set(re.findall(r"\$([A-Z][A-Z0-9_]*)", text))


def test_it_has_three_nats_nodes_workers_the_dashboard_and_their_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"n1", "n2", "n3", "provision", "worker", "dashboard"} <= set(services)
    for node in ("n1", "n2", "n3"):
        assert services[node]["image"].startswith("nats:")
        assert f"{node}-data:/data" in services[node]["volumes"]
        assert f"{node}-data" in compose["volumes"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8288:8288"]  # never on all interfaces


def test_every_referenced_file_exists(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), source
        command = service.get("command", [])
        if "-c" in command:
            config = command[command.index("-c") + 1]
            assert config.startswith("/etc/nats/")
            assert (ROOT / "deploy/nats" / config.removeprefix("/etc/nats/")).is_file()


def test_every_node_sets_every_variable_its_config_reads(compose: dict[str, Any]) -> None:
    needed = config_variables()
    assert {"NATS_NAME", "NATS_STORE", "NATS_WORKER_PASSWORD"} <= needed
    for node in ("n1", "n2", "n3"):
        env = compose["services"][node]["environment"]
        assert needed <= set(env), needed - set(env)
        assert env["NATS_NAME"] == node


def test_meshflow_services_run_commands_the_cli_accepts(compose: dict[str, Any]) -> None:
    parser = _parser()
    for name in ("provision", "worker", "dashboard"):
        service = compose["services"][name]
        args = parser.parse_args(service["command"])
        assert args.command == service["command"][0]
        assert service["environment"]["MESHFLOW_NATS"].count("nats://") == 3
    users = {
        compose["services"][n]["environment"]["MESHFLOW_NATS_USER"]
        for n in ("provision", "worker", "dashboard")
    }
    assert users == {"admin", "worker", "dashboard"}  # each with its own least-privilege identity


def test_workers_can_check_that_the_servers_sync_every_write(compose: dict[str, Any]) -> None:
    node_conf = (ROOT / "deploy/nats/node.conf").read_text()
    assert re.search(r"^\s*sync_interval:\s*always", node_conf, re.MULTILINE)
    monitor = compose["services"]["worker"]["environment"]["MESHFLOW_NATS_MONITOR"]
    host, port = monitor.removeprefix("http://").split(":")
    assert host in compose["services"]
    assert compose["x-nats-env"]["NATS_HTTP"].endswith(f":{port}")


def test_each_identity_uses_the_reply_inboxes_its_permissions_allow(compose: dict[str, Any]) -> None:
    accounts = (ROOT / "deploy/nats/accounts.conf").read_text()
    for name in ("worker", "dashboard"):
        prefix = compose["services"][name]["environment"]["MESHFLOW_NATS_INBOX_PREFIX"]
        assert f'"{prefix}.>"' in accounts
    assert '"_INBOX.>"' not in accounts.split("PUBLISHERS {")[0]  # nobody in MESHFLOW hears all replies
