"""The CLI's login session: tokens kept in `<state>/session.json` (mode 0600), refreshed when the
access token is about to expire, or when the gateway refuses it (auth revoked it: a role change,
for instance, ends the access tokens but not the session). The refresh token is single use, so
the file is rewritten after every refresh, atomically, before the new tokens are used."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.cli.stack import StackConfig, replica_addresses
from streammesh.client import GatewayClient

__all__ = ["NotLoggedIn", "Session", "gateway_client", "logged_in_client", "with_session"]

T = TypeVar("T")

REFRESH_MARGIN_SECONDS = 30


class NotLoggedIn(RuntimeError):
    """No usable session: run `streammesh login`."""


@dataclass(frozen=True)
class Session:
    username: str
    access_token: str
    refresh_token: str
    access_expires_at: float
    refresh_expires_at: float
    roles: tuple[str, ...]
    tenant: str = "default"

    @classmethod
    def from_tokens(cls, username: str, tokens: gateway_pb2.SessionTokens) -> Session:
        now = time.time()
        return cls(
            username=username,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            access_expires_at=now + tokens.expires_in.ToTimedelta().total_seconds(),
            refresh_expires_at=now + tokens.refresh_expires_in.ToTimedelta().total_seconds(),
            roles=tuple(tokens.roles),
            tenant=tokens.tenant or "default",
        )

    @staticmethod
    def path(config: StackConfig) -> Path:
        return config.state_dir / "session.json"

    def save(self, config: StackConfig) -> None:
        path = self.path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle)
        os.replace(temporary, path)

    @classmethod
    def load(cls, config: StackConfig) -> Session:
        try:
            data = json.loads(cls.path(config).read_text())
        except (OSError, ValueError) as error:
            raise NotLoggedIn("not logged in; run `streammesh login <username>`") from error
        data["roles"] = tuple(data.get("roles", ()))
        return cls(**data)

    @classmethod
    def forget(cls, config: StackConfig) -> None:
        cls.path(config).unlink(missing_ok=True)


def gateway_client(config: StackConfig) -> GatewayClient:
    """A client of every gateway replica the stack records (balanced round_robin, health-checked
    by the mesh client), so that one replica draining or gone does not fail the command."""
    targets = ",".join(replica_addresses(config, "gateway"))
    return GatewayClient(targets, config.pki_dir / "ca.pem")


@asynccontextmanager
async def logged_in_client(config: StackConfig) -> AsyncIterator[GatewayClient]:
    """A client carrying the saved session's access token, refreshed first if it is (nearly)
    expired. Raises NotLoggedIn when there is no session or it can no longer be refreshed."""
    session = Session.load(config)
    async with gateway_client(config) as client:
        client.access_token = session.access_token
        client.refresh_token = session.refresh_token
        if time.time() > session.access_expires_at - REFRESH_MARGIN_SECONDS:
            if time.time() > session.refresh_expires_at:
                Session.forget(config)
                raise NotLoggedIn("the session has expired; run `streammesh login` again")
            tokens = await client.refresh()
            Session.from_tokens(session.username, tokens).save(config)
        yield client


async def with_session(config: StackConfig, call: Callable[[GatewayClient], Awaitable[T]]) -> T:
    """`call(client)` with the saved session. When the gateway refuses the access token, it was
    revoked before it expired (a role change, say): refresh once, which brings the current
    roles or fails if the session itself ended, and call again. The refused call never reached
    the service behind the gateway, so calling again is safe."""
    async with logged_in_client(config) as client:
        try:
            return await call(client)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
        username = Session.load(config).username
        tokens = await client.refresh()
        Session.from_tokens(username, tokens).save(config)
        return await call(client)
