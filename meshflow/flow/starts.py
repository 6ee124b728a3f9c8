"""Whether, and when, an event's run starts: rate limit, singleton, throttle (their KV side).

Each decision reads the control's state in the ``{ns}_flow`` bucket, decides (the pure modules
beside this one), and writes the new state by compare-and-set, retrying on a conflict, so any
number of workers share one limit. States carry a TTL, so idle keys vanish on their own.

A worker that dies between deciding and creating the run may count that event twice when it is
redelivered (a rate limit then skips, or a throttle delays, one run too many); it never lets a
run through that the limit forbids.
"""

from __future__ import annotations

import msgspec
import structlog

from ..durations import now_ms
from ..errors import ExpressionError, NatsError
from ..events import Event
from ..expressions import Expression, match_key
from ..functions import Function
from ..store import Store
from . import ratelimit, throttle

log = structlog.get_logger("meshflow.flow")

_ATTEMPTS = 50
#: A singleton key outlives its run by at most this (a run longer than that loses its claim).
_SINGLETON_TTL_S = 7 * 24 * 3600


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """What becomes of an event's run: start now, start later, or skip it (and why)."""

    start_at: int = 0  # epoch ms; 0: now
    skip: str | None = None
    replaces: str | None = None  # singleton "cancel": the run this one replaces


def key_token(expr: Expression | None, event: Event) -> str:
    """The flow key of an event: a hash of its key expression's value ("_" when there is none)."""
    if expr is None:
        return "_"
    try:
        value = expr.evaluate({"event": msgspec.to_builtins(event)})
    except ExpressionError as exc:
        log.warning("flow key not computed; the function-wide limit applies", key=expr.source, error=str(exc))
        return "_"
    return match_key(value)


class Starts:
    """The start-time flow controls of the functions a worker serves."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def admit(self, fn: Function, event: Event, run_id: str) -> Admission:
        flow = fn.flow
        if flow.rate_limit is not None:
            reason = await self._rate_limit(fn, event)
            if reason is not None:
                return Admission(skip=reason)
        replaces = None
        if flow.singleton is not None:
            holder = await self._singleton(fn, event, run_id)
            if holder is not None:
                if flow.singleton[1] == "skip":
                    return Admission(skip=f"singleton: run {holder} of this key is still running")
                replaces = holder
        start_at = 0
        if flow.throttle is not None:
            start_at = await self._throttle(fn, event)
        return Admission(start_at=start_at, replaces=replaces)

    async def _rate_limit(self, fn: Function, event: Event) -> str | None:
        spec = fn.flow.rate_limit
        assert spec is not None
        key = f"rl.{fn.full_id}.{key_token(spec.key, event)}"
        ttl = spec.period_ms // 1000 + 60
        for _ in range(_ATTEMPTS):
            got = await self.store.get_flow(key)
            starts = msgspec.json.decode(got[0], type=list[int]) if got and got[0] else []
            allowed, log_ = ratelimit.decide(starts, now_ms(), period_ms=spec.period_ms, limit=spec.limit)
            if not allowed:
                return f"rate limit: {spec.limit} per {spec.period_ms} ms reached"
            if await self.store.put_flow(key, msgspec.json.encode(log_), got[1] if got else 0, ttl):
                return None
        raise NatsError(f"rate limit state {key} kept changing")

    async def _throttle(self, fn: Function, event: Event) -> int:
        spec = fn.flow.throttle
        assert spec is not None
        key = f"th.{fn.full_id}.{key_token(spec.key, event)}"
        for _ in range(_ATTEMPTS):
            got = await self.store.get_flow(key)
            tat = int(got[0]) if got and got[0] else 0
            now = now_ms()
            decision = throttle.decide(tat, now, period_ms=spec.period_ms, limit=spec.limit, burst=spec.burst)
            ttl = (decision.tat - now) // 1000 + spec.period_ms // 1000 + 60
            if await self.store.put_flow(key, str(decision.tat).encode(), got[1] if got else 0, ttl):
                return decision.start_at if decision.start_at > now else 0
        raise NatsError(f"throttle state {key} kept changing")

    async def _singleton(self, fn: Function, event: Event, run_id: str) -> str | None:
        """Take the key for ``run_id``; the id of an unfinished run that holds it, if any."""
        assert fn.flow.singleton is not None
        key = f"sg.{fn.full_id}.{key_token(fn.flow.singleton[0], event)}"
        for _ in range(_ATTEMPTS):
            got = await self.store.get_flow(key)
            holder = got[0].decode() if got and got[0] else None
            if holder == run_id:
                return None  # ours already (a redelivered event)
            live = None
            if holder is not None:
                found = await self.store.get_run(holder)
                if found is not None and not found[0].status.terminal:
                    if fn.flow.singleton[1] == "skip":
                        return holder
                    live = holder  # "cancel": take the key; the caller cancels the holder
            if await self.store.put_flow(key, run_id.encode(), got[1] if got else 0, _SINGLETON_TTL_S):
                return live
        raise NatsError(f"singleton state {key} kept changing")
