"""A small async client for the gateway's public API (the seed of the StreamMesh SDK).

async with GatewayClient("127.0.0.1:50051", ca_file) as client:
    await client.login("ada", password, code)
    async for ack in client.publish(batches):
        ...

The connection is a mesh client (streammesh.mesh.client): round_robin over the gateway replicas
named (`"10.0.0.1:50051,10.0.0.2:50051"` or `"dns:///gateway.example:50051"`), retries of the
methods the protos declare safe to retry, and a default deadline for every unary call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    rules_pb2,
    rules_pb2_grpc,
    schema_registry_pb2,
    schema_registry_pb2_grpc,
)
from streammesh.envelope import assign_missing_ids
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles, parse_targets
from streammesh.refusals import is_recycled, raise_if_refused

__all__ = ["GATEWAY_SERVICES", "GatewayClient", "SettlingWait", "gateway_config"]

GATEWAY_SERVICES = (
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    schema_registry_pb2.DESCRIPTOR.services_by_name["SchemaRegistryService"],
    rules_pb2.DESCRIPTOR.services_by_name["RuleService"],
)
"""The services of the gateway's public listener."""


def gateway_config(
    target: str, ca_file: Path, *, server_name: str = "gateway", timeout_seconds: float = 30.0
) -> MeshClientConfig:
    """The mesh client config of a connection to the gateway: TLS verified against `ca_file`
    (no client certificate: callers authenticate with tokens), `timeout_seconds` for each
    unary call that sets no timeout of its own."""
    return MeshClientConfig(
        server_name=server_name,
        targets=parse_targets(target),
        tls=TlsFiles(ca_file),
        services=GATEWAY_SERVICES,
        timeout_seconds=timeout_seconds,
    )


class SettlingWait:
    """The pauses of a reader that follows QueryEvents' next_page_token: a page that comes
    back empty with a token ends at events not settled yet (a write that started before they
    were stored is still in flight; README "Querying events"), so the reader asks again after a
    pause, from `first` doubling to `longest`, for at most `budget` seconds of empty pages in a
    row (a page with events starts over). `next(page)` says whether to ask for another page."""

    def __init__(
        self,
        *,
        first: float = 0.05,
        longest: float = 1.0,
        budget: float = 10.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._first, self._longest, self._budget, self._sleep = first, longest, budget, sleep
        self._pause, self._waited = first, 0.0
        self.gave_up = False
        """True once `next` refused a page that had a token: the budget was spent."""

    async def next(self, page: gateway_pb2.QueryEventsResponse) -> bool:
        """After `page`: False at the end (no token) or when the budget is spent; else True,
        after a pause when the page was empty."""
        if not page.next_page_token:
            return False
        if page.events:
            self._pause, self._waited = self._first, 0.0
            return True
        if self._waited >= self._budget:
            self.gave_up = True
            return False
        pause = min(self._pause, self._budget - self._waited)
        await self._sleep(pause)
        self._waited += pause
        self._pause = min(self._pause * 2, self._longest)
        return True


class GatewayClient:
    """TLS to the gateway (verified against `ca_file`), bearer token after login()."""

    def __init__(self, target: str, ca_file: Path, *, server_name: str = "gateway") -> None:
        mesh = MeshClient(gateway_config(target, ca_file, server_name=server_name))
        self.mesh = mesh
        """The connection (its channel, service config and interceptors)."""
        self._stub = mesh.stub(gateway_pb2_grpc.GatewayServiceStub)
        self.admin = mesh.stub(admin_pb2_grpc.AdminServiceStub)
        """AdminService stub; pass `metadata=client.bearer()` with an admin's token."""
        self.schemas = mesh.stub(schema_registry_pb2_grpc.SchemaRegistryServiceStub)
        """SchemaRegistryService stub; pass `metadata=client.bearer()`."""
        self.rules = mesh.stub(rules_pb2_grpc.RuleServiceStub)
        """RuleService stub (rules, windows, alerts, window results); pass `metadata=client.bearer()`."""
        self.access_token = ""
        self.refresh_token = ""
        self.recycled_streams = 0
        """Publish streams the gateway recycled and publish() re-opened (for monitoring)."""

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.mesh.close()

    def bearer(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the access token (empty before login)."""
        return self._auth()

    def _auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.access_token}"),) if self.access_token else ()

    async def register(self, username: str, password: str) -> str:
        reply = await self._stub.Register(
            gateway_pb2.RegisterRequest(username=username, password=password)
        )
        return str(reply.user_id)

    async def begin_totp(
        self, username: str, password: str, *, tenant: str = ""
    ) -> gateway_pb2.BeginTotpEnrollmentResponse:
        """Start TOTP enrolment of `username` in `tenant` (empty: "default")."""
        reply: gateway_pb2.BeginTotpEnrollmentResponse = await self._stub.BeginTotpEnrollment(
            gateway_pb2.BeginTotpEnrollmentRequest(
                username=username, password=password, tenant=tenant
            ),
        )
        return reply

    async def confirm_totp(
        self, username: str, password: str, code: str, *, tenant: str = ""
    ) -> list[str]:
        """Activate TOTP; returns the one-time recovery codes (shown once)."""
        reply = await self._stub.ConfirmTotpEnrollment(
            gateway_pb2.ConfirmTotpEnrollmentRequest(
                username=username, password=password, code=code, tenant=tenant
            ),
        )
        return list(reply.recovery_codes)

    async def start_login(self, username: str, password: str, *, tenant: str = "") -> str:
        """Password step (in `tenant`; empty: "default"): returns the MFA challenge to answer
        with complete_login()."""
        reply = await self._stub.StartLogin(
            gateway_pb2.StartLoginRequest(username=username, password=password, tenant=tenant),
        )
        return str(reply.challenge)

    async def complete_login(
        self, challenge: str, *, totp_code: str = "", recovery_code: str = ""
    ) -> gateway_pb2.SessionTokens:
        """Second factor: a TOTP code or a recovery code. Keeps the tokens for later calls."""
        request = gateway_pb2.CompleteLoginRequest(challenge=challenge)
        if recovery_code:
            request.recovery_code = recovery_code
        else:
            request.totp_code = totp_code
        reply: gateway_pb2.CompleteLoginResponse = await self._stub.CompleteLogin(request)
        self._keep(reply.tokens)
        return reply.tokens

    async def login(
        self, username: str, password: str, code: str, *, tenant: str = ""
    ) -> gateway_pb2.SessionTokens:
        """Both login steps with a TOTP code."""
        challenge = await self.start_login(username, password, tenant=tenant)
        return await self.complete_login(challenge, totp_code=code)

    async def refresh(self) -> gateway_pb2.SessionTokens:
        """Spend the refresh token for new tokens (the old refresh token stops working)."""
        reply: gateway_pb2.RefreshSessionResponse = await self._stub.RefreshSession(
            gateway_pb2.RefreshSessionRequest(refresh_token=self.refresh_token)
        )
        self._keep(reply.tokens)
        return reply.tokens

    async def logout(self) -> None:
        await self._stub.Logout(gateway_pb2.LogoutRequest(refresh_token=self.refresh_token))
        self.access_token = self.refresh_token = ""

    def _keep(self, tokens: gateway_pb2.SessionTokens) -> None:
        self.access_token = tokens.access_token
        self.refresh_token = tokens.refresh_token

    async def publish(
        self,
        batches: AsyncIterable[Sequence[event_pb2.Event]],
        *,
        timeout: float | None = None,
        window: int = 64,
    ) -> AsyncIterator[gateway_pb2.PublishResponse]:
        """Stream batches; yields one acknowledgement per batch, in order, with sequences 1, 2,
        ... At most `window` batches are in flight. A refused batch raises
        grpc.aio.AioRpcError with the refusal's status (code, message, details) and ends the
        stream: nothing from that batch on was accepted.

        Events without an id get one here, before the first attempt, so that a resend cannot
        store them twice. When the gateway recycles the stream (UNAVAILABLE with ErrorInfo
        reason STREAM_RECYCLED; see the README's Durability section), a new stream is opened
        at once and the batches not acknowledged are resent with the same sequences and ids:
        the caller sees neither. `timeout` bounds the whole publication."""
        deadline = None if timeout is None else time.monotonic() + timeout
        books = _PublishBooks(batches, window)
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                call = self._stub.Publish(metadata=self._auth(), timeout=remaining)
                async for ack in books.stream(call):
                    yield ack
                if books.finished:
                    return
                self.recycled_streams += 1
        finally:
            books.close()

    async def publish_batch(
        self, events: Sequence[event_pb2.Event]
    ) -> gateway_pb2.PublishBatchResponse:
        reply: gateway_pb2.PublishBatchResponse = await self._stub.PublishBatch(
            gateway_pb2.PublishBatchRequest(events=events), metadata=self._auth()
        )
        return reply

    async def count(
        self, event_filter: event_pb2.EventFilter, *, filter_expression: str = ""
    ) -> int:
        """How many stored events match the filter and the AIP-160 `filter_expression`."""
        reply = await self._stub.CountEvents(
            gateway_pb2.CountEventsRequest(
                filter=event_filter, filter_expression=filter_expression
            ),
            metadata=self._auth(),
        )
        return int(reply.count)

    async def query(
        self,
        event_filter: event_pb2.EventFilter,
        *,
        page_size: int = 100,
        page_token: str = "",
        filter_expression: str = "",
    ) -> gateway_pb2.QueryEventsResponse:
        """One page of matching events; pass its next_page_token (with the same filter) for
        the next."""
        reply: gateway_pb2.QueryEventsResponse = await self._stub.QueryEvents(
            gateway_pb2.QueryEventsRequest(
                filter=event_filter,
                page_size=page_size,
                page_token=page_token,
                filter_expression=filter_expression,
            ),
            metadata=self._auth(),
        )
        return reply

    async def subscribe(
        self, request: gateway_pb2.SubscribeEventsRequest
    ) -> AsyncIterator[gateway_pb2.SubscribeEventsResponse]:
        """The messages of a live subscription (events, the `current` marker, heartbeats), until
        the caller stops iterating (which cancels the call) or the stream fails."""
        async for message in _messages(self._stub.SubscribeEvents(request, metadata=self._auth())):
            yield message

    async def subscribe_alerts(
        self, request: rules_pb2.SubscribeAlertsRequest
    ) -> AsyncIterator[rules_pb2.SubscribeAlertsResponse]:
        """The messages of a live alert subscription, as `subscribe` for events."""
        async for message in _messages(self.rules.SubscribeAlerts(request, metadata=self._auth())):
            yield message

    async def subscribe_window_results(
        self, request: rules_pb2.SubscribeWindowResultsRequest
    ) -> AsyncIterator[rules_pb2.SubscribeWindowResultsResponse]:
        """The messages of a live window-result subscription, as `subscribe` for events."""
        call = self.rules.SubscribeWindowResults(request, metadata=self._auth())
        async for message in _messages(call):
            yield message

    async def aggregate(
        self, request: gateway_pb2.AggregateEventsRequest
    ) -> gateway_pb2.AggregateEventsResponse:
        """Count (and sum/min/max/avg of a numeric payload field) per key or type."""
        reply: gateway_pb2.AggregateEventsResponse = await self._stub.AggregateEvents(
            request, metadata=self._auth(), timeout=60
        )
        return reply

    async def query_all(
        self,
        event_filter: event_pb2.EventFilter,
        *,
        page_size: int = 1000,
        wait: SettlingWait | None = None,
    ) -> AsyncIterator[event_pb2.StoredEvent]:
        """Every stored event matching the filter, page after page, in store order, waiting
        (`wait`, SettlingWait() by default) on pages that are empty until the newest events
        settle; TimeoutError when they stay unsettled past its budget."""
        token, wait = "", wait or SettlingWait()
        while True:
            page = await self.query(event_filter, page_size=page_size, page_token=token)
            for event in page.events:
                yield event
            if not await wait.next(page):
                if wait.gave_up:
                    raise TimeoutError("stored events stayed unsettled: a write is still open")
                return
            token = page.next_page_token


async def _messages(call: Any) -> AsyncIterator[Any]:
    """A server stream's messages; the call is cancelled when the reader stops."""
    try:
        async for message in call:
            yield message
    finally:
        call.cancel()


class _PublishBooks:
    """What one publish() call sent and what is not acknowledged yet, across the streams it
    takes. The caller's iterator is read through one pending `anext` that outlives a stream,
    so a stream ending while a batch is being produced never loses or repeats it."""

    def __init__(self, batches: AsyncIterable[Sequence[event_pb2.Event]], window: int) -> None:
        self._source = aiter(batches)
        self._window = max(1, window)
        self._unacked: deque[gateway_pb2.PublishRequest] = deque()
        self._room = asyncio.Event()
        self._pull: asyncio.Future[Sequence[event_pb2.Event] | None] | None = None
        self._sequence = 0
        self._exhausted = False
        self.finished = False

    def close(self) -> None:
        """Stop a pending read of the caller's iterator (the caller stopped consuming)."""
        if self._pull is not None:
            self._pull.cancel()

    async def _next(self) -> Sequence[event_pb2.Event] | None:
        try:
            return await anext(self._source)
        except StopAsyncIteration:
            return None

    async def _next_request(self) -> gateway_pb2.PublishRequest | None:
        if self._exhausted:
            return None
        if self._pull is None:
            self._pull = asyncio.ensure_future(self._next())
        # Shielded: cancelling this stream's writer must not cancel the caller's generator.
        batch = await asyncio.shield(self._pull)
        self._pull = None
        if batch is None:
            self._exhausted = True
            return None
        self._sequence += 1
        request = gateway_pb2.PublishRequest(sequence=self._sequence, events=batch)
        assign_missing_ids(request.events)
        return request

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        # A write that fails means the stream ended: the reader gets its status. Anything else
        # (the caller's iterator raised) fails the task, and the done callback ends the call.
        with contextlib.suppress(
            grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
        ):
            for request in list(self._unacked):
                await call.write(request)
            while True:
                while len(self._unacked) >= self._window:
                    self._room.clear()
                    await self._room.wait()
                pulled = await self._next_request()
                if pulled is None:
                    await call.done_writing()
                    return
                self._unacked.append(pulled)
                await call.write(pulled)

    async def stream(
        self, call: grpc.aio.StreamStreamCall
    ) -> AsyncIterator[gateway_pb2.PublishResponse]:
        """Resend what is unacknowledged on `call`, then go on with new batches; yields the
        acknowledgements. Sets `finished` when everything was sent and acknowledged; returns
        without it when the gateway recycled the stream."""
        writer = asyncio.ensure_future(self._write(call))

        def end_call_if_failed(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                call.cancel()

        writer.add_done_callback(end_call_if_failed)
        try:
            while (ack := await call.read()) is not grpc.aio.EOF:
                if ack.HasField("refusal") and is_recycled(ack.refusal):
                    return
                raise_if_refused(ack)
                self._unacked.popleft()
                self._room.set()
                yield ack
            self.finished = True
        except grpc.aio.AioRpcError:
            failure = writer.exception() if writer.done() and not writer.cancelled() else None
            if failure is not None:
                raise failure from None  # the caller's iterator failed, not the stream
            raise
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            call.cancel()  # a no-op once the stream ended; else it stops our writes
