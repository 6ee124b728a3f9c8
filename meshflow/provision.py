"""The streams meshflow needs, created when missing and fitted to the deployment's replicas.

- ``{NS}_EVENTS``: every event sent, kept 7 days, read back by sequence and time (waits).
- ``{NS}_RUNS``: "advance run X" messages and the scheduled timers that produce them.
- ``{NS}_LOGS``: what runs log, a subject per run, kept ``log_retention`` (7 days by default),
  at most `RUN_LOG_CAP` records per run (the oldest go first; see ``meshflow.logs``).
- ``{NS}_INDEX`` and ``{NS}_LIVE``: the runs index (``meshflow.runindex``): append only, and the
  statuses of the runs that have not ended (one message per subject).

Idempotent and safe to race with other processes (``Store.provision`` calls it with the buckets).
Split out of ``bus`` (publishing, consuming, scheduling), whose connection it uses.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Sequence

import nats.js.errors
import structlog
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from .bus import Bus, through_elections
from .errors import NatsError
from .requests import NATS_ERRORS

EVENTS_MAX_AGE = dt.timedelta(days=7)
DUPLICATE_WINDOW = dt.timedelta(minutes=2)
#: How long a run's log records are kept unless the deployment says otherwise.
LOG_RETENTION = dt.timedelta(days=7)
#: The most log records the logs stream keeps of one run (its newest).
RUN_LOG_CAP = 10_000

log = structlog.get_logger("meshflow.nats")


async def ensure_streams(bus: Bus, *, replicas: int = 1, log_retention: dt.timedelta | None = None) -> None:
    """Create the events, runs and logs streams if missing. ``log_retention``, when given, is
    also applied to a logs stream that exists with another."""
    n = bus.names
    await _ensure_stream(
        bus,
        StreamConfig(
            name=n.events_stream,
            subjects=[n.events_subjects],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=EVENTS_MAX_AGE.total_seconds(),
            duplicate_window=DUPLICATE_WINDOW.total_seconds(),
            num_replicas=replicas,
            allow_direct=True,  # waits read events back by sequence and time
        ),
    )
    await _ensure_stream(
        bus,
        StreamConfig(
            name=n.runs_stream,
            subjects=n.run_subjects,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW.total_seconds(),
            allow_msg_schedules=True,
            allow_msg_ttl=True,
            num_replicas=replicas,
        ),
    )
    await _optional(
        _ensure_logs_stream(bus, replicas, log_retention),
        n.logs_stream,
        "the logs stream is missing and cannot be created: runs' logs are not kept",
    )
    await _optional(
        _ensure_index_streams(bus, replicas),
        n.index_stream,
        "the runs index is missing and cannot be created: filtered runs lists scan",
    )


async def _optional(ensure: Awaitable[None], stream: str, lost: str) -> None:
    """A stream a deployment made before it may lack, with an identity that may not add it:
    a warning saying what is ``lost`` without it, never a worker that does not start."""
    try:
        await ensure
    except NatsError as exc:
        fix = "meshflow worker APP --provision-only (as admin)"
        log.warning(lost, stream=stream, error=str(exc), fix=fix)


async def _ensure_logs_stream(bus: Bus, replicas: int, log_retention: dt.timedelta | None) -> None:
    n = bus.names
    await _ensure_stream(
        bus,
        StreamConfig(
            name=n.logs_stream,
            subjects=[n.log_subjects],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            storage=StorageType.FILE,
            max_age=(log_retention or LOG_RETENTION).total_seconds(),
            max_msgs_per_subject=RUN_LOG_CAP,
            num_replicas=replicas,
            allow_direct=True,  # a run's records are read back with batched direct gets
        ),
        max_age=log_retention is not None,
    )


async def _ensure_index_streams(bus: Bus, replicas: int) -> None:
    n = bus.names
    # Pages are batched direct gets, which cost the server more on a stream with deleted
    # messages in it: what is written once stays in one stream, what changes in the other.
    parts = ((n.index_stream, n.index_subjects, -1), (n.live_stream, n.live_subjects, 1))
    for name, subject, per_subject in parts:
        config = StreamConfig(
            name=name,
            subjects=[subject],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=per_subject,  # the live part: a rewritten status replaces the last
            num_replicas=replicas,
            allow_direct=True,
        )
        await _ensure_stream(bus, config)


async def _ensure_stream(bus: Bus, config: StreamConfig, *, max_age: bool = False) -> None:
    """Create the stream of ``config`` if missing; of an existing one, turn on direct gets when
    it needs them (made by an older meshflow) and, with ``max_age``, apply that limit."""
    assert config.name is not None
    name = config.name
    try:
        info = await through_elections(f"stream info {name}", bus.js_quick.stream_info, name)
        have = info.config
        stale = (config.allow_direct and not have.allow_direct) or (
            max_age and have.max_age != config.max_age
        )
        if stale:
            have.allow_direct = have.allow_direct or config.allow_direct
            if max_age:
                have.max_age = config.max_age
            await through_elections(f"update {name}", bus.js.update_stream, have)
        return
    except nats.js.errors.NotFoundError:
        pass
    except NATS_ERRORS as exc:
        raise NatsError(f"cannot read stream {name}: {exc!r}") from exc
    try:
        await through_elections(f"create {name}", bus.js.add_stream, config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:  # 10058: created concurrently by another process
            raise NatsError(f"cannot create stream {name}: {exc.description}") from exc
    except NATS_ERRORS as exc:
        raise NatsError(f"cannot create stream {name}: {exc!r}") from exc


async def fit_replicas(bus: Bus, streams: Sequence[str], replicas: int, *, scale: bool) -> None:
    """Bring existing streams to ``replicas`` when ``scale`` (the count was asked for
    explicitly); otherwise only warn about those with fewer than the deployment allows
    (say, created on one node before it joined a cluster)."""
    for stream in streams:
        try:
            info = await through_elections(f"stream info {stream}", bus.js_quick.stream_info, stream)
            have = info.config.num_replicas or 1
            if have == replicas:
                continue
            if scale:
                info.config.num_replicas = replicas
                await through_elections(f"replicas of {stream}", bus.js.update_stream, info.config)
                log.info("stream replicas changed", stream=stream, before=have, after=replicas)
            elif have < replicas:
                log.warning(
                    "stream has fewer replicas than this deployment allows",
                    stream=stream,
                    replicas=have,
                    allowed=replicas,
                    fix=f"meshflow worker APP --provision-only --replicas {replicas} (as admin)",
                )
        except NATS_ERRORS as exc:
            raise NatsError(f"cannot set the replicas of stream {stream}: {exc!r}") from exc
