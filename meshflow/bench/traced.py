"""``meshflow bench --trace``: every run traced, as in a deployment that exports its traces.

The driver and each worker get an OpenTelemetry SDK tracer provider with the SDK's default
batching processor, as an application sets one up, and an exporter that counts the spans and
drops them: the figures then hold what tracing costs meshflow's processes (making, ending and
batching spans), not what a collector or the network would. Each worker writes how many spans it
exported into the directory `TRACE_ENV` names, read back as the workload's ``spans`` figure.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from pathlib import Path

#: Set (to a directory) for the workers of a traced benchmark.
TRACE_ENV = "MESHFLOW_BENCH_TRACE"


def install(spans_file: Path | None = None) -> None:
    """Trace this process (its global tracer provider); at exit, write the count of spans it
    exported to ``spans_file``. The SDK is imported only here: an untraced benchmark loads none
    of OpenTelemetry."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        """Counts the spans it is handed, and drops them."""

        count = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            Dropped.count += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    trace.set_tracer_provider(provider)
    if spans_file is not None:

        def report() -> None:
            provider.force_flush()
            spans_file.write_text(str(Dropped.count))

        atexit.register(report)


def install_from_env() -> None:
    """In a worker of a traced benchmark (`TRACE_ENV` set): `install`, reporting by process id."""
    directory = os.environ.get(TRACE_ENV)
    if directory:
        install(spans_file(Path(directory), os.getpid()))


def spans_file(directory: Path, pid: int) -> Path:
    return directory / f"{pid}.spans"


def spans_made(directory: Path, pid: int | None) -> float | None:
    """How many spans worker ``pid`` exported (None: it wrote nothing, e.g. it was killed)."""
    if pid is None:
        return None
    try:
        return float(spans_file(directory, pid).read_text())
    except (OSError, ValueError):
        return None
