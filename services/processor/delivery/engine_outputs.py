"""What a partition's engine emitted, as the StoreEngineOutputs request storage takes: alerts,
window results and late events (of windows and of rules) as protobuf, with the checkpoint or
the fence that the call is written under."""

from __future__ import annotations

import json

from services.processor.engine.partition import PartitionOutputs
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.storage.v1 import definitions_pb2 as pb

__all__ = ["MAX_ITEMS", "outputs_request"]

MAX_ITEMS = 10_000
"""Items of one StoreEngineOutputs call at most (storage refuses more)."""


def outputs_request(
    out: PartitionOutputs,
    *,
    checkpoint: pb.EngineCheckpoint | None = None,
    fence: pb.PartitionFence | None = None,
) -> pb.StoreEngineOutputsRequest:
    """One batch's outputs as a StoreEngineOutputsRequest, under `checkpoint` (state saved with
    them) or `fence` (outputs only); give at most one."""
    if checkpoint is not None and fence is not None:
        raise ValueError("give a checkpoint or a fence, not both")
    message = pb.StoreEngineOutputsRequest(checkpoint=checkpoint, fence=fence)
    for a in out.alerts:
        message.alerts.append(
            common.Alert(
                alert_id=a.alert_id,
                tenant=a.tenant,
                rule_id=a.rule_id,
                rule_version=a.rule_version,
                rule_kind=a.kind,
                key=a.key,
                first_event_time_unix_nanos=a.first_event_time_nanos,
                last_event_time_unix_nanos=a.last_event_time_nanos,
                event_ids=a.event_ids,
                detail_json=json.dumps(dict(a.detail)),
            )
        )
    for r in out.window_results:
        message.window_results.append(
            common.WindowResult(
                tenant=r.tenant,
                window_id=r.window_id,
                window_version=r.window_version,
                partition=r.partition,
                group=r.group,
                start_unix_nanos=r.start_nanos,
                end_unix_nanos=r.end_nanos,
                revision=r.revision,
                values_json=json.dumps(dict(r.values)),
                watermark_unix_nanos=r.watermark_nanos,
                retracted=r.retracted,
            )
        )
    for w in out.window_late:
        message.late_events.append(
            common.LateEvent(
                tenant=w.tenant,
                source=common.DEFINITION_KIND_WINDOW,
                definition_id=w.window_id,
                definition_version=w.window_version,
                event_id=w.event_id,
                event_key=w.event_key,
                event_time_unix_nanos=w.event_time_nanos,
                watermark_unix_nanos=w.watermark_nanos,
                window_start_unix_nanos=w.window_start_nanos,
                window_end_unix_nanos=w.window_end_nanos,
                reason=w.reason,
            )
        )
    for x in out.rule_late:
        message.late_events.append(
            common.LateEvent(
                tenant=x.tenant,
                source=common.DEFINITION_KIND_RULE,
                definition_id=x.rule_id,
                definition_version=x.rule_version,
                event_id=x.event_id,
                event_key=x.event_key,
                event_time_unix_nanos=x.event_time_nanos,
                watermark_unix_nanos=x.watermark_nanos,
                reason=x.reason,
            )
        )
    return message
