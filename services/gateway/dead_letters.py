"""Dead-letter administration, served by the gateway itself rather than relayed to auth: listing
and inspecting are relayed to storage (the public messages are wire-identical to storage's,
tests/test_api_contract.py checks it); a replay reads the dead letter from storage, publishes its
events again through ingest and then marks it replayed at storage.

A replay keeps each event's id and original producer, so it is idempotent: an event already
stored (a second replay, or a batch that failed after partly succeeding elsewhere) is not stored
again. An event published without an event time keeps its original time (its first ingest time)
instead of taking the replay's. The replayed events join the end of their partition, behind
anything published since: a replay does not restore their place in per-key order.

Auth cannot audit these calls (it does not see them), so each is recorded through the gateway's
audit trail with the admin as actor: `dead_letter_list`, `dead_letter_get` and
`dead_letter_replay`, outcome success or failure (reason: the status code, lower case).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from services.gateway.access import current_principal
from services.gateway.audit import FAILURE, SUCCESS, AuditTrail, admin_action
from services.gateway.relay import call_timeout, convert, relay, tenant_of_caller
from services.gateway.upstream import Upstreams, client_address, upstream_errors
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import admin_pb2
from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.errors import FailedPrecondition, InvalidArgument, StreamMeshError

__all__ = ["LIST", "READ", "REPLAY", "DeadLetterAdmin", "replay_batches"]

LIST = "dead_letter_list"
READ = "dead_letter_get"
REPLAY = "dead_letter_replay"


def replay_batches(
    found: storage_pb2.GetDeadLetterResponse,
) -> list[ingest_pb2.PublishBatchRequest]:
    """The dead letter's events as ingest batches, one per run of events with the same
    producer, in batch order; FailedPrecondition when there is nothing that can be replayed
    safely."""
    dead = found.dead_letter
    if not dead.has_batch or not found.events:
        raise FailedPrecondition(
            f"dead letter {dead.id} holds no batch to replay (the entry did not decode)"
        )
    batches: list[ingest_pb2.PublishBatchRequest] = []
    for index, queued in enumerate(found.events):
        if not queued.event.id:
            raise FailedPrecondition(
                f"event {index} of dead letter {dead.id} has no id; replaying it could store it "
                "twice"
            )
        event = event_pb2.Event()
        event.CopyFrom(queued.event)
        if not event.HasField("event_time") and queued.HasField("ingest_time"):
            event.event_time.CopyFrom(queued.ingest_time)
        if not batches or batches[-1].producer != queued.producer:
            batches.append(ingest_pb2.PublishBatchRequest(producer=queued.producer, replay=True))
        batches[-1].events.append(event)
    return batches


class DeadLetterAdmin:
    """The three dead-letter calls of AdminService (AccessGuard admitted admins only)."""

    def __init__(self, upstreams: Upstreams, audit: AuditTrail) -> None:
        self._up = upstreams
        self._audit = audit

    @contextmanager
    def _audited(
        self, context: grpc.aio.ServicerContext, action: str, details: dict[str, str]
    ) -> Iterator[None]:
        """Record the call's outcome; `details` may be filled in by the call before it ends."""
        actor = current_principal().actor
        outcome, reason = FAILURE, "internal"
        try:
            yield
            outcome, reason = SUCCESS, ""
        except StreamMeshError as error:
            reason = error.code.name.lower()
            raise
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            self._audit.record(
                admin_action(
                    action=action,
                    outcome=outcome,
                    reason=reason,
                    actor=actor,
                    source=client_address(context.peer()),
                    details=details,
                )
            )

    async def list_dead_letters(
        self, request: admin_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDeadLettersResponse:
        details: dict[str, str] = {}
        if request.HasField("partition"):
            details["partition"] = str(request.partition)
        if request.HasField("replayed"):
            details["replayed"] = str(request.replayed).lower()
        with self._audited(context, LIST, details):
            reply = await relay(
                "storage",
                self._up.storage.ListDeadLetters,
                request,
                storage_pb2.ListDeadLettersRequest,
                admin_pb2.ListDeadLettersResponse,
                context,
            )
            details["count"] = str(len(reply.dead_letters))
        return reply

    async def get_dead_letter(
        self, request: admin_pb2.GetDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetDeadLetterResponse:
        with self._audited(context, READ, {"dead_letter_id": str(request.id)}):
            return await relay(
                "storage",
                self._up.storage.GetDeadLetter,
                request,
                storage_pb2.GetDeadLetterRequest,
                admin_pb2.GetDeadLetterResponse,
                context,
            )

    async def replay(
        self, request: admin_pb2.ReplayDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReplayDeadLetterResponse:
        details = {"dead_letter_id": str(request.id)}
        with self._audited(context, REPLAY, details):
            if request.id == 0:
                raise InvalidArgument("id is required", field_violations=[("id", "required")])
            with upstream_errors("storage"):
                found = await self._up.storage.GetDeadLetter(
                    storage_pb2.GetDeadLetterRequest(id=request.id),
                    timeout=call_timeout(context),
                    metadata=tenant_of_caller(),
                )
            batches = replay_batches(found)
            republished = 0
            for batch in batches:
                # INVALID_ARGUMENT (ingest refuses the events again) reaches the caller as it is,
                # and the dead letter stays unmarked.
                with upstream_errors("ingest"):
                    reply = await self._up.ingest.PublishBatch(
                        batch, timeout=call_timeout(context), metadata=tenant_of_caller()
                    )
                republished += reply.accepted
            details["events"] = str(republished)
            with upstream_errors("storage"):
                marked = await self._up.storage.MarkDeadLetterReplayed(
                    storage_pb2.MarkDeadLetterReplayedRequest(
                        id=request.id, replayed_by=current_principal().actor
                    ),
                    timeout=call_timeout(context),
                    metadata=tenant_of_caller(),
                )
        return admin_pb2.ReplayDeadLetterResponse(
            dead_letter=convert(marked.dead_letter, admin_pb2.DeadLetter), republished=republished
        )
