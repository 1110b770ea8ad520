"""GatewayServicer handlers: check nothing themselves (AccessGuard ran first), relay to the
internal service that owns the call, and attach the caller as producer where it matters."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable

import grpc

from services.gateway.access import current_principal
from services.gateway.relay import auth_metadata, call_timeout, convert, relay
from services.gateway.revocations import RevocableStream, RevocationList
from services.gateway.tokens import Reason, TokenRejected
from services.gateway.upstream import Upstreams, upstream_errors
from streammesh.api.auth.v1 import auth_pb2
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.errors import from_status
from streammesh.refusals import REFUSAL_LINGER_SECONDS, publish_refusal, refusal_error

__all__ = ["GatewayServicer"]


def assign_missing_ids(events: Iterable[event_pb2.Event]) -> None:
    """Give id-less events an id here, before the first attempt, so the automatic retry of
    PublishBatch (and a client's re-send of an unacknowledged batch) cannot store them twice."""
    for event in events:
        if not event.id:
            event.id = str(uuid.uuid4())


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public API: account calls go to auth, publishing to ingest, reads to storage."""

    def __init__(self, upstreams: Upstreams, revocations: RevocationList) -> None:
        self._up = upstreams
        self._revocations = revocations

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

    async def QueryEvents(
        self, request: gateway_pb2.QueryEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.QueryEventsResponse:
        return await relay(
            "storage",
            self._up.storage.QueryEvents,
            request,
            storage_pb2.QueryEventsRequest,
            gateway_pb2.QueryEventsResponse,
            context,
        )

    async def CountEvents(
        self, request: gateway_pb2.CountEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CountEventsResponse:
        return await relay(
            "storage",
            self._up.storage.CountEvents,
            request,
            storage_pb2.CountEventsRequest,
            gateway_pb2.CountEventsResponse,
            context,
        )

    async def PublishBatch(
        self, request: gateway_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PublishBatchResponse:
        internal = convert(request, ingest_pb2.PublishBatchRequest)
        internal.producer = current_principal().subject
        assign_missing_ids(internal.events)
        with upstream_errors("ingest"):
            reply = await self._up.ingest.PublishBatch(internal, timeout=call_timeout(context))
        return convert(reply, gateway_pb2.PublishBatchResponse)

    async def Publish(
        self,
        request_iterator: AsyncIterator[gateway_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.PublishResponse]:
        # One ingest stream per client stream: batches flow on without waiting for each ack, and
        # acks come back in order. If ingest fails mid-stream the client sees its status and
        # re-sends what was not acknowledged (event ids make that safe). A refusal is passed on
        # as a message first, then the stream ends once the client half-closed (see
        # streammesh.refusals).
        principal = current_principal()
        producer = principal.subject
        # A revoked token ends the stream at its next batch (see RevocableStream).
        revocable = RevocableStream(
            self._revocations,
            subject=principal.subject,
            session_id=principal.session_id,
            generation=principal.generation,
        )
        request_iterator = revocable.requests(request_iterator)
        call = self._up.ingest.Publish(timeout=call_timeout(context))
        ending = asyncio.Event()

        async def forward_requests() -> None:
            forwarding = True
            # Read the client to its half-close even after forwarding stopped: that is what
            # the refusal's linger waits for.
            async for request in request_iterator:
                if not forwarding or ending.is_set() or call.done():
                    forwarding = False
                    continue
                internal = convert(request, ingest_pb2.PublishRequest)
                internal.producer = producer
                assign_missing_ids(internal.events)
                try:
                    await call.write(internal)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError):
                    forwarding = False  # the ingest call ended; the reader reports why
            if forwarding:
                with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                    await call.done_writing()

        forwarder = asyncio.create_task(forward_requests())
        try:
            with upstream_errors("ingest"):
                while (reply := await call.read()) is not grpc.aio.EOF:
                    if reply.HasField("refusal"):
                        ending.set()
                        call.cancel()  # nothing more goes to ingest; the refusal is in hand
                        error = refusal_error(reply.refusal, service="ingest")
                        yield gateway_pb2.PublishResponse(
                            refusal=publish_refusal(reply.refusal.sequence, error)
                        )
                        await asyncio.wait({forwarder}, timeout=REFUSAL_LINGER_SECONDS)
                        raise error
                    yield convert(reply, gateway_pb2.PublishResponse)
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise from_status(code, await call.details(), service="ingest")
            if revocable.revoked:
                raise TokenRejected(Reason.REVOKED)
        finally:
            forwarder.cancel()
            call.cancel()
