"""One-time recovery codes: the second factor for a user who lost the authenticator.

A code is 10 random base32 characters (50 bits) shown as `XXXXX-XXXXX`. Only a keyed hash is
stored: HMAC-SHA-256 under a key derived from the secret key file, over the user id and the
canonical code. 50 random bits need no slow hash: there is no dictionary to try, and without
the key file a copy of the table cannot be tested offline at all. Binding the user id into the
hash means a code can only ever match a row of the user it was made for.
"""

from __future__ import annotations

import re
import secrets
import uuid

from services.auth.crypto import MacPurpose, SecretBox

__all__ = ["CODE_COUNT", "canonical_code", "code_digest", "new_codes"]

CODE_COUNT = 10
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_GROUP = 5
_LENGTH = 2 * _GROUP
_CANONICAL = re.compile(f"[{_ALPHABET}]{{{_LENGTH}}}")
_SEPARATORS = re.compile(r"[\s-]")


def new_codes(count: int = CODE_COUNT) -> list[str]:
    """`count` distinct fresh codes in display form (`ABCDE-FGH23`)."""
    codes: set[str] = set()
    while len(codes) < count:
        codes.add("".join(secrets.choice(_ALPHABET) for _ in range(_LENGTH)))
    return [f"{code[:_GROUP]}-{code[_GROUP:]}" for code in sorted(codes)]


def canonical_code(code: str) -> str | None:
    """The code without separators, upper-cased; None if it cannot be a recovery code."""
    if len(code) > 4 * _LENGTH:
        return None
    candidate = _SEPARATORS.sub("", code).upper()
    return candidate if _CANONICAL.fullmatch(candidate) else None


def code_digest(box: SecretBox, user_id: uuid.UUID, canonical: str) -> bytes:
    """What is stored for (and compared against) `canonical`, a code of user `user_id`."""
    return box.digest(f"{user_id}:{canonical}".encode(), purpose=MacPurpose.RECOVERY_CODE)
