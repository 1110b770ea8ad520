"""What delivery asks of a store: the call (`StoreBatch`), its result, and the refusal that sets
an entry aside at once. The storage client (`storage_client.py`) is the one used in service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from streammesh.entries import QueuedBody

__all__ = ["PermanentStoreError", "StaleLeaseEpoch", "StoreBatch", "StoreResult"]


@dataclass(frozen=True)
class StoreResult:
    """What storage did with a call's events."""

    inserted: int
    duplicates: int


class PermanentStoreError(Exception):
    """Storage refused the batch for a reason a retry cannot fix (the batch goes to dead letters)."""


class StaleLeaseEpoch(Exception):
    """Storage refused the store for a lease epoch below its fence (nothing was written): the
    partition has a newer owner. Never counted, never dead-lettered: the partition is lost."""

    def __init__(self, message: str, stored_epoch: int) -> None:
        super().__init__(message)
        self.stored_epoch = stored_epoch
        """The fence storage holds (0 when its message did not say)."""


StoreBatch = Callable[[QueuedBody], Awaitable[StoreResult]]
"""Stores an entry's events (its serialized QueuedColumns or QueuedBatch, passed on undecoded,
or those of consecutive entries of one form concatenated); raises
PermanentStoreError to dead-letter it at once, StaleLeaseEpoch when storage fenced the sender
out (the body's `fences`), an outage (`dead_letters.is_outage`) to wait,
anything else to retry it up to `max_deliveries` times."""
