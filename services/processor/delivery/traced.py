"""The processor's `process` span: one per StoreEvents call, linked to the trace context of
every entry the call stores (the `publish` spans of ingest, streammesh.backlog.TRACE_FIELD).

The OpenTelemetry messaging conventions for a batch receive: the consumer's span links to the
producers' contexts rather than taking one as its parent, as one call stores entries of many
publishes. The storage client's span is the process span's child, so storage's server span
follows it in the same trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

from opentelemetry.trace import SpanKind

from streammesh.backlog import TRACE_FIELD
from streammesh.entries import Entry
from streammesh.mesh.tracing import span_links, tracer, tracing_enabled

__all__ = ["process_span"]


@contextlib.contextmanager
def process_span(groups: Iterable[Sequence[Entry]]) -> Iterator[None]:
    """A CONSUMER `process` span around one store of the entries in `groups`, current while
    it runs; nothing (not even reading `groups`) while tracing is off."""
    if not tracing_enabled():
        yield
        return
    entries = [fields for group in groups for _, fields in group]
    with tracer().start_as_current_span(
        "process",
        kind=SpanKind.CONSUMER,
        links=span_links(fields.get(TRACE_FIELD) for fields in entries if fields),
        attributes={
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.batch.message_count": len(entries),
        },
    ):
        yield
