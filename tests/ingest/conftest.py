"""Ingest fixtures: a client of the test's Redis, and an in-process ingest on port 0 over real
mTLS appending to streams under the test's own key prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.ingest.server import IngestDeps, create_server
from services.ingest.settings import IngestSettings
from streammesh.mesh import MeshServer
from streammesh.streams import StreamLayout
from tests.conftest import TRUST_DOMAIN


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def ingest(
    pki_dir: Path, redis_client: aioredis.Redis, redis_prefix: str
) -> AsyncIterator[tuple[MeshServer, StreamLayout]]:
    settings = IngestSettings(
        port=0, tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, partitions=4, max_batch_events=100
    )
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=4)
    await layout.ensure_group(redis_client)
    mesh = create_server(settings, IngestDeps(redis_client, layout))
    await mesh.start()
    yield mesh, layout
    await mesh.stop(0)
