"""The gateway's upstream clients: what they retry comes from the protos (never a method that is
not declared safe), replicas are named by the settings, and deadlines are set per method."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor_pb2 import MethodOptions

from services.gateway.settings import GatewaySettings
from services.gateway.upstream import AUTH, INGEST, Upstreams
from streammesh.mesh.client import TlsFiles
from streammesh.mesh.derived_config import idempotency_level
from tests.conftest import TRUST_DOMAIN

SAFE = {MethodOptions.IDEMPOTENT, MethodOptions.NO_SIDE_EFFECTS}


@pytest.fixture
async def upstreams(pki_dir: Path) -> Upstreams:
    settings = GatewaySettings(
        tls_dir=pki_dir,
        trust_domain=TRUST_DOMAIN,
        auth_target="127.0.0.1:1",
        ingest_target="127.0.0.1:2,127.0.0.1:3",
        storage_target="dns:///storage.invalid:4",
        upstream_timeout_seconds=7,
        audit_timeout_seconds=0.5,
    )
    return Upstreams(settings, TlsFiles.of(pki_dir, "gateway"))


async def test_only_methods_declared_safe_are_retried(upstreams: Upstreams) -> None:
    try:
        for client in upstreams.clients:
            methods = {
                f"{service.full_name}/{method.name}": method
                for service in client.config.services
                for method in service.methods
            }
            retried = [
                f"{name['service']}/{name['method']}"
                for method_config in client.service_config["methodConfig"]
                if "retryPolicy" in method_config
                for name in method_config["name"]
            ]
            # With several replicas the unary ones are retried by the client, across them.
            retried += [path.lstrip("/") for path in client.config.retried_codes()]
            assert retried
            for path in retried:
                assert idempotency_level(methods[path]) in SAFE, path
            unsafe = {path for path, m in methods.items() if idempotency_level(m) not in SAFE}
            assert not unsafe & set(retried)
    finally:
        await upstreams.close()


async def test_targets_and_deadlines_come_from_the_settings(upstreams: Upstreams) -> None:
    try:
        auth, ingest, storage = upstreams.clients
        assert ingest.config.target == "ipv4:127.0.0.1:2,127.0.0.1:3"
        assert storage.config.target == "dns:///storage.invalid:4"
        timeouts = auth.config.timeouts()
        assert timeouts[f"/{AUTH.full_name}/RecordAuditEvent"] == 0.5
        assert timeouts[f"/{AUTH.full_name}/StartLogin"] == 7
        assert f"/{AUTH.full_name}/WatchRevocations" not in timeouts  # a stream
        assert ingest.config.timeouts() == {f"/{INGEST.full_name}/PublishBatch": 7}
        assert ingest.service_config["healthCheckConfig"] == {"serviceName": INGEST.full_name}
        assert len(ingest.channel.channels) == 2  # one per replica, so that one can be ejected
        assert len(storage.channel.channels) == 1  # gRPC balances over what the name resolves
        assert {client.config.max_in_flight for client in upstreams.clients} == {256}
    finally:
        await upstreams.close()
