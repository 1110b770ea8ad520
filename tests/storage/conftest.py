"""Storage fixtures: a migrated engine on the test's own schema, an in-process server on port 0,
and mTLS clients that present a chosen identity."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.server import SERVICE, StorageDeps, create_event_pool, create_server
from services.storage.settings import StorageSettings
from services.storage.times import use_integer_timestamps
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2_grpc
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.mesh.postgres import create_engine, load_migrations, migrate
from tests.conftest import TRUST_DOMAIN

if TYPE_CHECKING:
    Stub = storage_pb2_grpc.StorageServiceAsyncStub
else:
    Stub = storage_pb2_grpc.StorageServiceStub
StartServer = Callable[..., Awaitable[MeshServer]]
Connect = Callable[..., Stub]

BASE_TIME = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def storage_settings(pki_dir: Path, **overrides: Any) -> StorageSettings:
    return StorageSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, port=0, **overrides)


def queued(
    key: str = "k",
    *,
    event_id: str | None = None,
    type_: str = "order.created",
    event_time: dt.datetime | None = None,
    ingest_time: dt.datetime = BASE_TIME,
    payload: bytes = b'{"n":1}',
    attributes: dict[str, str] | None = None,
    content_type: str = "",
    producer: str = "user-1",
) -> event_pb2.QueuedEvent:
    """A QueuedEvent as ingest would hand it over (a fresh UUID id unless given)."""
    event = event_pb2.Event(
        id=str(uuid.uuid4()) if event_id is None else event_id,
        key=key,
        type=type_,
        payload=payload,
        content_type=content_type,
        attributes=attributes or {},
    )
    if event_time is not None:
        event.event_time.FromDatetime(event_time)
    message = event_pb2.QueuedEvent(event=event, producer=producer)
    message.ingest_time.FromDatetime(ingest_time)
    return message


@pytest.fixture
async def engine(database_url: str, pg_schema: str) -> AsyncIterator[AsyncEngine]:
    """An engine on this test's schema, migrated."""
    engine = create_engine(database_url, schema=pg_schema, application_name="storage-tests")
    await migrate(
        engine, schema=pg_schema, migrations=load_migrations("services.storage.migrations")
    )
    yield engine
    await engine.dispose()


@contextlib.asynccontextmanager
async def schema_connection(database_url: str, schema: str) -> AsyncIterator[Any]:
    """A plain asyncpg connection whose search_path is `schema` (timestamps as integers, as
    storage's pool exchanges them); closed on leaving."""
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        database=url.database,
        server_settings={"search_path": schema},
    )
    try:
        await use_integer_timestamps(connection)
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def start_server(pki_dir: Path, pg_schema: str) -> AsyncIterator[StartServer]:
    """Start storage servers over a given engine, with an insert pool on the engine's database
    (settings overridable); stopped afterwards."""
    started: list[MeshServer] = []
    pools: list[asyncpg.Pool] = []

    async def start(engine: AsyncEngine, **overrides: Any) -> MeshServer:
        settings = storage_settings(pki_dir, db_schema=pg_schema, **overrides)
        pool = await create_event_pool(
            engine.url.render_as_string(hide_password=False),
            schema=settings.db_schema,
            application_name="storage-tests",
        )
        pools.append(pool)
        mesh = create_server(settings, StorageDeps(engine=engine, pool=pool))
        await mesh.start()
        started.append(mesh)
        return mesh

    yield start
    for mesh in started:
        await mesh.stop(0)
    for pool in pools:
        await pool.close()


@pytest.fixture
async def server(start_server: StartServer, engine: AsyncEngine) -> MeshServer:
    return await start_server(engine)


@pytest.fixture
async def connect(pki_dir: Path) -> AsyncIterator[Connect]:
    """`connect(port, who)` returns a stub over mTLS presenting `who`'s certificate."""
    channels: list[grpc.aio.Channel] = []

    def open_stub(port: int, who: str) -> Stub:
        channel = create_channel(
            f"127.0.0.1:{port}",
            TlsMaterial.load(pki_dir, who),
            server_name="storage",
            config=service_config(SERVICE, health_checked=False),
        )
        channels.append(channel)
        return cast(Stub, storage_pb2_grpc.StorageServiceStub(channel))

    yield open_stub
    for channel in channels:
        await channel.close()


@pytest.fixture
def processor(server: MeshServer, connect: Connect) -> Stub:
    """The identity allowed to write."""
    return connect(server.port, "processor")


@pytest.fixture
def gateway(server: MeshServer, connect: Connect) -> Stub:
    """The identity allowed to read."""
    return connect(server.port, "gateway")


def _micros(stamp: Timestamp) -> int:
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def as_columns(batch: event_pb2.QueuedBatch) -> event_pb2.QueuedColumns:
    """The batch in the queue's columnar form, as ingest would have queued its events."""
    columns = event_pb2.QueuedColumns(partition=batch.partition)
    for queued in batch.events:
        event = queued.event
        stamp = event.event_time if event.HasField("event_time") else queued.ingest_time
        columns.ids.append(event.id)
        columns.keys.append(event.key)
        columns.types.append(event.type)
        columns.payloads.append(event.payload)
        columns.content_types.append(event.content_type)
        columns.attributes.append(
            json.dumps(dict(event.attributes), separators=(",", ":")) if event.attributes else "{}"
        )
        columns.event_time_micros.append(_micros(stamp))
        columns.event_time_nanos.append(stamp.nanos % 1000 if event.HasField("event_time") else 0)
        # One run per event (ingest writes one per entry): run handling is exercised too.
        columns.ingest_time_micros.append(_micros(queued.ingest_time))
        columns.producers.append(queued.producer)
        columns.run_lengths.append(1)
    return columns
