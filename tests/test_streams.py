"""Partitioning: stable, spread, and consistent when partitions grow."""

from __future__ import annotations

from collections import Counter

from streammesh.streams import StreamLayout, jump_hash


def test_same_key_same_partition() -> None:
    layout = StreamLayout(partitions=8)
    assert {layout.partition_for("order-42") for _ in range(10)} == {
        layout.partition_for("order-42")
    }


def test_keys_spread_over_partitions() -> None:
    counts = Counter(jump_hash(f"key-{i}".encode(), 8) for i in range(8000))
    assert set(counts) == set(range(8))
    assert min(counts.values()) > 800  # about 1000 each


def test_growing_partitions_moves_few_keys() -> None:
    keys = [f"key-{i}".encode() for i in range(10_000)]
    moved = sum(jump_hash(k, 8) != jump_hash(k, 9) for k in keys)
    assert 0 < moved < 10_000 * 0.15  # ideal: 1/9 of the keys
    assert all(jump_hash(k, 9) == 8 for k in keys if jump_hash(k, 8) != jump_hash(k, 9))


def test_keys_live_under_the_stream_prefix() -> None:
    layout = StreamLayout(prefix="sm:events", partitions=4)
    assert layout.stream(3) == "sm:events:stream:{sm:events:p3}"
    assert layout.partition_of_stream(b"sm:events:stream:{sm:events:p3}") == 3
    assert layout.lease_key(3) == "sm:events:lease:{sm:events:p3}"
    assert layout.unacked_key(3) == "sm:events:unacked:{sm:events:p3}"
    assert layout.members_key == "sm:events:members"
    assert layout.dead_letter_stream == "sm:events:dead"
