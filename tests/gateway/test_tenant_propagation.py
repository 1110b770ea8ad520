"""The tenant travels from the gateway to the services behind it: every call the gateway makes
for a verified caller names the caller's tenant (`x-streammesh-tenant`), and an internal
service reads it with the one helper, `streammesh.mesh.tenancy.caller_tenant`.

A second gateway here talks to a real ingest and a real storage of their own (own storage
schema, the stack's Redis streams) whose peer-policy guards also record what `caller_tenant`
returns for each call; auth shows it in the tenant of the audit rows it writes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from services.ingest import server as ingest_server
from services.ingest.server import IngestDeps
from services.ingest.settings import IngestSettings
from services.storage import server as storage_server
from services.storage.server import StorageDeps, create_event_pool
from services.storage.settings import StorageSettings
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.mesh import PeerPolicy
from streammesh.mesh.errors import PermissionDenied
from streammesh.mesh.postgres import create_engine, load_migrations, migrate
from streammesh.mesh.tenancy import TENANT_METADATA, caller_tenant
from tests.conftest import TRUST_DOMAIN
from tests.gateway.conftest import GatewayStub, Stack, start_gateway
from tests.gateway.test_tenants import Tenants, tenants  # noqa: F401 (the module fixture)

pytestmark = pytest.mark.timeout(120)


@dataclass
class Seen:
    """(method, tenant the service read) for every call that passed the policy."""

    calls: list[tuple[str, str | None]] = field(default_factory=list)

    def tenants_of(self, method: str) -> list[str | None]:
        return [tenant for name, tenant in self.calls if name.endswith(f"/{method}")]


def recording_policy(seen: Seen) -> type[PeerPolicy]:
    """PeerPolicy whose guard also records the tenant the call names (after the policy)."""

    class Recording(PeerPolicy):
        async def __call__(self, method: str, context: grpc.aio.ServicerContext) -> None:
            await super().__call__(method, context)
            seen.calls.append((method, caller_tenant(context, trust_domain=TRUST_DOMAIN)))

    return Recording


@pytest.fixture(scope="module")
async def observed(
    stack: Stack, pki_dir: Path, database_url: str
) -> AsyncIterator[tuple[GatewayStub, Seen]]:
    seen = Seen()
    schema = f"t_{uuid.uuid4().hex[:12]}_storage"
    patch = pytest.MonkeyPatch()
    async with contextlib.AsyncExitStack() as exit_stack:
        engine = create_engine(database_url, schema=schema, application_name="tenant-tests")
        exit_stack.push_async_callback(engine.dispose)
        await migrate(
            engine, schema=schema, migrations=load_migrations("services.storage.migrations")
        )

        async def drop() -> None:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        exit_stack.push_async_callback(drop)
        pool = await create_event_pool(database_url, schema=schema, application_name="tenant-tests")
        exit_stack.push_async_callback(pool.close)
        with patch.context() as patched:
            patched.setattr(storage_server, "PeerPolicy", recording_policy(seen))
            patched.setattr(ingest_server, "PeerPolicy", recording_policy(seen))
            storage = storage_server.create_server(
                StorageSettings(
                    port=0, tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, db_schema=schema
                ),
                StorageDeps(engine=engine, pool=pool),
            )
            ingest = ingest_server.create_server(
                IngestSettings(port=0, tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, partitions=2),
                IngestDeps(stack.redis, stack.layout),
            )
        for server in (storage, ingest):
            await server.start()
            exit_stack.push_async_callback(server.stop, 0)
        settings = stack.gateway_settings.model_copy(
            update={
                "ingest_target": f"127.0.0.1:{ingest.port}",
                "storage_target": f"127.0.0.1:{storage.port}",
            }
        )
        gateway = await start_gateway(stack, settings, "observed", exit_stack)
        yield gateway.stub, seen


async def test_every_internal_call_names_the_callers_tenant(
    observed: tuple[GatewayStub, Seen],
    tenants: Tenants,  # noqa: F811 (the imported fixture)
) -> None:
    gateway, seen = observed
    for name in ("a-user", "b-user"):
        person = tenants.people[name]
        tenant = tenants.tenant_of[name]
        event = event_pb2.Event(key="k", type="t", payload=b"{}")
        await gateway.PublishBatch(
            gateway_pb2.PublishBatchRequest(events=[event]), metadata=person.bearer(), timeout=10
        )
        call = gateway.Publish(metadata=person.bearer(), timeout=10)
        await call.write(gateway_pb2.PublishRequest(sequence=1, events=[event]))
        ack = await call.read()
        assert not ack.HasField("refusal")
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await gateway.CountEvents(
            gateway_pb2.CountEventsRequest(), metadata=person.bearer(), timeout=10
        )
        await gateway.QueryEvents(
            gateway_pb2.QueryEventsRequest(), metadata=person.bearer(), timeout=10
        )
        for method in ("PublishBatch", "Publish", "CountEvents", "QueryEvents"):
            assert seen.tenants_of(method)[-1] == tenant, method


class _Context:
    """Just what caller_tenant reads of a servicer context (pure-logic check of the helper)."""

    def __init__(self, identity: str | None, metadata: tuple[tuple[str, Any], ...]) -> None:
        self._identity = identity
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"peer_spiffe_id": [self._identity.encode()]} if self._identity else {}


def test_caller_tenant_believes_only_the_gateway_and_operators() -> None:
    gateway = f"spiffe://{TRUST_DOMAIN}/service/gateway"
    named = ((TENANT_METADATA, "acme"),)

    def read(identity: str | None, metadata: tuple[tuple[str, Any], ...]) -> str | None:
        return caller_tenant(cast(Any, _Context(identity, metadata)), trust_domain=TRUST_DOMAIN)

    assert read(gateway, named) == "acme"
    assert read(f"spiffe://{TRUST_DOMAIN}/operator/admin", named) == "acme"
    assert read(gateway, ()) is None
    with pytest.raises(PermissionDenied):
        read(f"spiffe://{TRUST_DOMAIN}/service/processor", named)
    for bad in (((TENANT_METADATA, "Not valid"),), named + named):
        with pytest.raises(Exception, match="malformed caller metadata"):
            read(gateway, bad)
