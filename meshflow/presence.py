"""A worker's entry in the registry (``mf_registry``, ``worker.{id}``), for the dashboard and the
CLI: written as the worker starts, written again every ``ANNOUNCE_EVERY`` seconds while it runs,
dropped as it stops. An entry expires ``ANNOUNCE_TTL_S`` seconds after its last write, so a
worker that died leaves the list on its own.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable

import structlog

from .durations import now_ms
from .errors import MeshflowError
from .store import Store, WorkerInfo

log = structlog.get_logger("meshflow.worker")

ANNOUNCE_EVERY = 10.0
ANNOUNCE_TTL_S = 30


class Presence:
    """Keeps worker ``worker_id``, serving ``functions`` since ``started_at``, in the registry."""

    def __init__(self, store: Store, worker_id: str, functions: Iterable[str], started_at: int) -> None:
        self.store = store
        self.worker_id = worker_id
        self.functions = sorted(functions)
        self.started_at = started_at

    async def announce(self) -> None:
        info = WorkerInfo(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            functions=self.functions,
            started_at=self.started_at,
            seen_at=now_ms(),
        )
        await self.store.put_worker(info, ttl_s=ANNOUNCE_TTL_S)

    async def loop(self, stopping: asyncio.Event) -> None:
        """Announce again every ``ANNOUNCE_EVERY`` seconds until ``stopping`` is set."""
        while not stopping.is_set():
            await asyncio.sleep(ANNOUNCE_EVERY)
            try:
                await self.announce()
            except MeshflowError as exc:
                log.warning("could not announce the worker", error=str(exc))
