"""One stack for the end-to-end tests: real processes started by the CLI's own code, on free
loopback ports, with its own state folder, database schemas and stream prefix, so it runs beside
a user's stack."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from streammesh.cli.stack import START_ORDER, StackConfig, bring_up, free_ports, shut_down
from tests.e2e.cli import drop_test_data


@pytest.fixture(scope="session")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    run = uuid.uuid4().hex[:10]
    ports = dict(zip(START_ORDER, free_ports("127.0.0.1", len(START_ORDER)), strict=True))
    config = StackConfig(
        state_dir=tmp_path_factory.mktemp("stack"),
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
        storage_port=ports["storage"],
        auth_port=ports["auth"],
        ingest_port=ports["ingest"],
        processor_port=ports["processor"],
        gateway_port=ports["gateway"],
    )
    yield config


@pytest.fixture(scope="session")
async def stack(stack_config: StackConfig) -> AsyncIterator[StackConfig]:
    await bring_up(stack_config, timeout=90)
    yield stack_config
    shut_down(stack_config)
    await drop_test_data(stack_config)
