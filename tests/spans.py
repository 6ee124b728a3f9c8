"""Spans recorded in memory for the tracing tests: an SDK tracer provider, global for one test
(the `spans` fixture in ``conftest.py``), and ways to pick its spans apart."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class Spans:
    """The spans finished so far, by what they are; ``tracer`` makes the test's own."""

    def __init__(self, exporter: InMemorySpanExporter, tracer: trace.Tracer) -> None:
        self.exporter = exporter
        self.tracer = tracer

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def of_run(self, run_id: str, name_prefix: str = "") -> list[ReadableSpan]:
        return [
            s
            for s in self.all()
            if attrs(s).get("meshflow.run_id") == run_id and s.name.startswith(name_prefix)
        ]

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name == name]


@contextlib.contextmanager
def recording() -> Iterator[Spans]:
    """An SDK tracer provider exporting to memory, global while inside.

    The API lets a program set its provider once; like OpenTelemetry's own test utilities, this
    sets the global and puts the previous one back after.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with _global_provider(provider):
        yield Spans(exporter, provider.get_tracer("tests"))
    provider.shutdown()


@contextlib.contextmanager
def tracing_off() -> Iterator[None]:
    """No tracer provider configured while inside."""
    with _global_provider(None):
        yield


@contextlib.contextmanager
def _global_provider(provider: TracerProvider | None) -> Iterator[None]:
    before = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider
    try:
        yield
    finally:
        trace._TRACER_PROVIDER = before


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None
