"""Control of runs from outside: cancellation requests (by the API, an event, a timeout).

Cancelling a run is a request written into its record (``RunRecord.cancel``, by compare-and-set),
then two nudges:

- a core NATS message on ``{ns}.cancel.{run_id}``: the worker advancing the run right now stops it
  before its next step (a step already running finishes, and its result is kept);
- an "advance run" message: a queued, sleeping or waiting run is advanced at once, finds the
  request and ends ``cancelled``.

The record is what makes it reliable: a pass reads it when it starts, and a worker whose write
conflicts with the request reads it then. Whoever ends the run cleans up its timers and waits and
emits ``meshflow/function.cancelled``.

Cancel and replay write run records. An identity that may only read state (the dashboard's) asks
a worker to do it instead: a request on ``{ns}.ctl.cancel`` or ``{ns}.ctl.replay``, served by every
worker in one queue group (`serve`), answered with the outcome (`ask`). Nobody is left guessing:
without a worker the request gets "no responders" at once, and the caller an error saying so.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import nats.errors
import structlog

from . import tracing
from .bus import Bus, Notice, RunMessage
from .durations import now_ms
from .errors import MeshflowError, NatsError, RunNotFoundError
from .ids import new_ulid
from .names import cancel_message_id, start_message_id
from .requests import NATS_ERRORS
from .runs import CancelInfo, new_run
from .store import RunConflict, Store

log = structlog.get_logger("meshflow.control")

_ATTEMPTS = 20
_ASK_TIMEOUT = 15.0  # a cancel retries conflicting writes; a replay is two writes
Operation = Literal["cancel", "replay"]


class _Request(msgspec.Struct, kw_only=True, frozen=True):
    run_id: str
    reason: str = ""


class _Reply(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    cancelled: bool = False  # cancel: False when the run had already ended
    run_id: str = ""  # replay: the new run
    not_found: str = ""  # the error, when the run does not exist
    error: str = ""  # any other error


async def request_cancel(store: Store, bus: Bus, run_id: str, reason: str) -> bool:
    """Ask run ``run_id`` to stop. False if it had already ended; `RunNotFoundError` if unknown."""
    for _ in range(_ATTEMPTS):
        got = await store.get_run(run_id)
        if got is None:
            raise RunNotFoundError(f"run {run_id} does not exist")
        record, rev = got
        if record.status.terminal:
            return False
        if record.cancel is None:
            asked = msgspec.structs.replace(record, cancel=CancelInfo(reason=reason, at=now_ms()))
            try:
                await store.update_run(asked, rev, was=record.status)
            except RunConflict:
                continue  # the run moved on meanwhile: look again
        try:
            await bus.nc.publish(bus.names.cancel_subject(run_id), b"")
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot signal the cancellation of run {run_id}: {exc!r}") from exc
        wake = RunMessage(run_id=run_id, reason="cancel")
        await bus.publish_run(record.app, record.fn, wake, msg_id=cancel_message_id(run_id))
        return True
    raise NatsError(f"run {run_id}: could not record the cancellation after {_ATTEMPTS} conflicting updates")


async def replay_run(store: Store, bus: Bus, run_id: str) -> str:
    """Start a new run of ``run_id``'s function with its event(s); the new run's id."""
    got = await store.get_run(run_id)
    if got is None:
        raise RunNotFoundError(f"run {run_id} does not exist")
    original = got[0]
    now = now_ms()
    replay_id = new_ulid(now)
    replay = new_run(
        replay_id,
        app=original.app,
        fn=original.fn,
        events=original.events,
        now=now,
        seq=original.seq,
        replay_of=original.id,
        trace=tracing.for_new_run(original.function, replay_id, None),  # a trace of its own
    )
    await store.create_run(replay)
    start = RunMessage(run_id=replay.id, reason="start")
    await bus.publish_run(replay.app, replay.fn, start, msg_id=start_message_id(replay.id))
    return replay.id


async def serve(store: Store, bus: Bus, request: Notice) -> None:
    """Carry out one control request (a worker listens on the control subjects) and answer it."""
    operation = request.subject.rpartition(".")[2]
    try:
        asked = msgspec.json.decode(request.data, type=_Request)
        if operation == "cancel":
            reply = _Reply(cancelled=await request_cancel(store, bus, asked.run_id, asked.reason))
        elif operation == "replay":
            reply = _Reply(run_id=await replay_run(store, bus, asked.run_id))
        else:
            reply = _Reply(error=f"unknown control operation {operation!r}")
    except RunNotFoundError as exc:
        reply = _Reply(not_found=str(exc))
    except (MeshflowError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        reply = _Reply(error=str(exc))
    except Exception as exc:  # a service boundary: the caller gets an answer, the log the trace
        log.exception("control request failed", operation=operation)
        reply = _Reply(error=f"the worker failed: {exc!r}")
    log.info("control request served", operation=operation, error=reply.error or reply.not_found or None)
    if request.wants_reply:
        try:
            await request.respond(msgspec.json.encode(reply))
        except NatsError as exc:
            log.warning("could not answer a control request", operation=operation, error=str(exc))


async def ask(bus: Bus, operation: Operation, run_id: str, reason: str = "") -> _Reply:
    """Have a worker carry out ``operation`` on ``run_id``; its outcome.

    Raises:
        RunNotFoundError: no such run.
        NatsError: no worker answered, or the worker could not do it.
    """
    data = msgspec.json.encode(_Request(run_id=run_id, reason=reason))
    try:
        msg = await bus.nc.request(bus.names.control_subject(operation), data, timeout=_ASK_TIMEOUT)
    except nats.errors.NoRespondersError:
        raise NatsError(
            f"cannot {operation} run {run_id}: no worker is running to do it (this client may not "
            "write run state, so a worker carries out cancel and replay)"
        ) from None
    except NATS_ERRORS as exc:
        raise NatsError(f"cannot {operation} run {run_id}: no answer from a worker: {exc!r}") from exc
    reply = msgspec.json.decode(msg.data, type=_Reply)
    if reply.not_found:
        raise RunNotFoundError(reply.not_found)
    if reply.error:
        raise NatsError(f"cannot {operation} run {run_id}: {reply.error}")
    return reply
