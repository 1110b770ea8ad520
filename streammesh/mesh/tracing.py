"""OpenTelemetry traces for every service: the set-up from settings, the tracer the interceptors
use, and the trace context as a small text field for carriers that are not gRPC metadata (a
Redis stream entry).

Tracing is off unless a service's `tracing_exporter` setting names an exporter; while it is off
no tracing layer or client interceptor is installed at all, so a call pays nothing for it.
`configure_tracing` is called once from `run_service` (tests call it and `shutdown_tracing`
around a stack). The provider is kept here rather than as OpenTelemetry's global one: the global
can be set only once per process, and tests set tracing up and down several times.

For the queue (a producer and its consumers):

    entry["tc"] = context_field() or ""           # the publishing span's context
    ...
    with tracer().start_as_current_span("process", links=span_links(fields)):
        ...
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "TRACEPARENT",
    "Exporter",
    "TracingConfig",
    "configure_tracing",
    "context_field",
    "extract_context",
    "flush_tracing",
    "inject_metadata",
    "shutdown_tracing",
    "span_links",
    "tracer",
    "tracing_enabled",
]

TRACEPARENT = "traceparent"
"""The W3C header (and gRPC metadata key) that carries a span's context."""
Exporter = Literal["none", "otlp", "console", "file"]
INSTRUMENTATION = "streammesh.mesh"

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TracingConfig:
    """What `configure_tracing` needs (a service's settings carry these fields)."""

    exporter: Exporter = "none"
    """none: off; otlp: OTLP over gRPC to `endpoint`; console: stdout; file: JSON lines at `file`."""
    endpoint: str = "http://127.0.0.1:4317"
    """The OTLP gRPC receiver (http:// is plaintext, https:// TLS)."""
    file: Path | None = None
    """Where the file exporter appends its JSON lines."""
    sample_ratio: float = 1.0
    """Share of new traces recorded; a call that arrives with a context follows its sampling."""


@dataclass
class _Tracing:
    provider: TracerProvider
    tracer: trace.Tracer
    output: IO[str] | None


_active: _Tracing | None = None


def _exporter(config: TracingConfig) -> tuple[SpanExporter, IO[str] | None]:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if config.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint), None
    if config.exporter == "console":
        return ConsoleSpanExporter(out=sys.stdout), None
    if config.file is None:
        raise ValueError("the file exporter needs a file (tracing_file)")
    config.file.parent.mkdir(parents=True, exist_ok=True)
    output = config.file.open("a", encoding="utf-8")
    # One span per line (the exporter's default is indented, several lines per span).
    exporter = ConsoleSpanExporter(out=output, formatter=lambda span: span.to_json(None) + "\n")
    return exporter, output


def configure_tracing(config: TracingConfig, service: str) -> bool:
    """Turn tracing on for this process as `service` (the resource's service.name) when
    `config` names an exporter; True if it did. Spans leave in batches, off the calls' path."""
    global _active
    shutdown_tracing()
    if config.exporter == "none":
        return False
    if not 0.0 <= config.sample_ratio <= 1.0:
        raise ValueError("the sampling ratio is between 0 and 1")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter, output = _exporter(config)
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _active = _Tracing(provider, provider.get_tracer(INSTRUMENTATION), output)
    return True


def shutdown_tracing() -> None:
    """Export what is buffered and turn tracing off (no-op when it is off)."""
    global _active
    active, _active = _active, None
    if active is None:
        return
    active.provider.shutdown()
    if active.output is not None:
        active.output.close()


def flush_tracing(timeout_seconds: float = 10.0) -> bool:
    """Export the spans buffered so far (blocks: call it from a thread in async code); True
    when they all went out in time, or tracing is off."""
    if _active is None:
        return True
    return _active.provider.force_flush(int(timeout_seconds * 1000))


def tracing_enabled() -> bool:
    """Whether `configure_tracing` turned tracing on."""
    return _active is not None


def tracer() -> trace.Tracer:
    """The tracer of this process (OpenTelemetry's no-op one while tracing is off)."""
    return _active.tracer if _active is not None else trace.NoOpTracer()


def extract_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The parent context a W3C `traceparent` (and `tracestate`) in `carrier` names; an empty
    context when there is none or it is malformed."""
    return _PROPAGATOR.extract(carrier)


def inject_metadata(
    metadata: list[tuple[str, str]], context: otel_context.Context | None = None
) -> None:
    """Append the `traceparent` (and `tracestate`) of the span current in `context` (default:
    the current context) to gRPC metadata."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    metadata.extend(carrier.items())


def context_field() -> str | None:
    """The current span's context as one short text field (the W3C traceparent,
    `00-<trace id>-<span id>-<flags>`, 55 characters), for a queue entry; None without a span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


def span_links(fields: Iterable[str | bytes | None]) -> list[trace.Link]:
    """Span links to the contexts in `fields` (values of `context_field`, as text or as the
    bytes Redis returns), once each; empty, missing and malformed fields are skipped, since a
    consumer must not fail an entry for its trace context."""
    links: list[trace.Link] = []
    seen: set[tuple[int, int]] = set()
    for field in fields:
        if not field:
            continue
        text = field.decode("ascii", "replace") if isinstance(field, bytes) else field
        span_context = trace.get_current_span(extract_context({TRACEPARENT: text}))
        found = span_context.get_span_context()
        key = (found.trace_id, found.span_id)
        if found.is_valid and key not in seen:
            seen.add(key)
            links.append(trace.Link(found))
    return links
