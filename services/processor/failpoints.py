"""Test-only fault injection: kill this process at a named step of the N-th batch.

Fault tests need a processor that dies *between* the store commit and the XACK, a window no
outside signal can hit reliably. `STREAMMESH_PROCESSOR_FAILPOINT=crash-after-store:3` makes the
processor SIGKILL itself right after the 3rd successful store, before acknowledging it; the same
with `crash-before-store` kills it with the batch read but not stored. Unset (the default), the
check is one comparison. Never set it outside tests.
"""

from __future__ import annotations

import os
import signal

__all__ = ["STEPS", "Failpoint"]

STEPS = ("before-store", "after-store")


class Failpoint:
    def __init__(self, spec: str = "") -> None:
        self._step = ""
        self._remaining = 0
        if spec:
            name, _, count = spec.partition(":")
            step = name.removeprefix("crash-")
            if step not in STEPS or not (count or "1").isdigit() or int(count or "1") < 1:
                raise ValueError(f"failpoint {spec!r}: expected crash-<{'|'.join(STEPS)}>[:N]")
            self._step, self._remaining = step, int(count or "1")

    def reached(self, step: str) -> None:
        """SIGKILL ourselves (no cleanup, like `kill -9`) on the N-th arrival at the armed step."""
        if step != self._step:
            return
        self._remaining -= 1
        if self._remaining == 0:
            os.kill(os.getpid(), signal.SIGKILL)
