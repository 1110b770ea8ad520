"""After a full flow (registration, enrolment, failed and successful logins with a TOTP code and a
recovery code, refresh, reuse, logout, admin calls), no password, code, token, challenge,
recovery code or TOTP secret is in the audit table, in Redis or in any log line."""

from __future__ import annotations

import logging
import re

import pyotp
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text

from streammesh.api.auth.v1 import auth_pb2
from tests.auth.conftest import Auth
from tests.auth.flows import (
    PASSWORD,
    FakeClock,
    as_user,
    complete,
    failure,
    fresh_code,
    register,
    start,
    unique_name,
    wrong_code,
)

WRONG_PASSWORD = "wrong horse battery staple"


@pytest.mark.usefixtures("platform_admins")
async def test_no_secret_reaches_the_audit_log_redis_or_logs(
    auth: Auth, clock: FakeClock, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = auth.stub()
    username = unique_name()
    person = as_user("anonymous", "198.51.100.4")
    admin = as_user("user:root-admin", "192.0.2.1")
    secrets: list[str] = [PASSWORD, WRONG_PASSWORD]
    codes: list[str] = []

    await register(stub, username, metadata=person)
    begun = await stub.BeginTotpEnrollment(
        auth_pb2.BeginTotpEnrollmentRequest(username=username, password=PASSWORD),
        metadata=person,
        timeout=10,
    )
    secrets.append(begun.secret)
    bad_confirm = wrong_code(begun.secret, clock())
    codes.append(bad_confirm)
    await failure(
        stub.ConfirmTotpEnrollment(
            auth_pb2.ConfirmTotpEnrollmentRequest(
                username=username, password=PASSWORD, code=bad_confirm
            ),
            metadata=person,
            timeout=10,
        )
    )
    confirm_code = pyotp.TOTP(begun.secret).at(clock())
    codes.append(confirm_code)
    confirmed = await stub.ConfirmTotpEnrollment(
        auth_pb2.ConfirmTotpEnrollmentRequest(
            username=username, password=PASSWORD, code=confirm_code
        ),
        metadata=person,
        timeout=10,
    )
    recovery_codes = list(confirmed.recovery_codes)
    secrets += recovery_codes + [code.replace("-", "") for code in recovery_codes]

    await failure(start(stub, username, WRONG_PASSWORD, metadata=person))
    challenge = await start(stub, username, metadata=person)
    secrets.append(challenge)
    bad_code = wrong_code(begun.secret, clock())
    codes.append(bad_code)
    await failure(complete(stub, challenge, totp_code=bad_code, metadata=person))

    challenge = await start(stub, username, metadata=person)
    login_code = fresh_code(begun.secret, clock)
    secrets.append(challenge)
    codes.append(login_code)
    tokens = await complete(stub, challenge, totp_code=login_code, metadata=person)
    await failure(complete(stub, await start(stub, username), totp_code=login_code))

    challenge = await start(stub, username, metadata=person)
    secrets.append(challenge)
    by_recovery = await complete(stub, challenge, recovery_code=recovery_codes[0], metadata=person)
    await failure(complete(stub, await start(stub, username), recovery_code=recovery_codes[0]))

    refreshed = await stub.RefreshSession(
        auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token), timeout=10
    )
    await failure(
        stub.RefreshSession(
            auth_pb2.RefreshSessionRequest(refresh_token=tokens.refresh_token), timeout=10
        )
    )
    await stub.Logout(
        auth_pb2.LogoutRequest(refresh_token=by_recovery.refresh_token), metadata=person
    )
    for issued in (tokens, refreshed.tokens, by_recovery):
        secrets += [issued.access_token, issued.refresh_token]
        # The JWT's signature alone must not leak either.
        secrets.append(issued.access_token.rsplit(".", 1)[1])

    await stub.ResetMfa(auth_pb2.ResetMfaRequest(username=username), metadata=admin)
    await stub.RevokeSessions(auth_pb2.RevokeSessionsRequest(username=username), metadata=admin)
    await stub.ListAuditEvents(auth_pb2.ListAuditEventsRequest(subject=username), metadata=admin)

    async with auth.deps.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT actor, subject, action, outcome, reason, source, details::text "
                "FROM audit_events"
            )
        )
        audit_text = "\n".join(" ".join(map(str, row)) for row in rows)
    client = aioredis.Redis.from_url(redis_url)
    try:
        redis_text = ""
        async for key in client.scan_iter(match=f"{auth.settings.redis_prefix}*"):
            redis_text += f"{key!r} {await client.dump(key)!r}\n"
    finally:
        await client.aclose()
    log_text = caplog.text + "\n".join(
        f"{record.getMessage()} {record.__dict__}" for record in caplog.records
    )

    assert username in audit_text and "reuse_detected" in audit_text  # the dump is real
    assert len(caplog.records) > 20
    for where, haystack in (("audit", audit_text), ("redis", redis_text), ("logs", log_text)):
        for secret in secrets:
            assert secret not in haystack, f"a secret is in the {where}"
        for code in codes:
            assert not re.search(rf"(?<![0-9A-Za-z]){code}(?![0-9A-Za-z])", haystack), where
