"""AccessGuard on its own: default deny, the bearer header's parsing, and one audit event per
refusal (with the reason, the method, the client's address and, when known, the actor)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.gateway.access import (
    METHOD_ACCESS,
    Access,
    AccessGuard,
    current_principal,
    optional_principal,
)
from services.gateway.audit import AuditTrail
from services.gateway.tokens import INVALID_TOKEN, JwksCache, TokenRejected, TokenVerifier
from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh.errors import PermissionDenied
from tests.gateway.jwts import claims, live_revocations, public_jwk, sign

KEY = Ed25519PrivateKey.generate()
KID = "k1"
COUNT = "/streammesh.gateway.v1.GatewayService/CountEvents"


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv6:%5B2001:db8::1%5D:40000"


class Recorder(AuditTrail):
    """Keeps what would be sent to auth."""

    def __init__(self) -> None:
        super().__init__(self._keep, capacity=10)
        self.events: list[auth_pb2.AuditEvent] = []

    def record(self, event: auth_pb2.AuditEvent) -> None:
        self.events.append(event)

    async def _keep(self, event: auth_pb2.AuditEvent) -> None:
        raise AssertionError("not used")


async def _keys() -> list[auth_pb2.JsonWebKey]:
    return [auth_pb2.JsonWebKey(kid=KID, alg="EdDSA", use="sig", **public_jwk(KEY))]


def _guard(recorder: Recorder, table: dict[str, Access] | None = None) -> AccessGuard:
    verifier = TokenVerifier(
        JwksCache(_keys, max_age=60, min_refetch=10),
        issuer="streammesh-auth",
        audience="streammesh",
        leeway=30,
        revocations=live_revocations(),
    )
    return AccessGuard(verifier, recorder, METHOD_ACCESS if table is None else table)


def _bearer(roles: list[str], username: str = "ada") -> tuple[tuple[str, str], ...]:
    token = sign(claims(roles=roles, preferred_username=username), KEY, kid=KID)
    return (("authorization", f"Bearer {token}"),)


async def test_a_method_missing_from_the_table_is_refused_for_everyone() -> None:
    recorder = Recorder()
    with pytest.raises(PermissionDenied):
        await _guard(recorder, table={})(COUNT, FakeContext(_bearer(["admin"])))
    [event] = recorder.events
    assert (event.action, event.reason, event.actor) == (
        "access_denied",
        "method_not_exposed",
        "anonymous",
    )
    assert event.source == "2001:db8::1"


async def test_role_refusal_names_the_actor() -> None:
    recorder = Recorder()
    with pytest.raises(PermissionDenied, match="needs the role analyst"):
        await _guard(recorder)(COUNT, FakeContext(_bearer(["producer"])))
    [event] = recorder.events
    assert (event.action, event.outcome, event.reason, event.actor) == (
        "access_denied",
        "denied",
        "role_missing",
        "user:ada",
    )
    assert dict(event.details) == {"method": COUNT.lstrip("/")}


async def test_admin_methods_need_the_admin_role() -> None:
    recorder = Recorder()
    guard = _guard(recorder)
    method = "/streammesh.gateway.v1.AdminService/ListUsers"
    with pytest.raises(PermissionDenied, match="needs the role admin"):
        await guard(method, FakeContext(_bearer(["producer", "analyst"])))
    await guard(method, FakeContext(_bearer(["admin"])))
    assert current_principal().roles == {"admin"}


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "missing_token"),
        ((("authorization", "Bearer"),), "missing_token"),
        ((("authorization", "Token abc"),), "malformed"),
        ((("authorization", b"Bearer abc"),), "malformed"),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), "malformed"),
        ((("authorization", "Bearer " + "a" * 1_000_000),), "oversize"),
        ((("authorization", "Bearer a.b.c"),), "malformed"),
    ],
    ids=["none", "empty", "other scheme", "binary", "twice", "1 MB", "garbage"],
)
async def test_token_refusals_are_audited_without_the_token(
    metadata: tuple[tuple[str, str | bytes], ...], reason: str
) -> None:
    recorder = Recorder()
    with pytest.raises(TokenRejected) as caught:
        await _guard(recorder)(COUNT, FakeContext(metadata))
    assert caught.value.message == INVALID_TOKEN
    [event] = recorder.events
    assert (event.action, event.reason, event.actor) == ("token_invalid", reason, "anonymous")
    stored = str(event)
    for _, value in metadata:
        token = str(value).partition(" ")[2]
        assert len(token) < 4 or token not in stored


async def test_public_methods_need_no_token_and_set_no_principal() -> None:
    recorder = Recorder()
    await _guard(recorder)(
        "/streammesh.gateway.v1.GatewayService/StartLogin",
        FakeContext(),
    )
    assert optional_principal() is None
    assert recorder.events == []
