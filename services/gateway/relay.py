"""Relaying a public call to the internal service that owns it.

The public messages are declared in streammesh.gateway.v1 so the public API can evolve apart from
the internal ones; while a pair is wire-identical (tests/test_api_contract.py checks which), a
message is relayed by re-parsing its bytes as the internal type.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.gateway.access import optional_principal
from services.gateway.upstream import (
    ANONYMOUS,
    Metadata,
    caller_metadata,
    client_address,
    upstream_errors,
)
from streammesh.mesh.tenancy import tenant_metadata

__all__ = ["auth_metadata", "call_timeout", "convert", "relay", "tenant_of_caller"]

M = TypeVar("M", bound=Message)


def convert(message: Message, target: type[M]) -> M:
    """Re-type a message whose wire format `target` shares.

    Unknown fields are dropped on the way: a client must not be able to set an internal-only
    field (say, `producer`) by sending its field number, nor see internal-only reply fields.
    """
    message.DiscardUnknownFields()  # what the sender's type does not declare (a smuggled field)
    converted = target.FromString(message.SerializeToString())
    converted.DiscardUnknownFields()  # what the receiver's type does not declare (internal-only)
    return converted


# gRPC reports "no deadline" as a remaining time of centuries.
_NO_DEADLINE_SECONDS = 10 * 365 * 86400


def call_timeout(context: grpc.aio.ServicerContext) -> float | None:
    """Pass the caller's remaining deadline on; None lets the service config's timeout apply
    (unary calls only: streams get no default deadline)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < _NO_DEADLINE_SECONDS else None


def auth_metadata(context: grpc.aio.ServicerContext) -> Metadata:
    """Actor, source and (for a verified caller) tenant of the current call, for auth."""
    principal = optional_principal()
    if principal is None:
        return caller_metadata(ANONYMOUS, client_address(context.peer()))
    return caller_metadata(principal.actor, client_address(context.peer()), principal.tenant)


def tenant_of_caller() -> Metadata:
    """The tenant of the current call's verified caller, for any internal service (none on a
    public method)."""
    principal = optional_principal()
    return () if principal is None else tenant_metadata(principal.tenant)


async def relay(
    service: str,
    method: Callable[..., Awaitable[Any]],
    request: Message,
    internal_request: type[Message],
    public_response: type[M],
    context: grpc.aio.ServicerContext,
    *,
    metadata: Metadata | None = None,
) -> M:
    """Call `method` with `request` re-typed, within the caller's deadline, and re-type the
    reply; upstream failures become statuses as `upstream_errors` says. `metadata` defaults to
    the caller's tenant (`tenant_of_caller`)."""
    if metadata is None:
        metadata = tenant_of_caller()
    with upstream_errors(service):
        reply = await method(
            convert(request, internal_request), timeout=call_timeout(context), metadata=metadata
        )
    return convert(reply, public_response)
