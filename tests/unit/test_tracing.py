"""Trace context carried and kept (`meshflow.tracing`): what a message's headers may hold, the
run records that keep it, the pass span's parent and errors, and meshflow without OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgspec
import pytest
from opentelemetry.trace import StatusCode

from meshflow import App, tracing
from meshflow.activations import StepScope
from meshflow.events import Event
from meshflow.runs import Attempt, ErrorInfo, RunRecord, RunStatus, TraceContext, encode_record, new_run
from tests.spans import Spans, attrs, parent_id, recording, span_id, trace_id

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

app = App("t")


@app.function("f", trigger="t/e")
async def f(ctx: object) -> None:
    return None


def record(**fields: object) -> RunRecord:
    return new_run("run-1", app="t", fn="f", events=[Event(name="t/e")], now=1, **fields)


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        ({"traceparent": PARENT}, TraceContext(traceparent=PARENT)),
        (
            {"traceparent": PARENT, "tracestate": "a=1,b=2"},
            TraceContext(traceparent=PARENT, tracestate="a=1,b=2"),
        ),
        (
            {"traceparent": "01" + PARENT[2:] + "-later-field"},
            TraceContext(traceparent="01" + PARENT[2:] + "-later-field"),
        ),
        ({"traceparent": PARENT, "tracestate": "a=" + "x" * 600}, TraceContext(traceparent=PARENT)),
        ({"traceparent": PARENT, "tracestate": "a=\u00e9"}, TraceContext(traceparent=PARENT)),
        ({"traceparent": PARENT + "-extra"}, None),  # version 00 has exactly four fields
        ({"traceparent": "ff" + PARENT[2:]}, None),  # version ff is invalid
        ({"traceparent": "00-" + "0" * 32 + PARENT[35:]}, None),  # all-zero trace id
        ({"traceparent": PARENT[:36] + "0" * 16 + "-01"}, None),  # all-zero span id
        ({"traceparent": PARENT.upper()}, None),
        ({"traceparent": "garbage"}, None),
        ({"tracestate": "a=1"}, None),
        ({}, None),
    ],
)
def test_a_messages_trace_context_is_kept_only_when_valid(
    headers: dict[str, str], kept: TraceContext | None
) -> None:
    """An invalid traceparent starts a new trace and an invalid or oversized tracestate is
    dropped (W3C): never an error, the message is processed either way."""
    assert tracing.carried(headers) == kept
    if kept is not None:
        assert tracing.carried(dict(tracing.headers_of(kept))) == kept


def test_run_records_written_before_traces_existed_still_decode() -> None:
    old = msgspec.json.decode(encode_record(record()))
    del old["trace"]
    decoded = msgspec.json.decode(msgspec.json.encode(old), type=RunRecord)
    assert decoded.trace is None
    traced = record(trace=TraceContext(traceparent=PARENT, tracestate="a=1"))
    assert msgspec.json.decode(encode_record(traced), type=RunRecord) == traced


def test_a_pass_joins_the_runs_trace_and_a_run_with_none_is_a_root_whatever_span_is_current(
    spans: Spans,
) -> None:
    with spans.tracer.start_as_current_span("where the worker was started"):
        with tracing.run_pass(f, record(), subject="s", headers={}, wake="timer") as untraced:
            untraced.settled(record(), record(status=RunStatus.COMPLETED))
        joined = record(trace=TraceContext(traceparent=PARENT, tracestate="vendor=7"))
        with tracing.run_pass(f, joined, subject="s", headers={}, wake="timer") as traced:
            sent = tracing.here()
            traced.abandoned("the worker stops")
    root, child = spans.named("process t-f")
    assert root.parent is None
    assert attrs(root)["meshflow.run.status"] == "completed"
    assert trace_id(child) == int(PARENT[3:35], 16)
    assert parent_id(child) == int(PARENT[36:52], 16)
    assert child.parent is not None
    assert child.parent.trace_state.to_header() == "vendor=7"
    assert attrs(child)["meshflow.pass.abandoned"] == "the worker stops"
    # what the pass sends on: its own span, in the same trace, with the tracestate kept
    assert sent == TraceContext(
        traceparent=f"00-{PARENT[3:35]}-{span_id(child):016x}-01", tracestate="vendor=7"
    )


def test_a_pass_records_the_error_of_a_function_attempt_it_failed_or_of_the_run() -> None:
    boom = ErrorInfo(type="KeyError", message="'sku'", traceback="Traceback ...")
    earlier = Attempt(attempt=1, started_at=1, error=ErrorInfo(type="OSError", message="earlier"))
    retried = Attempt(attempt=2, started_at=2, error=boom)
    before = record(history=[earlier])
    cases = {
        "retrying": (record(status=RunStatus.RETRYING, history=[earlier, retried]), boom),
        "failed": (record(status=RunStatus.FAILED, error=boom, history=[earlier]), boom),
        "sleeping": (record(status=RunStatus.SLEEPING, history=[earlier]), None),
    }
    for name, (after, error) in cases.items():
        with recording() as spans:
            with tracing.run_pass(f, before, subject="s", headers={}, wake="timer") as traced:
                traced.settled(before, after)
            (span,) = spans.all()
        if error is None:
            assert span.status.status_code is StatusCode.UNSET, name
            assert not span.events, name
            continue
        assert span.status.status_code is StatusCode.ERROR, name
        assert attrs(span)["error.type"] == "KeyError", name
        (event,) = span.events
        assert event.name == "exception"
        assert dict(event.attributes or {}) == {
            "exception.type": "KeyError",
            "exception.message": "'sku'",
            "exception.stacktrace": "Traceback ...",
        }


def test_a_step_attempts_span_records_the_exception_that_passes_through_it(spans: Spans) -> None:
    attempts = tracing.step_attempts(f, "run-1")
    assert attempts is not None
    with pytest.raises(LookupError), attempts(StepScope("lookup", 3)):
        raise LookupError("no such sku")
    (span,) = spans.named("step lookup")
    assert attrs(span) == {
        "meshflow.run_id": "run-1",
        "meshflow.function_id": "t-f",
        "meshflow.step_id": "lookup",
        "meshflow.attempt": 3,
        "error.type": "LookupError",
    }
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_without_opentelemetry_meshflow_imports_nothing_of_it_and_traces_nothing() -> None:
    """With the extra not installed (its import blocked), meshflow loads, makes no span, and still
    passes a run's trace context on to what the run sends."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.modules["opentelemetry"] = None  # as if opentelemetry-api were not installed
        os.environ["OTEL_PYTHON_TRACER_PROVIDER"] = "sdk"  # named, but nothing to load it
        import meshflow, meshflow.worker
        from meshflow import tracing
        from meshflow.activations import StepScope
        from meshflow.runs import TraceContext
        app = meshflow.App("t")

        @app.function("f", trigger="t/e")
        async def f(ctx):
            return None

        kept = TraceContext(traceparent={PARENT!r})
        assert tracing.step_attempts(f, "run-1") is None
        assert tracing.for_new_run("t-f", "run-1", None) is None
        assert tracing.for_new_run("t-f", "run-1", kept) is kept
        assert dict(tracing.outgoing(kept)) == {{"traceparent": {PARENT!r}}}
        assert dict(tracing.outgoing()) == {{}}
        with tracing.sending(["s"]) as headers:
            assert dict(headers) == {{}}
        with tracing.run_pass(f, None, subject="s", headers={{}}, wake="trigger") as span:
            span.settled(None, None)
            span.abandoned("the worker stops")
        assert not [m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m] is not None]
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_meshflow_imports_no_opentelemetry_until_the_program_does() -> None:
    script = (
        "import sys, meshflow, meshflow.worker, meshflow.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
