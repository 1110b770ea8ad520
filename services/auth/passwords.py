"""Password policy and argon2id hashing.

Hashing costs ~19 MiB and tens of milliseconds of CPU by design, so every hash and verify runs in a
worker thread (`asyncio.to_thread`) and never blocks the event loop. A semaphore bounds how many run
at once (by default one per core the process may use): more cannot finish sooner, and a burst of
logins would otherwise take 19 MiB per thread of the default executor (up to 32). Calls beyond
the bound wait their turn on the loop, where waiting costs almost nothing.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import unicodedata
from collections.abc import Callable
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import VerificationError
from zxcvbn.frequency_lists import FREQUENCY_LISTS  # type: ignore[import-untyped]

__all__ = [
    "MAX_PASSWORD_CHARS",
    "MIN_PASSWORD_CHARS",
    "Passwords",
    "is_common_password",
    "new_hasher",
    "normalize_password",
    "password_problem",
]

MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
# NFKC can merge a base character with its combining marks, so the input may be somewhat longer
# than the normalized password; four times is far beyond any real composition.
_MAX_INPUT_CHARS = 4 * MAX_PASSWORD_CHARS

_T = TypeVar("_T")


def new_hasher() -> PasswordHasher:
    """argon2id with the OWASP minimum (19 MiB, 2 passes, 1 lane)."""
    return PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, type=Type.ID)


def normalize_password(password: str) -> str | None:
    """NFKC, as NIST SP 800-63B advises, so the same password typed on systems that compose
    characters differently still matches. Nothing is stripped or truncated.

    None when the input is too long to normalize to any acceptable password: normalizing costs
    time in proportion to the length, so a megabyte of input is refused before that.
    """
    if len(password) > _MAX_INPUT_CHARS:
        return None
    return unicodedata.normalize("NFKC", password)


@functools.cache
def _common_passwords() -> frozenset[str]:
    # zxcvbn's list of the 30,000 most frequent passwords from real breaches (lower-case), of
    # which ~11,600 are long enough to pass the length rule. Loaded once, on first use.
    return frozenset(word.casefold() for word in FREQUENCY_LISTS["passwords"])


# Context-specific words (NIST SP 800-63B 5.1.1.2): the service's own name is the first guess.
_CONTEXT_WORDS = frozenset({"streammesh", "stream mesh", "stream-mesh"})


def is_common_password(password: str) -> bool:
    """True when `password` (normalized) is, ignoring case, a well-known breached password."""
    folded = password.casefold()
    return folded in _common_passwords() or folded in _CONTEXT_WORDS


def password_problem(password: str, *, username: str | None = None) -> str | None:
    """Why `password` (already normalized) is not acceptable for a new account, or None.

    NIST SP 800-63B rules: a minimum length, a generous maximum, any character, nothing
    truncated, and no password from a deny-list of common ones or equal to the username. No
    composition rules (they make passwords harder to remember, not to guess).
    """
    if len(password) < MIN_PASSWORD_CHARS:
        return f"must have at least {MIN_PASSWORD_CHARS} characters"
    if len(password) > MAX_PASSWORD_CHARS:
        return f"must have at most {MAX_PASSWORD_CHARS} characters"
    if is_common_password(password):
        return "is a commonly used password; choose a longer or less common one"
    if username is not None and password.casefold() == username.casefold():
        return "must not be the username"
    return None


class Passwords:
    """Hashes and verifies passwords off the event loop; `verify_dummy` spends the same time as a
    real verification so that an unknown user cannot be told apart from a wrong password."""

    def __init__(self, hasher: PasswordHasher | None = None, *, max_concurrent: int = 1) -> None:
        """`max_concurrent`: how many hashes and verifications may run at the same time."""
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._hasher = hasher or new_hasher()
        self._slots = asyncio.Semaphore(max_concurrent)
        # Same parameters as real hashes, so verifying against it costs the same.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))

    async def hash(self, password: str) -> str:
        """A PHC-format `$argon2id$...` hash of the normalized password."""
        return await self._run(self._hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        """True when `password` matches; a malformed stored hash raises (it is a server bug)."""
        return await self._run(self._verify, password_hash, password)

    async def verify_dummy(self, password: str) -> None:
        """Burn the time of one verification; the result is meaningless and discarded."""
        await self._run(self._verify, self._dummy_hash, password)

    async def _run(self, work: Callable[..., _T], *args: str) -> _T:
        async with self._slots:
            return await asyncio.to_thread(work, *args)

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash was made with other parameters than the current ones."""
        return self._hasher.check_needs_rehash(password_hash)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except VerificationError:  # VerifyMismatchError and other verification failures
            return False
