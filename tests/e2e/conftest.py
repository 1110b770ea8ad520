"""One stack for the end-to-end tests: real processes started by the CLI's own code, on free
loopback ports, with its own state folder, database schemas and stream prefix, so it runs beside
a user's stack."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streammesh.cli.stack import START_ORDER, StackConfig, bring_up, free_ports, shut_down
from tests.e2e.cli import drop_test_data


def new_stack_config(state_dir: Path) -> StackConfig:
    """A stack of its own in `state_dir`: free ports, schemas `t_<run>_*`, keys `smtest:<run>:*`."""
    run = uuid.uuid4().hex[:10]
    chosen = free_ports("127.0.0.1", 2 * len(START_ORDER))
    ports = dict(zip(START_ORDER, chosen, strict=False))
    # /metrics on free ports too, so that two stacks (or a developer's own) never share one.
    metrics = dict(zip(START_ORDER, chosen[len(START_ORDER) :], strict=True))
    return StackConfig(
        state_dir=state_dir,
        host="127.0.0.1",
        database_url=os.environ.get(
            "STREAMMESH_TEST_DATABASE_URL",
            "postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh_test",
        ),
        db_schema_prefix=f"t_{run}_",
        redis_url=os.environ.get("STREAMMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        stream_prefix=f"smtest:{run}:events",
        auth_redis_prefix=f"smtest:{run}:auth:",
        partitions=4,
        log_level="WARNING",
        # Short-lived certificates, and services that take rotated ones up within half a second.
        leaf_lifetime_seconds=3600,
        tls_reload_seconds=0.5,
        storage_port=ports["storage"],
        auth_port=ports["auth"],
        ingest_port=ports["ingest"],
        processor_port=ports["processor"],
        gateway_port=ports["gateway"],
        storage_metrics_port=metrics["storage"],
        auth_metrics_port=metrics["auth"],
        ingest_metrics_port=metrics["ingest"],
        processor_metrics_port=metrics["processor"],
        gateway_metrics_port=metrics["gateway"],
    )


@contextlib.asynccontextmanager
async def running_stack(config: StackConfig) -> AsyncIterator[StackConfig]:
    """The five services up for the block; afterwards stopped, their data dropped."""
    await bring_up(config, timeout=90)
    try:
        yield config
    finally:
        shut_down(config)
        await drop_test_data(config)


@pytest.fixture(scope="session")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    return new_stack_config(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="session")
async def stack(stack_config: StackConfig) -> AsyncIterator[StackConfig]:
    async with running_stack(stack_config) as config:
        yield config
