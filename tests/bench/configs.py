"""The stack settings a bench test runs on."""

from __future__ import annotations

from pathlib import Path

from streammesh.cli.stack import StackConfig

__all__ = ["bench_test_config"]


def bench_test_config(tmp_path: Path, database_url: str, redis_url: str, run: str) -> StackConfig:
    """A stack of this test's own: its state folder, schema prefix and stream prefix."""
    return StackConfig(
        state_dir=tmp_path / "state",
        database_url=database_url,
        db_schema_prefix=f"t_{run}_",
        redis_url=redis_url,
        stream_prefix=f"smtest:{run}:events",
        partitions=4,
        log_level="WARNING",
    )
