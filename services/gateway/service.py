"""GatewayServicer handlers: check nothing themselves (AccessGuard ran first), relay to the
internal service that owns the call, and attach the caller as producer where it matters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from services.gateway.access import current_principal
from services.gateway.publish import PublishRelay, RelayLimits
from services.gateway.relay import auth_metadata, call_timeout, convert, relay, tenant_of_caller
from services.gateway.revocations import RevocableStream, RevocationList
from services.gateway.subscribe import relay_subscription
from services.gateway.tokens import JwksCache, Reason, TokenRejected, public_keys
from services.gateway.upstream import Upstreams, upstream_errors
from streammesh.api.auth.v1 import auth_pb2
from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.envelope import assign_missing_ids

__all__ = ["GatewayServicer"]

M = TypeVar("M", bound=Message)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public API: account calls go to auth, publishing to ingest, reads to storage; the
    token keys come from the gateway's own cache of auth's JWKS."""

    def __init__(
        self,
        upstreams: Upstreams,
        keys: JwksCache,
        limits: RelayLimits,
        revocations: RevocationList,
    ) -> None:
        self._up = upstreams
        self._keys = keys
        self._limits = limits
        self._revocations = revocations

    async def GetJwks(
        self, request: gateway_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetJwksResponse:
        keys, fresh_for = await self._keys.published()
        seconds = int(fresh_for)
        # The HTTP caching convention, for clients (and proxies) that read headers only.
        await context.send_initial_metadata((("cache-control", f"max-age={seconds}"),))
        return gateway_pb2.GetJwksResponse(
            keys=public_keys(keys),
            max_age=Duration(seconds=seconds),
        )

    async def Register(
        self, request: gateway_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RegisterResponse:
        return await relay(
            "auth",
            self._up.auth.Register,
            request,
            auth_pb2.RegisterRequest,
            gateway_pb2.RegisterResponse,
            context,
            metadata=auth_metadata(context),
        )

    async def BeginTotpEnrollment(
        self, request: gateway_pb2.BeginTotpEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.BeginTotpEnrollmentResponse:
        return await relay(
            "auth",
            self._up.auth.BeginTotpEnrollment,
            request,
            auth_pb2.BeginTotpEnrollmentRequest,
            gateway_pb2.BeginTotpEnrollmentResponse,
            context,
            metadata=auth_metadata(context),
        )

    async def ConfirmTotpEnrollment(
        self, request: gateway_pb2.ConfirmTotpEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ConfirmTotpEnrollmentResponse:
        return await relay(
            "auth",
            self._up.auth.ConfirmTotpEnrollment,
            request,
            auth_pb2.ConfirmTotpEnrollmentRequest,
            gateway_pb2.ConfirmTotpEnrollmentResponse,
            context,
            metadata=auth_metadata(context),
        )

    async def StartLogin(
        self, request: gateway_pb2.StartLoginRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.StartLoginResponse:
        return await relay(
            "auth",
            self._up.auth.StartLogin,
            request,
            auth_pb2.StartLoginRequest,
            gateway_pb2.StartLoginResponse,
            context,
            metadata=auth_metadata(context),
        )

    async def CompleteLogin(
        self, request: gateway_pb2.CompleteLoginRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CompleteLoginResponse:
        return await relay(
            "auth",
            self._up.auth.CompleteLogin,
            request,
            auth_pb2.CompleteLoginRequest,
            gateway_pb2.CompleteLoginResponse,
            context,
            metadata=auth_metadata(context),
        )

    async def RefreshSession(
        self, request: gateway_pb2.RefreshSessionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RefreshSessionResponse:
        return await relay(
            "auth",
            self._up.auth.RefreshSession,
            request,
            auth_pb2.RefreshSessionRequest,
            gateway_pb2.RefreshSessionResponse,
            context,
            metadata=auth_metadata(context),
        )

    async def Logout(
        self, request: gateway_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.LogoutResponse:
        return await relay(
            "auth",
            self._up.auth.Logout,
            request,
            auth_pb2.LogoutRequest,
            gateway_pb2.LogoutResponse,
            context,
            metadata=auth_metadata(context),
        )

    async def _read_storage(
        self,
        name: str,
        internal: Message,
        public_response: type[M],
        context: grpc.aio.ServicerContext,
    ) -> M:
        """Call storage's `name` with the re-typed request, its tenant filled in."""
        internal.tenant = current_principal().tenant  # type: ignore[attr-defined]
        with upstream_errors("storage"):
            reply = await getattr(self._up.storage, name)(
                internal, timeout=call_timeout(context), metadata=tenant_of_caller()
            )
        return convert(reply, public_response)

    async def QueryEvents(
        self, request: gateway_pb2.QueryEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.QueryEventsResponse:
        internal = convert(request, storage_pb2.QueryEventsRequest)
        # The page token is bound to the principal too: storage refuses it from anyone else.
        internal.principal = current_principal().subject
        return await self._read_storage(
            "QueryEvents", internal, gateway_pb2.QueryEventsResponse, context
        )

    async def SubscribeEvents(
        self, request: gateway_pb2.SubscribeEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.SubscribeEventsResponse]:
        async for message in relay_subscription(self._up, self._revocations, request, context):
            yield message

    async def CountEvents(
        self, request: gateway_pb2.CountEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CountEventsResponse:
        internal = convert(request, storage_pb2.CountEventsRequest)
        return await self._read_storage(
            "CountEvents", internal, gateway_pb2.CountEventsResponse, context
        )

    async def AggregateEvents(
        self, request: gateway_pb2.AggregateEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AggregateEventsResponse:
        internal = convert(request, storage_pb2.AggregateEventsRequest)
        return await self._read_storage(
            "AggregateEvents", internal, gateway_pb2.AggregateEventsResponse, context
        )

    async def PublishBatch(
        self, request: gateway_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PublishBatchResponse:
        internal = convert(request, ingest_pb2.PublishBatchRequest)
        principal = current_principal()
        internal.producer = principal.subject
        assign_missing_ids(internal.events)
        with upstream_errors("ingest"):
            reply = await self._up.ingest.PublishBatch(
                internal, timeout=call_timeout(context), metadata=tenant_of_caller()
            )
        return convert(reply, gateway_pb2.PublishBatchResponse)

    async def Publish(
        self,
        request_iterator: AsyncIterator[gateway_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.PublishResponse]:
        # Batches flow on without waiting for each ack, and acks come back in order. The
        # relay carries the stream over new ingest streams when one ends (max connection age,
        # a replica restarting), and recycles the client's stream at its maximum age; a
        # refusal is passed on as a message first (see services.gateway.publish).
        principal = current_principal()
        # A revoked token ends the stream at its next batch, as if the client had half-closed:
        # what was forwarded is still acknowledged, then the stream ends UNAUTHENTICATED.
        revocable = RevocableStream(
            self._revocations,
            subject=principal.subject,
            session_id=principal.session_id,
            generation=principal.generation,
            tenant=principal.tenant,
            tenant_generation=principal.tenant_generation,
        )
        metadata = tenant_of_caller()
        relay = PublishRelay(
            lambda: self._up.ingest.Publish(timeout=call_timeout(context), metadata=metadata),
            self._limits,
            producer=principal.subject,
        )
        with upstream_errors("ingest"):
            async for reply in relay.relay(revocable.requests(request_iterator)):
                yield reply
        if revocable.revoked:
            raise TokenRejected(Reason.REVOKED)
