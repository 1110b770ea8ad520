"""AuthService over real mTLS against a real Postgres schema and Redis: registration, TOTP
enrolment, tokens verified with nothing but the published JWKS, and the error contract."""

from __future__ import annotations

import time
import unicodedata
import uuid

import grpc
import jwt
import pyotp
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text

from services.auth.server import AuthDependencies
from services.auth.service import AuthServicer
from streammesh.api.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.auth.conftest import ChannelFactory, audit_rows, fetch_user_row
from tests.auth.flows import (
    INVALID,
    PASSWORD,
    FakeClock,
    Stub,
    async_stub,
    complete,
    enrol,
    failure,
    fresh_code,
    login,
    register,
    start,
    unique_name,
    wrong_code,
)


def verify_with_jwks(token: str, jwks: auth_pb2.GetJwksResponse) -> dict[str, object]:
    """Decode an access token with nothing but the published keys (as the gateway does)."""
    header = jwt.get_unverified_header(token)
    published = next(key for key in jwks.keys if key.kid == header["kid"])
    public_key = jwt.PyJWK(
        {"kty": published.kty, "crv": published.crv, "x": published.x, "kid": published.kid}
    )
    claims: dict[str, object] = jwt.decode(
        token,
        public_key,
        algorithms=["EdDSA"],
        audience="streammesh",
        issuer="streammesh-auth",
        options={"require": ["exp", "iat", "nbf", "sub", "jti", "iss", "aud"]},
    )
    return claims


async def test_register_enrol_login_and_verify_with_jwks_only(stub: Stub, clock: FakeClock) -> None:
    username = unique_name()
    user_id = await register(stub, username)
    assert uuid.UUID(user_id)
    enrolled = await enrol(stub, username, clock)
    assert len(enrolled.recovery_codes) == 10

    reply = await start_reply(stub, username)
    assert reply.challenge.startswith("smc_")
    assert reply.expires_in.seconds == 300
    tokens = await complete(stub, reply.challenge, totp_code=fresh_code(enrolled.secret, clock))
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in.seconds == 300
    assert tokens.refresh_token.startswith("smr_")
    assert tokens.refresh_expires_in.seconds == 30 * 86400
    assert list(tokens.roles) == []  # sign-up grants no roles

    jwks = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
    assert len(jwks.keys) == 1
    published = jwks.keys[0]
    assert (published.kty, published.crv, published.alg, published.use) == (
        "OKP",
        "Ed25519",
        "EdDSA",
        "sig",
    )
    header = jwt.get_unverified_header(tokens.access_token)
    assert header == {"alg": "EdDSA", "kid": published.kid, "typ": "at+jwt"}
    claims = verify_with_jwks(tokens.access_token, jwks)
    assert claims["sub"] == user_id
    assert claims["preferred_username"] == username
    assert claims["roles"] == []
    assert uuid.UUID(str(claims["sid"]))
    assert claims["exp"] - claims["iat"] == 300  # type: ignore[operator]
    assert claims["nbf"] == claims["iat"]


async def start_reply(stub: Stub, username: str) -> auth_pb2.StartLoginResponse:
    reply: auth_pb2.StartLoginResponse = await stub.StartLogin(
        auth_pb2.StartLoginRequest(username=username, password=PASSWORD), timeout=10
    )
    return reply


async def test_secrets_are_sealed_and_hash_is_owasp_argon2id(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    begun = await stub.BeginTotpEnrollment(
        auth_pb2.BeginTotpEnrollmentRequest(username=username, password=PASSWORD), timeout=10
    )
    row = await fetch_user_row(deps, username)
    pending = bytes(row["totp_pending_secret"])
    assert begun.secret.encode() not in pending
    assert row["totp_secret"] is None
    assert begun.otpauth_uri.startswith("otpauth://totp/StreamMesh:")
    assert "issuer=StreamMesh" in begun.otpauth_uri

    confirmed = await stub.ConfirmTotpEnrollment(
        auth_pb2.ConfirmTotpEnrollmentRequest(
            username=username, password=PASSWORD, code=pyotp.TOTP(begun.secret).at(clock())
        ),
        timeout=10,
    )
    row = await fetch_user_row(deps, username)
    active = bytes(row["totp_secret"])
    assert begun.secret.encode() not in active
    assert row["totp_pending_secret"] is None
    assert row["totp_enabled_at"] is not None

    password_hash = str(row["password_hash"])
    assert password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PASSWORD not in password_hash

    async with deps.engine.connect() as conn:
        sealed_keys = (await conn.execute(text("SELECT private_key FROM signing_keys"))).all()
        stored_codes = (await conn.execute(text("SELECT code_hash FROM recovery_codes"))).all()
    assert sealed_keys
    for (sealed,) in sealed_keys:
        assert b"PRIVATE KEY" not in bytes(sealed)
    assert len(stored_codes) == 10
    for (code_hash,) in stored_codes:
        assert len(bytes(code_hash)) == 32
        for code in confirmed.recovery_codes:
            assert code.replace("-", "").encode() not in bytes(code_hash)


async def test_unknown_user_and_wrong_password_look_the_same(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    await enrol(stub, username, clock)
    missing = unique_name()

    unknown = await failure(start(stub, missing))
    wrong = await failure(start(stub, username, "not the password"))
    assert unknown.code() == wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert unknown.details() == wrong.details() == INVALID
    # Only the audit log, which admins read, tells them apart.
    assert [r["reason"] for r in await audit_rows(deps, subject=missing)] == ["unknown_user"]
    reasons = [
        r["reason"] for r in await audit_rows(deps, subject=username, action="login_password")
    ]
    assert reasons == ["bad_credentials"]


async def test_unknown_user_costs_a_password_verification(stub: Stub) -> None:
    username = unique_name()
    await register(stub, username)

    async def elapsed(name: str) -> float:
        started = time.perf_counter()
        await failure(start(stub, name, "not the password"))
        return time.perf_counter() - started

    wrong = sorted([await elapsed(username) for _ in range(3)])[1]
    unknown = sorted([await elapsed(unique_name()) for _ in range(3)])[1]
    # Without the dummy verification an unknown user would answer in ~1 ms instead of ~40 ms.
    assert unknown > 0.3 * wrong


async def test_login_before_enrolment_is_failed_precondition(stub: Stub) -> None:
    username = unique_name()
    await register(stub, username)
    error = await failure(start(stub, username))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "TOTP enrolment required"
    # ... but only with the right password: otherwise nothing is revealed.
    error = await failure(start(stub, username, "not the password"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == INVALID


async def test_enrolment_cannot_replace_an_active_secret_or_skip_begin(
    stub: Stub, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    confirm = auth_pb2.ConfirmTotpEnrollmentRequest(
        username=username, password=PASSWORD, code="123456"
    )
    error = await failure(stub.ConfirmTotpEnrollment(confirm, timeout=10))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

    await enrol(stub, username, clock)
    again = auth_pb2.BeginTotpEnrollmentRequest(username=username, password=PASSWORD)
    error = await failure(stub.BeginTotpEnrollment(again, timeout=10))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The password is checked first: without it, enrolment calls reveal nothing.
    wrong = auth_pb2.BeginTotpEnrollmentRequest(username=username, password="not the password")
    error = await failure(stub.BeginTotpEnrollment(wrong, timeout=10))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID)


async def test_confirm_with_wrong_code_keeps_totp_disabled(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    begun = await stub.BeginTotpEnrollment(
        auth_pb2.BeginTotpEnrollmentRequest(username=username, password=PASSWORD), timeout=10
    )
    error = await failure(
        stub.ConfirmTotpEnrollment(
            auth_pb2.ConfirmTotpEnrollmentRequest(
                username=username, password=PASSWORD, code=wrong_code(begun.secret, clock())
            ),
            timeout=10,
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await fetch_user_row(deps, username))["totp_enabled_at"] is None


async def test_the_confirming_code_cannot_log_in(stub: Stub, clock: FakeClock) -> None:
    username = unique_name()
    await register(stub, username)
    enrolled = await enrol(stub, username, clock)
    confirming = pyotp.TOTP(enrolled.secret).at(clock())
    error = await failure(complete(stub, await start(stub, username), totp_code=confirming))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID)
    await login(stub, username, enrolled.secret, clock)


async def test_duplicate_username_is_already_exists_whatever_the_case(
    stub: Stub, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    for duplicate in (username, username.upper()):
        error = await failure(register(stub, duplicate, password="another password"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    # Login is case-insensitive too.
    enrolled = await enrol(stub, username.upper(), clock)
    await login(stub, username.capitalize(), enrolled.secret, clock)


@pytest.mark.parametrize(
    ("username", "password", "fields"),
    [
        ("ok-name", "short", {"password"}),
        ("ok-name", "x" * 1025, {"password"}),
        ("ok-name", "Password1", {"password"}),
        ("ok-name", "QWERTYUIOP", {"password"}),
        ("ok-name", "ok-name", {"password"}),
        ("ab", PASSWORD, {"username"}),
        ("x" * 65, PASSWORD, {"username"}),
        ("no spaces", PASSWORD, {"username"}),
        ("émile", PASSWORD, {"username"}),
        ("tab\n", PASSWORD, {"username"}),
        ("", "", {"username", "password"}),
    ],
)
async def test_invalid_registration_names_the_fields(
    stub: Stub, username: str, password: str, fields: set[str]
) -> None:
    error = await failure(register(stub, username, password))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert {v.field for v in bad_request.field_violations} == fields


async def test_common_password_is_refused_with_a_reason(stub: Stub) -> None:
    error = await failure(register(stub, unique_name(), "IloveYou"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    [violation] = bad_request.field_violations
    assert violation.field == "password"
    assert "commonly used" in violation.description


async def test_long_unicode_password_is_kept_whole_and_normalized(
    stub: Stub, clock: FakeClock
) -> None:
    username = unique_name()
    composed = "pässwörd ✓ 🔑 " + "é" * 1000
    assert len(composed) <= 1024
    await register(stub, username, composed)
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    # The same password typed with decomposed accents is the same password.
    enrolled = await enrol(stub, username, clock, password=decomposed)
    # Changing only the last character, far past any 72-byte bcrypt-style cut, is refused.
    error = await failure(start(stub, username, composed[:-1] + "e"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    await login(stub, username, enrolled.secret, clock, password=composed)


async def test_complete_login_needs_a_factor(stub: Stub) -> None:
    error = await failure(stub.CompleteLogin(auth_pb2.CompleteLoginRequest(challenge="smc_x")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "factor" in str(rpc_status.from_call(error))


@pytest.mark.parametrize("peer", ["ingest", "storage", "processor"])
async def test_only_the_gateway_may_call(open_channel: ChannelFactory, peer: str) -> None:
    other = async_stub(open_channel(peer))
    for call in (
        other.GetJwks(auth_pb2.GetJwksRequest(), timeout=10),
        other.StartLogin(
            auth_pb2.StartLoginRequest(username="someone", password=PASSWORD), timeout=10
        ),
        other.ListUsers(auth_pb2.ListUsersRequest(), timeout=10),
        other.RecordAuditEvent(auth_pb2.RecordAuditEventRequest(), timeout=10),
    ):
        error = await failure(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_every_rpc_has_a_handler() -> None:
    service = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
    for method in service.methods:
        handler = getattr(AuthServicer, method.name)
        assert handler is not getattr(auth_pb2_grpc.AuthServiceServicer, method.name), method.name
