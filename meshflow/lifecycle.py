"""Around a run's passes: how a new run is armed, how runs link up, how an ended run is tidied.

- A new run (from an event, a cron tick) may first need its idempotency key claimed (24 h, in the
  flow bucket); then its timers are armed (a delayed start for an event with a future ``ts``,
  start and finish timeouts) and its ``cancel_on`` waiters registered.
- ``invoke``: the parent's worker creates the child run (queued, its id derived from the parent
  and step, so a re-executed pass finds the same child) and starts it; the child's end commits the
  parent's step memo (first writer wins against the invoke's timeout) and wakes the parent.
- A run's start and finish timeouts cancel it when they fire (`timed_out`).

The pass executor (``meshflow.passes``) decides when; this module knows what to write. (What a
pass tidies when a run ends is decided in ``meshflow.settle``.)
"""

from __future__ import annotations

import datetime as dt

import msgspec
import structlog

from . import tracing
from .bus import Bus, RunMessage
from .control import request_cancel
from .durations import format_duration, now_ms
from .events import Event
from .expressions import ExpressionError, match_key
from .functions import Function
from .names import EVENT_FUNCTION_INVOKED, Names, invoke_wake_id, invoked_event_id, start_message_id
from .router import Router
from .runs import (
    NULL,
    ErrorInfo,
    ParentRef,
    Pending,
    RunRecord,
    RunStatus,
    StepKind,
    StepMemo,
    StepStatus,
)
from .store import Store

log = structlog.get_logger("meshflow.worker")

_IDEMPOTENCY_TTL_S = 24 * 3600


class Lifecycle:
    """What a worker writes around a run's passes, for the functions it serves."""

    def __init__(self, store: Store, bus: Bus, router: Router, functions: dict[str, Function]) -> None:
        self.store = store
        self.bus = bus
        self.router = router
        self.names: Names = bus.names
        self.functions = functions

    async def claim_key(self, fn: Function, event: Event, run_id: str) -> bool:
        """Idempotency: whether this run may start, its key (if any) unclaimed in the last 24 h."""
        assert fn.idempotency is not None
        try:
            value = fn.idempotency.evaluate({"event": msgspec.to_builtins(event)})
        except ExpressionError as exc:
            log.warning("idempotency key not computed; the run starts", function=fn.full_id, error=str(exc))
            return True
        if value is None or value == "":
            return True
        key = self.names.idempotency_key(fn.full_id, match_key(value))
        holder = await self.store.claim(key, run_id, _IDEMPOTENCY_TTL_S)
        if holder != run_id:
            log.info(
                "event skipped: idempotency key in use", function=fn.full_id, event_id=event.id, run_id=holder
            )
        return holder == run_id

    async def timed_out(self, record: RunRecord, key: str) -> None:
        """A run's start or finish timeout fired: cancel it, unless it started in time (a start
        timeout) or its function no longer has that timeout."""
        fn = self.functions[record.function]
        if key == "timeout" and fn.finish_timeout_ms is not None:
            reason = f"timed out: not finished within {_ms_text(fn.finish_timeout_ms)}"
        elif key == "start-timeout" and record.status is RunStatus.QUEUED and fn.start_timeout_ms is not None:
            reason = f"timed out: not started within {_ms_text(fn.start_timeout_ms)}"
        else:
            return
        await request_cancel(self.store, self.bus, record.id, reason)

    async def arm(self, fn: Function, record: RunRecord, *, starting: bool = False) -> bool:
        """A new run's timers (delayed start, timeouts) and cancel_on waiters; True if cancelled.

        ``starting``: armed only as its first pass begins (a run another process created: an
        invoked child, a replay), so no start timeout.
        """
        if record.status is RunStatus.QUEUED and not starting:
            if record.not_before:
                await self.bus.schedule(fn, record.id, "start", record.not_before)
            if fn.start_timeout_ms is not None:
                await self.bus.schedule(
                    fn, record.id, "start-timeout", record.created_at + fn.start_timeout_ms
                )
        if fn.finish_timeout_ms is not None:
            await self.bus.schedule(fn, record.id, "timeout", record.created_at + fn.finish_timeout_ms)
        if fn.cancel_on:
            reason = await self.router.open_cancels(fn, record)
            if reason is not None:
                await request_cancel(self.store, self.bus, record.id, reason)
                return True
        return False

    async def start_child(self, record: RunRecord, item: Pending) -> StepMemo | None:
        """Create an ``invoke`` step's child run and have it started; a failed memo if it cannot be."""
        spec = item.invoke
        assert spec is not None
        now = now_ms()
        local = self.functions.get(spec.function)
        info = None if local is not None else await self.store.get_function(spec.function)
        if local is None and info is None:
            error = ErrorInfo(
                type="FunctionNotFoundError",
                message=f"no worker has registered function {spec.function!r} in namespace "
                f"{self.names.ns!r}; invoke takes a Function or its full id '{{app}}-{{fn}}'",
                retriable=False,
            )
            failed = StepMemo(
                id=item.step_id,
                hash=item.key,
                kind=StepKind.INVOKE,
                status=StepStatus.FAILED,
                error=error,
                started_at=item.since,
                ended_at=now,
                child=spec.run_id,
            )
            return await self.store.commit_memo(record.id, failed)
        app, fn_id = (local.app_id, local.id) if local is not None else (info.app, info.id)  # type: ignore[union-attr]
        child = RunRecord(
            id=spec.run_id,
            app=app,
            function=spec.function,
            fn=fn_id,
            status=RunStatus.QUEUED,
            events=[
                Event(
                    name=EVENT_FUNCTION_INVOKED,
                    id=invoked_event_id(record.id, item.key),
                    data=spec.data,
                    ts=now,
                )
            ],
            created_at=now,
            updated_at=now,
            parent=ParentRef(
                run_id=record.id, app=record.app, fn=record.fn, key=item.key, step_id=item.step_id
            ),
            trace=tracing.here(record.trace),  # the parent's pass
        )
        if local is not None:  # armed here, start timeout included; otherwise by its first worker
            child = msgspec.structs.replace(child, armed=True)
        if await self.store.create_run(child) is not None and local is not None:
            await self.arm(local, child)
        start = RunMessage(run_id=child.id, reason="start")
        await self.bus.publish_run(app, fn_id, start, msg_id=start_message_id(child.id))
        return None

    async def notify_parent(self, run: RunRecord) -> None:
        """Resolve the parent's ``invoke`` step with this run's output or error, and wake it."""
        parent = run.parent
        assert parent is not None
        ok = run.status is RunStatus.COMPLETED
        memo = StepMemo(
            id=parent.step_id,
            hash=parent.key,
            kind=StepKind.INVOKE,
            status=StepStatus.COMPLETED if ok else StepStatus.FAILED,
            output=run.output if ok else NULL,
            error=None
            if ok
            else (run.error or ErrorInfo(type="Cancelled", message=f"run {run.id} was {run.status}")),
            started_at=run.created_at,
            ended_at=run.ended_at or now_ms(),
            child=run.id,
        )
        await self.store.commit_memo(parent.run_id, memo)
        wake = RunMessage(run_id=parent.run_id, reason="invoke", key=parent.key)
        await self.bus.publish_run(
            parent.app, parent.fn, wake, msg_id=invoke_wake_id(parent.run_id, parent.key)
        )


def _ms_text(ms: int) -> str:
    return format_duration(dt.timedelta(milliseconds=ms))
