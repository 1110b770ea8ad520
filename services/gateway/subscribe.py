"""The gateway's subscriptions (SubscribeEvents; RuleService.SubscribeAlerts uses
`relay_stream`): the caller's subscription relayed from storage's tail.

Messages pass through one at a time: the relay reads the next from storage only after the
client's stream took the previous one, so a slow client holds storage's tail back through flow
control on both hops rather than filling the gateway's memory. Storage refuses subscriptions
past its limits (RESOURCE_EXHAUSTED, passed on); a client's cancel or deadline cancels the
relay, and with it the storage call and so the tail.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.gateway.access import current_principal
from services.gateway.relay import call_timeout, convert, tenant_of_caller
from services.gateway.revocations import RevocationList
from services.gateway.tokens import Reason, TokenRejected
from services.gateway.upstream import Upstreams, upstream_errors
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.api.storage.v1 import storage_pb2

__all__ = ["relay_stream", "relay_subscription"]

M = TypeVar("M", bound=Message)

log = logging.getLogger(__name__)


async def relay_stream(
    call: Any, public_response: type[M], revocations: RevocationList
) -> AsyncIterator[M]:
    """The messages of storage's server-streaming `call` for the current caller, re-typed,
    for as long as the caller's token is not revoked: a subscription outlives the check of its
    token at the start, so the list is checked before each message (heartbeats included, so an
    idle stream ends within a heartbeat) and a revoked token ends the stream UNAUTHENTICATED, as
    a new call would be refused. The call is cancelled when the relay ends for any reason (the
    client left, its deadline passed)."""
    principal = current_principal()
    try:
        with upstream_errors("storage"):
            async for message in call:
                if revocations.revoked(
                    principal.subject,
                    principal.session_id,
                    principal.generation,
                    tenant=principal.tenant,
                    tenant_generation=principal.tenant_generation,
                ):
                    log.info("subscription of session %s ended: revoked", principal.session_id)
                    raise TokenRejected(Reason.REVOKED)
                yield convert(message, public_response)
    finally:
        call.cancel()


async def relay_subscription(
    upstreams: Upstreams,
    revocations: RevocationList,
    request: gateway_pb2.SubscribeEventsRequest,
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[gateway_pb2.SubscribeEventsResponse]:
    """Storage's SubscribeEvents for the current caller (its tenant and principal filled in:
    the resume token is bound to them), each message re-typed for the public API."""
    internal = convert(request, storage_pb2.SubscribeEventsRequest)
    principal = current_principal()
    internal.tenant, internal.principal = principal.tenant, principal.subject
    call = upstreams.storage.SubscribeEvents(
        internal, timeout=call_timeout(context), metadata=tenant_of_caller()
    )
    async for message in relay_stream(call, gateway_pb2.SubscribeEventsResponse, revocations):
        yield message
