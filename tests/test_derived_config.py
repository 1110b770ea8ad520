"""The retry policy derived from the protos' idempotency options: walk every service of the API
and the config derived for it; a method that is not declared safe to retry must never be in a
retry policy, and the methods whose repeat does harm must stay undeclared."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import pytest
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions

import streammesh.api
from streammesh.mesh.client import MeshClientConfig, TlsFiles, parse_targets
from streammesh.mesh.derived_config import RetryPolicy, derive_service_config, idempotency_level

SAFE = {MethodOptions.IDEMPOTENT, MethodOptions.NO_SIDE_EFFECTS}


def every_service() -> list[ServiceDescriptor]:
    """Every service of every generated module under streammesh.api."""
    services = []
    for module_info in pkgutil.walk_packages(streammesh.api.__path__, "streammesh.api."):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(module_info.name)
            services.extend(module.DESCRIPTOR.services_by_name.values())
    return services


SERVICES = every_service()

ACCOUNT_FLOW = [
    # A repeat answers differently or does harm: a second account attempt is ALREADY_EXISTS, a
    # second StartLogin counts as another failure toward the lockout, a TOTP code or recovery
    # code is spent once, a spent refresh token used again revokes the whole session family.
    "Register",
    "BeginTotpEnrollment",
    "ConfirmTotpEnrollment",
    "StartLogin",
    "CompleteLogin",
    "RefreshSession",
    "Logout",
]

NEVER_RETRIED = {
    "streammesh.auth.v1.AuthService": [
        *ACCOUNT_FLOW,
        "CreateUser",
        "CreateTenant",
        "RotateSigningKey",
        "RetireSigningKey",
        "RevokeSessions",
    ],
    "streammesh.gateway.v1.GatewayService": ACCOUNT_FLOW,
    "streammesh.gateway.v1.AdminService": [
        "CreateUser",
        "CreateTenant",
        "RotateSigningKey",
        "RetireSigningKey",
        "RevokeSessions",
        "ReplayDeadLetter",
    ],
    "streammesh.storage.v1.StorageService": ["MarkDeadLetterReplayed"],
    "streammesh.storage.v1.DefinitionService": ["CreateDefinition", "UpdateDefinition"],
    "streammesh.gateway.v1.RuleService": [
        "CreateRule",
        "UpdateRule",
        "CreateWindow",
        "UpdateWindow",
    ],
}


def retried_names(config: dict[str, Any]) -> list[dict[str, str]]:
    return [name for mc in config["methodConfig"] if "retryPolicy" in mc for name in mc["name"]]


def test_the_walk_finds_every_service() -> None:
    names = {service.full_name for service in SERVICES}
    assert set(NEVER_RETRIED) <= names
    assert "streammesh.ingest.v1.IngestService" in names
    assert len(names) == len(SERVICES) >= 10


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.full_name)
def test_no_method_is_retried_unless_its_proto_says_it_is_safe(
    service: ServiceDescriptor,
) -> None:
    config = derive_service_config([service], retry=RetryPolicy(max_attempts=5))
    names = retried_names(config)
    # Every retried method is named: a name without "method" would retry the whole service.
    assert all(set(name) == {"service", "method"} for name in names)
    retried = {name["method"] for name in names}
    for method in service.methods:
        assert (method.name in retried) == (idempotency_level(method) in SAFE), method.full_name
    for method_config in config["methodConfig"]:
        policy = method_config["retryPolicy"]
        assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
        assert 2 <= policy["maxAttempts"] <= 5
        assert "timeout" not in method_config  # grpcio shortens those: set per call
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}


@pytest.mark.parametrize("service_name", sorted(NEVER_RETRIED))
def test_harmful_repeats_stay_undeclared(service_name: str) -> None:
    service = next(s for s in SERVICES if s.full_name == service_name)
    for name in NEVER_RETRIED[service_name]:
        level = idempotency_level(service.methods_by_name[name])
        assert level == MethodOptions.IDEMPOTENCY_UNKNOWN, f"{service_name}/{name}"
    retried = {n["method"] for n in retried_names(derive_service_config([service]))}
    assert not retried & set(NEVER_RETRIED[service_name])


def test_store_and_publish_are_retried() -> None:
    by_name = {s.full_name: s for s in SERVICES}
    retried = {
        (n["service"], n["method"])
        for n in retried_names(
            derive_service_config(
                [
                    by_name["streammesh.storage.v1.StorageService"],
                    by_name["streammesh.ingest.v1.IngestService"],
                ]
            )
        )
    }
    assert ("streammesh.storage.v1.StorageService", "StoreEvents") in retried
    assert ("streammesh.storage.v1.StorageService", "StoreDeadLetter") in retried
    assert ("streammesh.ingest.v1.IngestService", "PublishBatch") in retried
    assert ("streammesh.ingest.v1.IngestService", "Publish") in retried


def test_retry_policy_bounds() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=6)
    policy = RetryPolicy().policy(["UNAVAILABLE"])
    assert policy["initialBackoff"] == "0.05s"
    assert policy["maxBackoff"] == "1s"


def test_client_config_timeouts_cover_unary_methods_only(tmp_path: Any) -> None:
    ingest = next(s for s in SERVICES if s.full_name == "streammesh.ingest.v1.IngestService")
    config = MeshClientConfig(
        server_name="ingest",
        targets=("127.0.0.1:1",),
        tls=TlsFiles(tmp_path / "ca.pem"),
        services=(ingest,),
        timeout_seconds=7,
    )
    assert config.timeouts() == {"/streammesh.ingest.v1.IngestService/PublishBatch": 7}
    assert config.service_config()["healthCheckConfig"] == {"serviceName": ingest.full_name}
    with pytest.raises(ValueError, match="is a stream"):
        MeshClientConfig(
            server_name="ingest",
            targets=("127.0.0.1:1",),
            tls=TlsFiles(tmp_path / "ca.pem"),
            services=(ingest,),
            method_timeouts={"streammesh.ingest.v1.IngestService/Publish": 1},
        )


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (("127.0.0.1:1",), "127.0.0.1:1"),
        (("dns:///storage.internal:50055",), "dns:///storage.internal:50055"),
        (("10.0.0.1:1", "10.0.0.2:1"), "ipv4:10.0.0.1:1,10.0.0.2:1"),
        (("[::1]:1", "[::1]:2"), "ipv6:[::1]:1,[::1]:2"),
    ],
)
def test_targets(targets: tuple[str, ...], expected: str, tmp_path: Any) -> None:
    config = MeshClientConfig(
        server_name="x", targets=targets, tls=TlsFiles(tmp_path / "ca.pem"), services=()
    )
    assert config.target == expected


def test_parse_targets() -> None:
    assert parse_targets(" 10.0.0.1:1, 10.0.0.2:1 ") == ("10.0.0.1:1", "10.0.0.2:1")
    assert parse_targets("ipv4:10.0.0.1:1,10.0.0.2:1") == ("ipv4:10.0.0.1:1,10.0.0.2:1",)
    assert parse_targets("dns:///storage:50055") == ("dns:///storage:50055",)


@pytest.mark.parametrize(
    "targets", [(), ("storage-a:1", "storage-b:1"), ("10.0.0.1:1", "[::1]:1"), ("10.0.0.1", "x")]
)
def test_bad_targets_are_refused(targets: tuple[str, ...], tmp_path: Any) -> None:
    with pytest.raises(ValueError):
        MeshClientConfig(
            server_name="x", targets=targets, tls=TlsFiles(tmp_path / "ca.pem"), services=()
        )
