"""The auth domain modules on their own: sealing, TOTP (RFC 6238 vectors), passwords and the
deny-list, recovery codes, source buckets, page tokens, edge-event checks, re-hashing."""

from __future__ import annotations

import base64
import dataclasses
import uuid
from typing import Any

import pyotp
import pytest
from argon2 import PasswordHasher
from sqlalchemy.exc import IntegrityError

from services.auth import recovery, totp
from services.auth.audit import AuditEvent, edge_event_problems
from services.auth.crypto import DecryptionError, Purpose, SecretBox
from services.auth.origin import peer_host
from services.auth.paging import decode_token, encode_token, page_size
from services.auth.passwords import (
    Passwords,
    is_common_password,
    normalize_password,
    password_problem,
)
from services.auth.server import AuthDependencies
from services.auth.throttle import source_key
from services.auth.tokens import SigningKey, jwk_thumbprint
from streammesh.mesh.errors import InvalidArgument
from tests.auth.conftest import fetch_user_row
from tests.auth.flows import PASSWORD, FakeClock, Stub, enrol, login, register, unique_name

RFC6238_SECRET = base64.b32encode(b"12345678901234567890").decode()

# RFC 6238 Appendix B, SHA-1 column: (T in seconds, 8-digit TOTP).
RFC6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


def test_sealed_values_are_bound_to_purpose_row_and_key() -> None:
    box = SecretBox(b"k" * 32)
    sealed = box.seal(b"JBSWY3DPEHPK3PXP", purpose=Purpose.TOTP_ACTIVE, row_id="user-1")
    assert b"JBSWY3DPEHPK3PXP" not in sealed
    assert box.open(sealed, purpose=Purpose.TOTP_ACTIVE, row_id="user-1") == b"JBSWY3DPEHPK3PXP"
    # Fresh nonce every time.
    assert sealed != box.seal(b"JBSWY3DPEHPK3PXP", purpose=Purpose.TOTP_ACTIVE, row_id="user-1")
    with pytest.raises(DecryptionError):
        box.open(sealed, purpose=Purpose.TOTP_ACTIVE, row_id="user-2")
    with pytest.raises(DecryptionError):
        box.open(sealed, purpose=Purpose.TOTP_PENDING, row_id="user-1")
    with pytest.raises(DecryptionError):
        SecretBox(b"o" * 32).open(sealed, purpose=Purpose.TOTP_ACTIVE, row_id="user-1")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DecryptionError):
        box.open(tampered, purpose=Purpose.TOTP_ACTIVE, row_id="user-1")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        SecretBox(b"short")


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 8037 appendix A.3: the thumbprint of the example Ed25519 public key.
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    key = SigningKey.generate()
    assert key.kid == jwk_thumbprint(key.public_jwk)
    box = SecretBox(b"k" * 32)
    opened = SigningKey.unseal(key.seal(box), box)
    assert (opened.kid, opened.public_jwk) == (key.kid, key.public_jwk)
    assert "private_key" not in repr(opened)


@pytest.mark.parametrize(("moment", "expected"), RFC6238_SHA1)
def test_totp_matches_the_rfc6238_vectors(moment: int, expected: str) -> None:
    step = totp.step_at(moment)
    assert totp.code_for_step(RFC6238_SECRET, step, digits=8) == expected
    # Our codes have 6 digits: the last 6 of the 8-digit value (same HOTP truncation mod 10^6).
    assert totp.code_for_step(RFC6238_SECRET, step) == expected[-6:]
    assert totp.matching_step(RFC6238_SECRET, expected[-6:], now=moment) == step
    assert totp.matching_step(RFC6238_SECRET, expected, now=moment) is None


def test_totp_accepts_one_step_of_drift_either_way_and_no_more() -> None:
    now = 1111111111.0  # a fixed time: no flakiness from codes that repeat across steps
    step = totp.step_at(now)
    codes = {offset: totp.code_for_step(RFC6238_SECRET, step + offset) for offset in range(-2, 3)}
    assert len(set(codes.values())) == 5
    assert totp.matching_step(RFC6238_SECRET, codes[0], now=now) == step
    assert totp.matching_step(RFC6238_SECRET, codes[-1], now=now) == step - 1
    assert totp.matching_step(RFC6238_SECRET, codes[1], now=now) == step + 1
    assert totp.matching_step(RFC6238_SECRET, codes[-2], now=now) is None
    assert totp.matching_step(RFC6238_SECRET, codes[2], now=now) is None
    assert totp.matching_step(RFC6238_SECRET, "", now=now) is None
    assert totp.matching_step(RFC6238_SECRET, codes[0] + "0", now=now) is None
    secret = totp.new_secret()
    assert len(secret) == 32
    assert totp.matching_step(secret, pyotp.TOTP(secret).at(now), now=now) == step
    uri = totp.otpauth_uri(secret, account="alice", issuer="StreamMesh")
    assert uri.startswith("otpauth://totp/StreamMesh:alice?secret=")


def test_password_policy_counts_characters_not_bytes() -> None:
    assert password_problem("ñ" * 7) is not None
    assert password_problem("ñ" * 8) is None
    assert password_problem("🔑" * 1024) is None
    assert password_problem("🔑" * 1025) is not None
    assert normalize_password("x" * 5000) is None


@pytest.mark.parametrize(
    "password", ["password", "PassWord1", "iloveyou", "QWERTYUIOP", "trustno1", "StreamMesh"]
)
def test_common_passwords_are_refused_ignoring_case(password: str) -> None:
    assert is_common_password(password)
    problem = password_problem(password)
    assert problem is not None and "common" in problem


def test_deny_list_is_a_real_list_and_passphrases_pass() -> None:
    from services.auth.passwords import _common_passwords

    assert len({p for p in _common_passwords() if len(p) >= 8}) > 10_000
    assert password_problem(PASSWORD) is None
    assert password_problem("ada-lovelace", username="ada-lovelace") == "must not be the username"
    assert password_problem("Ada-Lovelace", username="ada-lovelace") is not None


def test_recovery_codes_are_random_canonical_and_bound_to_the_user() -> None:
    codes = recovery.new_codes()
    assert len(codes) == len(set(codes)) == 10
    for code in codes:
        assert len(code) == 11 and code[5] == "-"
    code = codes[0]
    assert recovery.canonical_code(code) == code.replace("-", "")
    assert recovery.canonical_code(f" {code.lower()} ") == code.replace("-", "")
    assert recovery.canonical_code("ABCDE-FGH1J") is None  # 1 is not base32
    assert recovery.canonical_code("x" * 1000) is None
    box = SecretBox(b"k" * 32)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    digest = recovery.code_digest(box, alice, code.replace("-", ""))
    assert len(digest) == 32
    assert digest == recovery.code_digest(box, alice, code.replace("-", ""))
    assert digest != recovery.code_digest(box, bob, code.replace("-", ""))
    assert digest != recovery.code_digest(SecretBox(b"o" * 32), alice, code.replace("-", ""))


def test_sources_are_bucketed_by_address_and_ipv6_prefix() -> None:
    assert peer_host("ipv4:203.0.113.9:4431") == "203.0.113.9"
    assert peer_host("203.0.113.9:4431") == "203.0.113.9"
    assert peer_host("ipv6:[2001:db8::1]:4431") == "2001:db8::1"
    assert peer_host("ipv6:%5B2001:db8::1%5D:4431") == "2001:db8::1"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"
    assert source_key("203.0.113.9") != source_key("203.0.113.10")
    # One host owns a whole /64: rotating through it must not give fresh buckets.
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:1")
    assert source_key("2001:db8::1") != source_key("2001:db8:0:1::1")
    assert source_key("::ffff:203.0.113.9") == source_key("203.0.113.9")
    assert len(source_key("x" * 10_000)) == 32


def test_page_tokens_round_trip_and_are_bound_to_the_query() -> None:
    token = encode_token({"after": "bob"}, {"prefix": "b"})
    assert decode_token(token, {"prefix": "b"}) == {"after": "bob"}
    assert decode_token("", {"prefix": "b"}) is None
    for bad, scope in ((token, {"prefix": "a"}), ("%%%", {}), ("e30", {}), ("x" * 2000, {})):
        with pytest.raises(InvalidArgument):
            decode_token(bad, scope)
    assert page_size(0) == 100
    assert page_size(500) == page_size(501) == 500  # coerced down (AIP-158)
    with pytest.raises(InvalidArgument):
        page_size(-1)


def test_edge_events_are_checked() -> None:
    good = AuditEvent(
        actor="user:ada",
        action="access_denied",
        outcome="denied",
        subject="ada",
        reason="missing_role",
        source="203.0.113.9",
        details={"method": "/streammesh.gateway.v1.GatewayService/PublishBatch"},
    )
    assert edge_event_problems(good) == []

    def fields(**changes: Any) -> set[str]:
        event = dataclasses.replace(good, **changes)
        return {name for name, _ in edge_event_problems(event)}

    assert fields(actor="root") == {"event.actor"}
    assert fields(action="login") == {"event.action"}  # auth's own actions cannot be forged
    assert fields(action="Access Denied") == {"event.action"}
    assert fields(outcome="ok") == {"event.outcome"}
    assert fields(source="x" * 129) == {"event.source"}
    assert fields(details={f"k{i}": "v" for i in range(17)}) == {"event.details"}
    assert fields(details={"token": "Bearer eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxIn0.sig"}) == {"event"}
    assert fields(details={"note": "smr_" + "A" * 43}) == {"event"}
    assert fields(details={"note": "\x00"}) == {"event.details[note]"}


async def test_login_rehashes_outdated_hashes(
    stub: Stub, deps: AuthDependencies, clock: FakeClock
) -> None:
    username = unique_name()
    await register(stub, username)
    enrolled = await enrol(stub, username, clock)
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    user = await deps.store.get_user(username)
    assert user is not None
    assert await deps.store.replace_password_hash(user.id, old=user.password_hash, new=weak)

    await login(stub, username, enrolled.secret, clock)
    row = await fetch_user_row(deps, username)
    assert str(row["password_hash"]).startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert Passwords().needs_rehash(weak)


async def test_database_errors_do_not_carry_parameters(deps: AuthDependencies) -> None:
    with pytest.raises(IntegrityError) as caught:
        # Upper case breaks the table's CHECK: the store is only ever given canonical names.
        await deps.store.create_user(
            user_id=uuid.uuid4(), username="UPPER", password_hash="$argon2id$hash", roles=[]
        )
    assert "$argon2id$hash" not in str(caught.value)
    assert "parameters hidden" in str(caught.value)
