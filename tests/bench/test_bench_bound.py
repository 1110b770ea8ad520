"""The Redis bound the bench prints: the queue's term from the back-pressure limits plus the
idempotency window's fixed term, which does not depend on the rate and is gone with the window
off; the stack gets the window the bound counts."""

from __future__ import annotations

import argparse

from streammesh.backlog import WINDOW_BYTES_PER_ID
from streammesh.cli.bench_setup import backlog_bound, stack_limits


def _args(window: int, max_ids: int = 100_000) -> argparse.Namespace:
    return argparse.Namespace(
        closed_batch_size=1000,
        payload_bytes=128,
        idempotency_window=window,
        idempotency_max_ids=max_ids,
        out_of_orderness_ms=2000,
    )


def test_the_bound_adds_the_windows_fixed_term_and_the_stack_runs_with_that_window() -> None:
    on, off = backlog_bound(_args(60), 8), backlog_bound(_args(0), 8)
    assert off["redis_window_bound_bytes"] == 0
    assert (
        on["redis_queue_bound_bytes"] == off["redis_queue_bound_bytes"] == off["redis_bound_bytes"]
    )
    assert on["redis_window_bound_bytes"] == 8 * 100_000 * WINDOW_BYTES_PER_ID
    assert on["redis_bound_bytes"] == on["redis_queue_bound_bytes"] + 8 * 100_000 * 80
    ingest = stack_limits(_args(0))["ingest"]
    assert ingest["STREAMMESH_INGEST_IDEMPOTENCY_WINDOW_SECONDS"] == "0"
    assert ingest["STREAMMESH_INGEST_IDEMPOTENCY_MAX_IDS"] == "100000"
    assert stack_limits(_args(60))["ingest"]["STREAMMESH_INGEST_IDEMPOTENCY_WINDOW_SECONDS"] == "60"
    # A cap below two batches' slices: each hash may still hold one batch's slice.
    assert backlog_bound(_args(60, 1000), 8)["redis_window_bound_bytes"] == 8 * 20_000 * 80
