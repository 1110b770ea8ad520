"""The trace context ingest puts in each stream entry: the `publish` span's, in TRACE_FIELD,
through both append scripts; no field (and no span) while tracing is off or the span is not
sampled. Real Redis; spans through the file exporter."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.ingest.idempotency import IdempotencyWindow
from services.ingest.queue import StreamAppender
from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import TRACE_FIELD
from streammesh.entries import entry_body
from streammesh.mesh.tracing import (
    TracingConfig,
    configure_tracing,
    shutdown_tracing,
    span_links,
    tracer,
)
from streammesh.streams import StreamLayout
from tests.conftest import xrange_entries
from tests.mesh.test_tracing import finished_spans, spans_file  # noqa: F401 (a fixture)


async def entries(client: aioredis.Redis, layout: StreamLayout) -> list[dict[bytes, bytes]]:
    return [
        fields for stream in layout.streams() for _, fields in await xrange_entries(client, stream)
    ]


@pytest.mark.parametrize("window", [None, IdempotencyWindow(60, max_ids=1000)])
async def test_each_entry_carries_the_publish_spans_context(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    spans_file: Path,  # noqa: F811 (the imported fixture)
    window: IdempotencyWindow | None,
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=4)
    appender = StreamAppender(redis_client, layout, window=window)
    events = [event_pb2.Event(id=f"e{i}", key=f"k{i}", type="t") for i in range(20)]
    with tracer().start_as_current_span("Publish") as call:
        assert await appender.append(events, producer="p") == {}
    queued = await entries(redis_client, layout)
    assert len(queued) > 1  # several partitions: one entry each, all with the same context
    (publish,) = [s for s in finished_spans(spans_file) if s["name"] == "publish"]
    context = publish["context"]
    assert isinstance(context, dict)
    (link,) = span_links(fields[TRACE_FIELD] for fields in queued)  # the same context in all
    assert f"0x{link.context.trace_id:032x}" == context["trace_id"]
    assert f"0x{link.context.span_id:016x}" == context["span_id"]
    assert link.context.trace_flags.sampled
    assert all(TRACE_FIELD in fields for fields in queued)
    assert publish["parent_id"] == f"0x{call.get_span_context().span_id:016x}"
    assert publish["kind"] == "SpanKind.PRODUCER"
    assert publish["attributes"]["messaging.batch.message_count"] == 20
    # The field is beside the events, which read as before.
    assert sum(len(entry_body(fields).batch().events) for fields in queued) == 20


@pytest.mark.parametrize("window", [None, IdempotencyWindow(60, max_ids=1000)])
async def test_no_field_while_tracing_is_off_or_the_span_is_not_sampled(
    redis_client: aioredis.Redis,
    redis_prefix: str,
    tmp_path: Path,
    window: IdempotencyWindow | None,
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=2)
    appender = StreamAppender(redis_client, layout, window=window)
    await appender.append([event_pb2.Event(id="off", key="a", type="t")], producer="p")
    file = tmp_path / "spans.jsonl"
    configure_tracing(TracingConfig(exporter="file", file=file, sample_ratio=0.0), "ingest")
    try:
        await appender.append([event_pb2.Event(id="unsampled", key="a", type="t")], producer="p")
        assert finished_spans(file) == []
    finally:
        shutdown_tracing()
    queued = await entries(redis_client, layout)
    assert len(queued) == 2
    assert all(TRACE_FIELD not in fields for fields in queued)
