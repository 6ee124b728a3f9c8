"""Concurrency slots in the flow bucket (the KV side of ``flow.concurrency``).

One key per constraint and key value: ``cc.{fn}.{key}`` (``scope="fn"``) or
``cc.env.{expression}.{key}`` (``scope="env"``, shared by every function using that key
expression), holding the slot holders and their lease expiries, updated by compare-and-set.
"""

from __future__ import annotations

import hashlib
import secrets

import msgspec

from ..durations import now_ms
from ..errors import NatsError
from ..functions import Function
from ..runs import RunRecord
from ..store import Store
from . import concurrency
from .starts import key_token

_ATTEMPTS = 50
_holders = msgspec.json.Decoder(dict[str, int])


class Slots:
    def __init__(self, store: Store, lease_ms: int) -> None:
        self.store = store
        self.lease_ms = lease_ms

    def keys(self, fn: Function, record: RunRecord) -> list[tuple[str, int]]:
        """The slot keys a run of ``fn`` needs, with their limits."""
        event = record.events[0]
        out = []
        for spec in fn.flow.concurrency:
            token = key_token(spec.key, event)
            if spec.scope == "env" and spec.key is not None:
                expr = hashlib.sha1(spec.key.source.encode(), usedforsecurity=False).hexdigest()[:12]
                out.append((f"cc.env.{expr}.{token}", spec.limit))
            else:
                out.append((f"cc.{fn.full_id}.{token}", spec.limit))
        return out

    async def acquire(self, fn: Function, record: RunRecord) -> tuple[list[str], str] | None:
        """Take a slot under every constraint of ``fn`` for one pass of the run; the keys held and
        the holder's name, or None (holding nothing) when some constraint is full.

        Each pass holds its own slot (``{run_id}.{nonce}``), so a second pass of the same run that
        loses the run's lease releases only its own.
        """
        owner = f"{record.id}.{secrets.token_hex(4)}"
        held: list[str] = []
        for key, limit in self.keys(fn, record):
            if not await self._change(key, owner, limit):
                await self.release(held, owner)
                return None
            held.append(key)
        return held, owner

    async def renew(self, keys: list[str], owner: str) -> None:
        for key in keys:
            await self._change(key, owner, 2**31)

    async def release(self, keys: list[str], owner: str) -> None:
        for key in keys:
            for _ in range(_ATTEMPTS):
                got = await self.store.get_flow(key)
                if not got or not got[0]:
                    break
                holders = concurrency.release(_holders.decode(got[0]), owner, now_ms())
                if await self.store.put_flow(key, msgspec.json.encode(holders), got[1], self._ttl()):
                    break

    async def _change(self, key: str, run_id: str, limit: int) -> bool:
        for _ in range(_ATTEMPTS):
            got = await self.store.get_flow(key)
            holders = _holders.decode(got[0]) if got and got[0] else {}
            taken = concurrency.acquire(holders, run_id, now_ms(), limit=limit, lease_ms=self.lease_ms)
            if taken is None:
                return False
            if await self.store.put_flow(key, msgspec.json.encode(taken), got[1] if got else 0, self._ttl()):
                return True
        raise NatsError(f"concurrency state {key} kept changing")

    def _ttl(self) -> int:
        return self.lease_ms // 1000 + 60
