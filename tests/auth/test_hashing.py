"""The bound on concurrent argon2 work: a burst of logins and registrations never runs more hashes
or verifications at once than `hash_concurrency` (each takes 19 MiB)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import pytest
from argon2 import PasswordHasher

from services.auth import passwords
from services.auth.settings import AuthSettings, available_cpus
from tests.auth.conftest import AuthFactory
from tests.auth.flows import PASSWORD, FakeClock, enrol, failure, register, start, unique_name

BOUND = 2


class CountingHasher(PasswordHasher):
    """The real argon2id hasher, counting the computations that run at the same moment.

    Each computation holds on (briefly, at most `hold` seconds) until more than `bound` run at
    once or it times out, so that computations which could overlap certainly do: the count
    then does not depend on how the threads happen to be scheduled.
    """

    def __init__(self, bound: int, hold: float = 0.3) -> None:
        base = passwords.new_hasher()
        super().__init__(
            time_cost=base.time_cost,
            memory_cost=base.memory_cost,
            parallelism=base.parallelism,
            type=base.type,
        )
        self._bound = bound
        self._hold = hold
        self._lock = threading.Lock()
        self._crowded = threading.Event()
        self.running = 0
        self.most = 0
        self.calls = 0

    def reset(self) -> None:
        with self._lock:
            self.most = self.running
            self.calls = 0

    @contextmanager
    def _counted(self) -> Iterator[None]:
        with self._lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
            if self.running > self._bound:
                self._crowded.set()
        try:
            self._crowded.wait(self._hold)
            yield
        finally:
            with self._lock:
                self.running -= 1

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        with self._counted():
            hashed: str = super().hash(password, salt=salt)
            return hashed

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        with self._counted():
            return super().verify(hash, password)


async def test_a_login_burst_runs_at_most_the_bound_of_argon2_computations(
    auth_factory: AuthFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hasher = CountingHasher(BOUND)
    monkeypatch.setattr(passwords, "new_hasher", lambda: hasher)
    auth = await auth_factory(hash_concurrency=BOUND)
    stub = auth.stub()
    enrolled = unique_name()
    await register(stub, enrolled)
    await enrol(stub, enrolled, clock)
    hasher.reset()
    # Every kind of argon2 work at once: right passwords, wrong ones, unknown users (the dummy
    # verification), and registrations (hashes).
    burst = [
        *(start(stub, enrolled) for _ in range(4)),
        *(failure(start(stub, enrolled, "not the password")) for _ in range(3)),
        *(failure(start(stub, unique_name())) for _ in range(3)),
        *(register(stub, unique_name(), PASSWORD) for _ in range(3)),
    ]
    await asyncio.gather(*burst)
    assert hasher.calls == len(burst)
    assert hasher.most == BOUND


def test_the_bound_defaults_to_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMMESH_AUTH_HASH_CONCURRENCY", raising=False)
    assert AuthSettings().hash_concurrency == available_cpus()
    monkeypatch.setenv("STREAMMESH_AUTH_HASH_CONCURRENCY", "3")
    assert AuthSettings().hash_concurrency == 3
