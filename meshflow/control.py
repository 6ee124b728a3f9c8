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
"""

from __future__ import annotations

import msgspec

from .bus import NATS_ERRORS, Bus, RunMessage
from .durations import now_ms
from .errors import NatsError, RunNotFoundError
from .runs import CancelInfo
from .store import RunConflict, Store

_ATTEMPTS = 20


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
                await store.update_run(asked, rev)
            except RunConflict:
                continue  # the run moved on meanwhile: look again
        try:
            await bus.nc.publish(bus.names.cancel_subject(run_id), b"")
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot signal the cancellation of run {run_id}: {exc!r}") from exc
        wake = RunMessage(run_id=run_id, reason="cancel")
        await bus.publish_run(record.app, record.fn, wake, msg_id=f"{run_id}:cancel")
        return True
    raise NatsError(f"run {run_id}: could not record the cancellation after {_ATTEMPTS} conflicting updates")
