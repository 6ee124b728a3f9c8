"""OpenTelemetry traces of runs: each pass of a run, and each attempt of a step, is a span in the
trace of whoever sent the event that started the run.

How a trace follows a run, whichever worker advances it and however long after:

- ``client.send`` publishes inside a ``send`` span (producer) and puts its W3C trace context
  (``traceparent``, ``tracestate``) in every event's headers;
- the trigger that creates a run keeps that context in the run record (`TraceContext`), so every
  pass joins it, also after a sleep of days on another worker. A run created with no context to
  join (a cron tick, an event sent untraced, a replay) starts a trace of its own, whose root is
  a ``create`` span; an invoked run joins its parent's pass;
- every pass is a ``process`` span (consumer) whose parent is that context; each attempt of a
  step's handler is a child of it (``Activation.step_attempt``), current while the handler runs,
  so spans the handler starts nest under it (a sync handler's thread copies the context);
- events a run sends (``step.send_event``, its ``meshflow/function.*`` events) carry the pass's
  context, so the runs they start (an ``on_failure`` run) join the same trace.

Errors: a failed step attempt records its exception on its span; a pass whose function attempt
or run failed records the stored error as an ``exception`` event; both set status ERROR and
``error.type``.

Cost: meshflow needs ``opentelemetry-api`` only (``pip install meshflow[otel]``) and uses it
only once the program has imported it: a tracer provider cannot be configured without
importing ``opentelemetry.trace``, so a program that never did pays one dictionary lookup per
pass, not even the import. While the global provider is the API's default (no SDK set up), no
span is made. A worker that traces nothing still passes the record's context on to the events
its runs send and to its child runs, so one untraced hop does not cut a trace.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any, Self

from .activations import StepScope
from .names import HDR_MSG_ID, HDR_TRACEPARENT, HDR_TRACESTATE
from .runs import ErrorInfo, RunRecord, RunStatus, TraceContext, error_info

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext, Tracer

    from .functions import Function

_API = "opentelemetry.trace"
# OpenTelemetry's own way to name a provider without code, honoured even before anything
# imported the API; read once, as the process's environment is set when it starts.
_NAMED_PROVIDER = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_NAME = "meshflow"
_SYSTEM = "nats"

# version-traceid-spanid-flags; version ff and all-zero ids are invalid; a later version may
# append fields after a '-'.
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_MAX_TRACEPARENT = 256
_MAX_TRACESTATE = 512  # what W3C asks every vendor to pass on; a longer one is dropped

_NO_HEADERS: Mapping[str, str] = {}  # shared: read only (a dict, as ** merges one fastest)


# --- trace context as carried in headers and records -------------------------------------------
def carried(headers: Mapping[str, str] | None) -> TraceContext | None:
    """The valid W3C trace context in a message's ``headers``, if any.

    An invalid ``traceparent`` is ignored and an invalid or oversized ``tracestate`` dropped, as
    the W3C recommendation says: the message is still processed, in a trace of its own.
    """
    if not headers:
        return None
    parent = headers.get(HDR_TRACEPARENT)
    if parent is None or not _valid_parent(parent):
        return None
    state = headers.get(HDR_TRACESTATE, "")
    if len(state) > _MAX_TRACESTATE or not state.isascii() or not state.isprintable():
        state = ""
    return TraceContext(traceparent=parent, tracestate=state)


def _valid_parent(parent: str) -> bool:
    if len(parent) > _MAX_TRACEPARENT or not _TRACEPARENT.match(parent):
        return False
    if len(parent) == 55:
        return True
    return not parent.startswith("00") and parent[55] == "-"


def headers_of(trace: TraceContext | None) -> Mapping[str, str]:
    """The message headers that carry ``trace``."""
    if trace is None:
        return _NO_HEADERS
    if not trace.tracestate:
        return {HDR_TRACEPARENT: trace.traceparent}
    return {HDR_TRACEPARENT: trace.traceparent, HDR_TRACESTATE: trace.tracestate}


def here(fallback: TraceContext | None = None) -> TraceContext | None:
    """The trace context of the current span; ``fallback`` when there is none (no valid span, or
    OpenTelemetry not in use)."""
    if not _imported():
        return fallback
    from opentelemetry.trace import get_current_span

    return _stored(get_current_span().get_span_context()) or fallback


def outgoing(fallback: TraceContext | None = None) -> Mapping[str, str]:
    """Headers for a message sent now: the current span's context, else ``fallback``'s."""
    return headers_of(here(fallback))


def for_new_run(function_id: str, run_id: str, parent: TraceContext | None) -> TraceContext | None:
    """The trace a new run joins: ``parent`` (what its message carried), or, when tracing is
    on, a new trace whose root is a ``create`` span of the run."""
    if parent is not None:
        return parent
    tracer = _tracer()
    if tracer is None:
        return None
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind

    attributes = {**_messaging("create"), "meshflow.function_id": function_id, "meshflow.run_id": run_id}
    span = tracer.start_span(
        f"create {function_id}", Context(), kind=SpanKind.PRODUCER, attributes=attributes
    )
    span.end()
    return _context_of(span)


# --- spans ---------------------------------------------------------------------------------------
class _Current:
    """A span, current while inside (class-based: a pass and each step attempt enter one, so it
    costs no generator frames). An exception leaving it is recorded on it; it ends on the way out."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span | None) -> None:
        self.span = span
        self._token: Token[Context] | None = None

    def __enter__(self) -> Self:
        if self.span is not None:
            from opentelemetry import context
            from opentelemetry.trace import set_span_in_context

            self._token = context.attach(set_span_in_context(self.span))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        span = self.span
        if span is None:
            return
        from opentelemetry import context

        if self._token is not None:
            context.detach(self._token)
        # Like OpenTelemetry's own spans: an Exception is an error; a BaseException (the task
        # cancelled: the worker stops) is not.
        if isinstance(exc, Exception):
            _record_error(span, error_info(exc, retriable=True))
        span.end()


class PassSpan(_Current):
    """The span of one pass (or nothing, when tracing is off): told how the pass ended."""

    __slots__ = ()

    def settled(self, before: RunRecord, after: RunRecord) -> None:
        """The pass wrote ``after`` over ``before``: its status, and the error if it failed."""
        if self.span is None:
            return
        self.span.set_attribute("meshflow.run.status", str(after.status))
        error = _failure(before, after)
        if error is not None:
            _record_error(self.span, error)

    def abandoned(self, why: str) -> None:
        """The pass stopped without writing its outcome (another pass holds the run, or the
        worker stops): the run goes on in another pass."""
        if self.span is not None:
            self.span.set_attribute("meshflow.pass.abandoned", why)


def run_pass(
    fn: Function, record: RunRecord, *, subject: str, headers: Mapping[str, str], wake: str
) -> PassSpan:
    """The span of a pass of ``record`` woken by ``wake`` (a message on ``subject`` with
    ``headers``), to enter for as long as the pass runs; an exception that ends the pass is
    recorded on it."""
    tracer = _tracer()
    if tracer is None:
        return PassSpan(None)
    from opentelemetry.trace import SpanKind

    code = fn.handler.__code__
    attributes: dict[str, str | int] = {
        **_messaging("process"),
        "messaging.destination.name": subject,
        "meshflow.run_id": record.id,
        "meshflow.function_id": fn.full_id,
        "meshflow.attempt": record.attempt + 1,
        "meshflow.wake": wake,
        "code.function.name": f"{fn.handler.__module__}.{fn.handler.__qualname__}",
        "code.file.path": code.co_filename,
        "code.line.number": code.co_firstlineno,
    }
    if HDR_MSG_ID in headers:
        attributes["messaging.message.id"] = headers[HDR_MSG_ID]
    parent = _context(record.trace)
    return PassSpan(
        tracer.start_span(f"process {fn.full_id}", parent, kind=SpanKind.CONSUMER, attributes=attributes)
    )


def step_attempts(
    fn: Function, run_id: str
) -> Callable[[StepScope], contextlib.AbstractContextManager[Any]] | None:
    """What a pass of run ``run_id`` enters around each attempt of a step (``Activation.step_attempt``):
    a span, child of the pass's, current while the handler runs; None when tracing is off."""
    tracer = _tracer()
    if tracer is None:
        return None
    function_id = fn.full_id

    def attempt(scope: StepScope) -> _Current:
        attributes: dict[str, str | int] = {
            "meshflow.run_id": run_id,
            "meshflow.function_id": function_id,
            "meshflow.step_id": scope.step_id,
            "meshflow.attempt": scope.attempt,
        }
        return _Current(tracer.start_span(f"step {scope.step_id}", attributes=attributes))

    return attempt


def sending(subjects: list[str]) -> contextlib.AbstractContextManager[Mapping[str, str]]:
    """A ``send`` span (producer) around publishing events on ``subjects``, yielding the headers
    that carry its context to each event; without tracing, the current context's headers."""
    tracer = _tracer()
    if tracer is None:
        return contextlib.nullcontext(outgoing() if _imported() else _NO_HEADERS)
    return _send_span(tracer, subjects)


@contextlib.contextmanager
def _send_span(tracer: Tracer, subjects: list[str]) -> Iterator[Mapping[str, str]]:
    from opentelemetry.trace import SpanKind

    attributes: dict[str, str | int] = {**_messaging("send")}
    distinct = set(subjects)
    name = "send"
    if len(distinct) == 1:
        attributes["messaging.destination.name"] = subjects[0]
        name = f"send {subjects[0]}"
    if len(subjects) > 1:
        attributes["messaging.batch.message_count"] = len(subjects)
    with tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes) as span:
        yield headers_of(_context_of(span))


# --- helpers -------------------------------------------------------------------------------------
def _messaging(operation: str) -> dict[str, str | int]:
    """The messaging attributes every meshflow span has, per OpenTelemetry's conventions."""
    return {
        "messaging.system": _SYSTEM,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }


def _failure(before: RunRecord, after: RunRecord) -> ErrorInfo | None:
    """The error a pass that wrote ``after`` over ``before`` ended with: the run's, or that of a
    function attempt it failed (to be retried)."""
    if after.status is RunStatus.FAILED:
        return after.error
    if after.history and (not before.history or after.history[-1] != before.history[-1]):
        return after.history[-1].error
    return None


def _record_error(span: Span, error: ErrorInfo) -> None:
    """``error`` on ``span`` as OpenTelemetry records an exception: an ``exception`` event, the
    status ERROR, and ``error.type``."""
    from opentelemetry.trace import Status, StatusCode

    span.add_event(
        "exception",
        {
            "exception.type": error.type,
            "exception.message": error.message,
            "exception.stacktrace": error.traceback,
        },
    )
    span.set_attribute("error.type", error.type)
    span.set_status(Status(StatusCode.ERROR, f"{error.type}: {error.message}"))


def _imported() -> bool:
    """Whether the program uses OpenTelemetry (has imported its API, or names a provider the
    API loads on its own); meshflow never imports it otherwise. The one check a pass makes
    when tracing is off, hence as cheap as it gets."""
    return _API in sys.modules or (_NAMED_PROVIDER and _load_api())


@functools.cache
def _load_api() -> bool:
    try:
        import opentelemetry.trace  # noqa: F401 - loads the provider the environment names
    except ImportError:
        return False
    return True


class _Tracers:
    """meshflow's tracer from the global provider, made again only when the provider changes."""

    provider: object = None
    tracer: Tracer | None = None


_ASK = object()


def _tracer() -> Tracer | None:
    """meshflow's tracer, or None when no tracer provider is configured (tracing is off)."""
    api = sys.modules.get(_API)
    if api is None and not (_NAMED_PROVIDER and _load_api()):
        return None
    # The API's get_tracer_provider() reads os.environ on every call until a provider is set:
    # half a microsecond, three times a run, with the API imported and tracing off. Its global
    # says the same at once; an API version without it is asked the public way.
    provider: Any = getattr(sys.modules[_API], "_TRACER_PROVIDER", _ASK)
    if provider is None and not _NAMED_PROVIDER:
        return None
    if provider is None or provider is _ASK:  # the public way loads a provider the environment names
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
    if provider is not _Tracers.provider:
        from opentelemetry import trace

        _Tracers.provider = provider
        off = isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        _Tracers.tracer = None if off else provider.get_tracer(_NAME)
    return _Tracers.tracer


def _context(trace: TraceContext | None) -> Context:
    """An OpenTelemetry context whose (remote) span is ``trace``'s; with none, an empty one (a
    new trace, whatever span was current where the worker started)."""
    from opentelemetry.context import Context
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
    from opentelemetry.trace.span import TraceState

    if trace is None:
        return Context()
    _, trace_id, span_id, flags = trace.traceparent.split("-")[:4]  # checked by `carried`
    state = TraceState.from_header([trace.tracestate]) if trace.tracestate else None
    remote = SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(int(flags, 16)), state)
    return set_span_in_context(NonRecordingSpan(remote), Context())


def _context_of(span: Span) -> TraceContext | None:
    """``span``'s W3C trace context, as stored and sent."""
    return _stored(span.get_span_context())


def _stored(context: SpanContext) -> TraceContext | None:
    """A span context as stored and sent (W3C ``traceparent`` version 00); None if invalid.

    Formatted here rather than by OpenTelemetry's propagator: a pass asks for it whenever its
    run sends an event, and this costs a fraction of an inject."""
    if not context.is_valid:
        return None
    parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    state = context.trace_state.to_header() if context.trace_state else ""
    return TraceContext(traceparent=parent, tracestate=state if len(state) <= _MAX_TRACESTATE else "")
