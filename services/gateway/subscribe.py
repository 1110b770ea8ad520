"""The gateway's subscriptions (SubscribeEvents; RuleService.SubscribeAlerts uses
`relay_stream`): the caller's subscription relayed from storage's tail.

Messages pass through one at a time: the relay reads the next from storage only after the
client's stream took the previous one, so a slow client holds storage's tail back through flow
control on both hops rather than filling the gateway's memory. Storage refuses subscriptions
past its limits (RESOURCE_EXHAUSTED, passed on); a client's cancel or deadline cancels the
relay, and with it the storage call and so the tail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.gateway.access import current_principal
from services.gateway.relay import call_timeout, convert, tenant_of_caller
from services.gateway.upstream import Upstreams, upstream_errors
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.api.storage.v1 import storage_pb2

__all__ = ["relay_stream", "relay_subscription"]

M = TypeVar("M", bound=Message)


async def relay_stream(call: Any, public_response: type[M]) -> AsyncIterator[M]:
    """The messages of storage's server-streaming `call`, re-typed; the call is cancelled when
    the relay ends for any reason (the client left, its deadline passed)."""
    try:
        with upstream_errors("storage"):
            async for message in call:
                yield convert(message, public_response)
    finally:
        call.cancel()


async def relay_subscription(
    upstreams: Upstreams,
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
    async for message in relay_stream(call, gateway_pb2.SubscribeEventsResponse):
        yield message
