"""A run's logs: what its code logs while it runs, kept per run in the logs stream and read back.

- `LogRecord` is one line: the run, the step and attempt it came from (none: the function's body),
  level, message, when, the structured fields, the worker. A *marker* record (``marker`` set) says
  where records are missing and why: ``"truncated"`` (one step attempt logged more than
  `ATTEMPT_CAP` records; the rest of that attempt's are not kept), ``"dropped"`` (the worker could
  not send them fast enough), ``"capped"`` (the run reached the stream's per-run cap, whose oldest
  records go first).
- `RunLogger` is ``ctx.logger``: a structlog logger bound to the run that prints as before and
  hands each record to the worker's `LogShipper`; silent while memoized steps replay. With
  ``Worker(capture_logging=True)`` the stdlib ``logging`` records emitted while a run's code
  runs are kept the same way (`capture_stdlib`).
- `LogShipper` never blocks and never fails the code that logs: a record is encoded and bounded
  where it is logged (any thread), queued (at most `QUEUE_CAP`; past that it is counted and a
  "dropped" marker says how many), and published fire-and-forget by one task. A pass's records
  are flushed to the connection before the pass writes its run, so a run that has ended has all
  its records stored.
- `follow` gives a run's records as they come (``client.follow_logs``); ``Streams.oldest``
  reads them back in order.

Bounds: a message is cut at 8 KiB, a traceback at 16 KiB, a string field at 4 KiB, a record's
fields at 16 KiB (past that they are replaced by a note); a value that is not JSON is kept as its
``repr`` (cut at 1 KiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import logging
import threading
import traceback
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from .durations import now_ms
from .errors import NatsError
from .names import Names

if TYPE_CHECKING:
    from .activations import Activation, StepScope

#: The most records one step attempt (or one pass of the function's body) keeps.
ATTEMPT_CAP = 1_000
#: The most records a worker holds unsent; past it, records are dropped and counted.
QUEUE_CAP = 10_000
MESSAGE_CAP = 8 * 1024
TRACEBACK_CAP = 16 * 1024
FIELDS_CAP = 16 * 1024
FIELD_CAP = 4 * 1024  # one string field
_BATCH = 1024
_LEVELS = {"debug", "info", "warning", "error", "critical"}

log = structlog.get_logger("meshflow.logs")


class LogRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One record a run logged (``client.logs``, ``client.follow_logs``, ``meshflow logs``)."""

    run_id: str
    ts: int  # epoch ms
    level: str  # debug, info, warning, error, critical
    message: str
    step_id: str | None = None  # None: logged by the function's body, outside any step
    attempt: int = 1  # of the step (or, outside steps, of the function), from 1
    fields: dict[str, Any] = msgspec.field(default_factory=dict)
    worker: str = ""
    marker: str | None = None  # "truncated", "dropped", "capped": records are missing here


def _fallback(value: Any) -> Any:
    """What a field that is not JSON is kept as: its ``repr`` (cut at 1 KiB), or a note."""
    try:
        return _cut(repr(value), 1024)
    except Exception:
        return f"<{type(value).__name__} that cannot be shown: its repr() failed>"


_encoder = msgspec.json.Encoder(enc_hook=_fallback)
_decoder = msgspec.json.Decoder(LogRecord)


def _cut(text: str, cap: int) -> str:
    if len(text) <= cap:
        return text
    return f"{text[:cap]}… [{len(text) - cap} more characters not kept]"


def encode_record(record: LogRecord) -> bytes:
    """The record's JSON, its fields replaced by a note when they cannot be encoded or are over
    `FIELDS_CAP`: a record is always kept, with what could be kept of it."""
    try:
        fields = _encoder.encode(record.fields) if record.fields else b""
    except Exception as exc:  # a broken __repr__, a cycle
        fields, note = b"", f"fields not kept: they cannot be encoded ({type(exc).__name__})"
    else:
        note = (
            f"fields not kept: {len(fields)} bytes of JSON, over {FIELDS_CAP}"
            if len(fields) > FIELDS_CAP
            else ""
        )
    if note or not fields:
        record = msgspec.structs.replace(record, fields={"meshflow.note": note} if note else {})
    return _encoder.encode(record)


def decode_record(data: bytes, seq: int = 0) -> LogRecord:
    """A stored record, or a marker saying the one at ``seq`` could not be read."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return LogRecord(
            run_id="",
            ts=0,
            level="warning",
            marker="unreadable",
            message=f"record {seq} cannot be read: {exc}",
        )


class LogShipper:
    """Gets a worker's log records to the logs stream without ever blocking who logs (see above)."""

    def __init__(
        self,
        publish: Callable[[str, bytes], Awaitable[None]],
        names: Names,
        *,
        worker: str = "",
        capture_stdlib: bool = False,
        queue_cap: int = QUEUE_CAP,
    ) -> None:
        self._publish = publish
        self._names = names
        self.worker = worker
        self.capture_stdlib = capture_stdlib
        self._cap = queue_cap
        self._queue: deque[tuple[str, bytes]] = deque()
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.lost = 0  # records queued that could not be published (disconnected, buffer full)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="meshflow-logs")

    async def stop(self) -> None:
        """Send what is queued, then stop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()

    def put(self, record: LogRecord) -> None:
        """Queue ``record`` (from any thread); never blocks, never raises."""
        try:
            data = encode_record(record)
        except Exception:
            return
        with self._lock:
            if len(self._queue) >= self._cap:
                self._dropped[record.run_id] = self._dropped.get(record.run_id, 0) + 1
                return
            self._queue.append((record.run_id, data))
            first = len(self._queue) == 1
        if first:
            self._signal()

    def _signal(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Hand every queued record to the connection (in order, ahead of what the caller
        publishes next), with a "dropped" marker for each run that lost some."""
        with self._lock:
            batch, self._queue = self._queue, deque()
            dropped, self._dropped = self._dropped, {}
        for run_id, count in dropped.items():
            marker = LogRecord(
                run_id=run_id,
                ts=now_ms(),
                level="warning",
                marker="dropped",
                worker=self.worker,
                message=f"{count} log records of this run were dropped: the worker logged faster "
                "than it could send them",
            )
            batch.append((run_id, encode_record(marker)))
        for run_id, data in batch:
            try:
                await self._publish(self._names.log_subject(run_id), data)
                self.sent += 1
            except NatsError as exc:
                self.lost += 1
                if self.lost == 1 or self.lost % 1000 == 0:
                    log.warning("log records could not be sent", lost=self.lost, error=str(exc))


_current: contextvars.ContextVar[RunLogger | None] = contextvars.ContextVar(
    "meshflow_run_logger", default=None
)


class RunLogger:
    """``ctx.logger``: a structlog logger bound to the run, silent while memoized steps replay (a
    resumed run does not log its past again), bound to the step it logs from, if any; each record
    also goes to the worker's `LogShipper`, when there is one."""

    def __init__(
        self,
        base: Any,
        *,
        replaying: Callable[[], bool],
        scope: Callable[[], StepScope | None],
        run_id: str = "",
        attempt: int = 1,
        shipper: LogShipper | None = None,
        counts: dict[tuple[str | None, int], int] | None = None,
        bound: dict[str, Any] | None = None,
    ) -> None:
        self._base = base
        self._replaying = replaying
        self._scope = scope
        self._run_id = run_id
        self._attempt = attempt
        self._shipper = shipper
        self._counts = {} if counts is None else counts  # records per attempt, shared by binds
        self._bound = bound or {}

    @classmethod
    def of(
        cls, act: Activation, replaying: Callable[[], bool], scope: Callable[[], StepScope | None]
    ) -> RunLogger:
        """The logger of a pass of ``act``'s run."""
        base = act.logger if act.logger is not None else structlog.get_logger("meshflow.run")
        return cls(
            base.bind(run_id=act.run_id, function=act.function.full_id),
            replaying=replaying,
            scope=scope,
            run_id=act.run_id,
            attempt=act.attempt + 1,
            shipper=act.logs,
        )

    def bind(self, **kw: Any) -> RunLogger:
        return RunLogger(
            self._base.bind(**kw),
            replaying=self._replaying,
            scope=self._scope,
            run_id=self._run_id,
            attempt=self._attempt,
            shipper=self._shipper,
            counts=self._counts,
            bound={**self._bound, **kw},
        )

    def _log(self, level: str, event: str, *args: Any, **kw: Any) -> None:
        scope = self._scope()
        if scope is None and self._replaying():  # a step's code runs only when it executes
            return
        if scope is not None:
            kw.setdefault("step", scope.step_id)
        try:
            getattr(self._base, level)(event, *args, **kw)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._base.warning("a log record could not be printed", error=type(exc).__name__)
        if self._shipper is not None:
            kw.pop("step", None)
            if level == "exception":
                level, kw["exception"] = "error", _cut(traceback.format_exc(), TRACEBACK_CAP)
            self.keep(level, _message(event, args), {**self._bound, **kw}, scope)

    def keep(self, level: str, message: str, fields: dict[str, Any], scope: StepScope | None) -> None:
        """Hand one record to the shipper, within the attempt's cap; never raises."""
        shipper = self._shipper
        if shipper is None:
            return
        step_id, attempt = (scope.step_id, scope.attempt) if scope is not None else (None, self._attempt)
        key = (step_id, attempt)
        n = self._counts.get(key, 0) + 1
        self._counts[key] = n
        if n > ATTEMPT_CAP + 1:
            return
        record = LogRecord(
            run_id=self._run_id,
            ts=now_ms(),
            level=level if level in _LEVELS else "info",
            message=_cut(message, MESSAGE_CAP),
            step_id=step_id,
            attempt=attempt,
            fields={k: _cut(v, FIELD_CAP) if isinstance(v, str) else v for k, v in fields.items()},
            worker=shipper.worker,
        )
        if n == ATTEMPT_CAP + 1:
            where = f"step {step_id!r} attempt {attempt}" if step_id else "the function's body"
            record = msgspec.structs.replace(
                record,
                level="warning",
                marker="truncated",
                fields={},
                message=f"{where} logged more than {ATTEMPT_CAP} records; the rest are not kept",
            )
        shipper.put(record)

    def enter(self) -> contextvars.Token[RunLogger | None]:
        """Make this the logger stdlib records go to in the current context (when captured)."""
        return _current.set(self if self._shipper is not None and self._shipper.capture_stdlib else None)

    @staticmethod
    def leave(token: contextvars.Token[RunLogger | None]) -> None:
        _current.reset(token)

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("debug", event, *args, **kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("info", event, *args, **kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("warning", event, *args, **kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("error", event, *args, **kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("exception", event, *args, **kw)


def _message(event: str, args: tuple[Any, ...]) -> str:
    text = str(event)
    if not args:
        return text
    try:
        return text % args
    except (TypeError, ValueError):
        return f"{text} {args!r}"


class _Capture(logging.Handler):
    """Sends the stdlib records emitted while a run's code runs to the run's logger."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = _current.get()
        scope = logger._scope() if logger is not None else None
        if logger is None or record.name.startswith("meshflow") or (scope is None and logger._replaying()):
            return
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exception"] = _cut(
                    "".join(traceback.format_exception(*record.exc_info)), TRACEBACK_CAP
                )
            logger.keep(record.levelname.lower(), record.getMessage(), fields, scope)
        except Exception:
            self.handleError(record)


_capture = _Capture()


def capture_stdlib() -> None:
    """Install the handler that keeps stdlib ``logging`` records of runs (idempotent)."""
    root = logging.getLogger()
    if _capture not in root.handlers:
        root.addHandler(_capture)


async def follow(
    live: AsyncIterator[bytes],
    read: Callable[[], Awaitable[list[tuple[int, bytes]]]],
    ended: Callable[[], Awaitable[bool]],
    *,
    poll: float = 1.0,
) -> AsyncGenerator[LogRecord, None]:
    """The records ``read`` finds, then those arriving ``live`` (subscribed before ``read`` is
    called, so none falls between), each once; ends when the run has ``ended`` and a last read
    found the records written before it ended. ``poll``: seconds between looks at the run."""
    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def pump() -> None:
        async for data in live:
            arrived.put_nowait(data)

    pumping = asyncio.create_task(pump())
    seen: set[bytes] = set()
    try:
        finished = False
        while True:
            for seq, data in await read():
                if data not in seen:
                    seen.add(data)
                    yield decode_record(data, seq)
            if finished:
                return
            loop = asyncio.get_running_loop()
            look_at = loop.time() + poll
            while loop.time() < look_at:
                try:
                    data = await asyncio.wait_for(arrived.get(), max(0.0, look_at - loop.time()))
                except TimeoutError:
                    break
                if data not in seen:
                    seen.add(data)
                    yield decode_record(data)
            if pumping.done():
                pumping.result()  # the subscription failed: say why
                raise NatsError("following the run's logs stopped: the connection closed")
            finished = await ended()  # one more read after it ended, for what was written before
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)


def capped(records: list[LogRecord], run_id: str, cap: int) -> list[LogRecord]:
    """``records`` with a leading "capped" marker when the run has as many as the stream keeps."""
    if len(records) < cap:
        return records
    first = records[0].ts if records else 0
    note = LogRecord(
        run_id=run_id,
        ts=first,
        level="warning",
        marker="capped",
        message=f"this run reached the {cap} records the logs stream keeps of a run; older ones are gone",
    )
    return [note, *records]


def render(record: LogRecord) -> str:
    """One line for a terminal: time, level, where, message, fields."""
    when = dt.datetime.fromtimestamp(record.ts / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    where = f"{record.step_id}#{record.attempt}" if record.step_id else f"(function)#{record.attempt}"
    extra = " ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v!r}" for k, v in record.fields.items())
    return f"{when} {record.level:<8} {where} {record.message}" + (f" {extra}" if extra else "")
