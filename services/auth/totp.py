"""TOTP second factor (RFC 6238): 6 digits, SHA-1, 30-second steps, one step of clock drift either
way.

`matching_step` returns which time step a code belongs to rather than a bare yes/no, so the caller
can record the last step used and refuse a code that was already accepted once (RFC 6238 §5.2).
"""

from __future__ import annotations

import hmac
import re
import time

import pyotp

__all__ = [
    "DIGITS",
    "STEP_SECONDS",
    "VALID_WINDOW",
    "code_for_step",
    "matching_step",
    "new_secret",
    "otpauth_uri",
    "step_at",
]

DIGITS = 6
STEP_SECONDS = 30
VALID_WINDOW = 1
"""Steps accepted before and after the current one (clock drift, slow typing)."""

_CODE = re.compile(r"[0-9]{6}")


def new_secret() -> str:
    """A fresh base32 secret (160 bits, as RFC 4226 recommends)."""
    return pyotp.random_base32()


def otpauth_uri(secret: str, *, account: str, issuer: str) -> str:
    """The `otpauth://totp/...` URI an authenticator app imports (usually from a QR code)."""
    uri: str = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account, issuer_name=issuer
    )
    return uri


def step_at(now: float) -> int:
    """The RFC 6238 time step T = floor((now - T0) / X) with T0 = 0 and X = 30 s."""
    return int(now // STEP_SECONDS)


def code_for_step(secret: str, step: int, *, digits: int = DIGITS) -> str:
    """The HOTP value (RFC 4226, HMAC-SHA-1) of base32 `secret` for time step `step`."""
    code: str = pyotp.TOTP(secret, digits=digits, interval=STEP_SECONDS).generate_otp(step)
    return code


def matching_step(secret: str, code: str, *, now: float | None = None) -> int | None:
    """The time step whose code equals `code` within the window around `now`, else None."""
    if not _CODE.fullmatch(code):
        return None
    current = step_at(time.time() if now is None else now)
    found: int | None = None
    # Every candidate is compared (constant time, no early exit) so timing says nothing about
    # which step matched.
    for step in range(current - VALID_WINDOW, current + VALID_WINDOW + 1):
        if hmac.compare_digest(code_for_step(secret, step), code) and found is None:
            found = step
    return found
