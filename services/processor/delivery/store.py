"""What delivery asks of a store: the call (`StoreBatch`), its result, and the refusal that sets
an entry aside at once. The storage client (`storage_client.py`) is the one used in service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from streammesh.entries import QueuedBody

__all__ = ["PermanentStoreError", "StoreBatch", "StoreResult"]


@dataclass(frozen=True)
class StoreResult:
    """What storage did with a call's events."""

    inserted: int
    duplicates: int


class PermanentStoreError(Exception):
    """Storage refused the batch for a reason a retry cannot fix (the batch goes to dead letters)."""


StoreBatch = Callable[[QueuedBody], Awaitable[StoreResult]]
"""Stores an entry's events (its serialized QueuedColumns or QueuedBatch, passed on undecoded,
or those of consecutive entries of one form concatenated); raises
PermanentStoreError to dead-letter it at once, an outage (`dead_letters.is_outage`) to wait,
anything else to retry it up to `max_deliveries` times."""
