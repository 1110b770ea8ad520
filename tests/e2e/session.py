"""A logged-in producer and analyst for tests that call the gateway as an application would."""

from __future__ import annotations

import time
import uuid

import pyotp

from streammesh.cli.admin import create_user_as_operator
from streammesh.cli.stack import StackConfig
from streammesh.client import GatewayClient

__all__ = ["login"]


async def login(client: GatewayClient, stack: StackConfig) -> None:
    """Make a user (producer, analyst) as an operator, enrol TOTP and log `client` in."""
    username, password = f"e2e-{uuid.uuid4().hex[:8]}", "correct horse battery staple"
    # Self-registration grants no roles, so the user is made by an operator, as an admin would.
    await create_user_as_operator(stack, username, password, ["producer", "analyst"])
    enrolment = await client.begin_totp(username, password)
    assert enrolment.otpauth_uri.startswith("otpauth://totp/")
    totp = pyotp.TOTP(enrolment.secret)
    recovery_codes = await client.confirm_totp(username, password, totp.now())
    assert len(recovery_codes) >= 8
    challenge = await client.start_login(username, password)
    # The confirming code is spent; the next step's code is within the allowed drift.
    tokens = await client.complete_login(challenge, totp_code=totp.at(time.time() + 30))
    assert tokens.token_type == "Bearer" and tokens.refresh_token
    assert {"producer", "analyst"} <= set(tokens.roles)
