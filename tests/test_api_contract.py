"""Drift checks between the protos and the code: every RPC has a handler, and every message the
gateway relays by re-parsing bytes is wire-compatible with its internal twin."""

from __future__ import annotations

from typing import ClassVar, Protocol

import pytest
from google.protobuf.descriptor import Descriptor, ServiceDescriptor

from services.auth.service import AuthServicer
from services.gateway.admin import AdminServicer
from services.gateway.rules import RuleServicer
from services.gateway.schema_registry import SchemaRegistryServicer
from services.gateway.service import GatewayServicer
from services.ingest.service import IngestServicer
from services.processor.service import ProcessorServicer
from services.storage.definition_service import DefinitionServicer
from services.storage.registry_service import SchemaRegistryServicer as StorageRegistryServicer
from services.storage.service import StorageServicer
from streammesh.api.auth.v1 import auth_pb2, auth_pb2_grpc
from streammesh.api.gateway.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from streammesh.api.gateway.v1 import rules_pb2 as public_rules
from streammesh.api.gateway.v1 import rules_pb2_grpc as public_rules_grpc
from streammesh.api.gateway.v1 import schema_registry_pb2 as public_registry
from streammesh.api.gateway.v1 import schema_registry_pb2_grpc as public_registry_grpc
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc
from streammesh.api.storage.v1 import definitions_pb2 as storage_definitions
from streammesh.api.storage.v1 import definitions_pb2_grpc as storage_definitions_grpc
from streammesh.api.storage.v1 import schema_registry_pb2 as storage_registry
from streammesh.api.storage.v1 import schema_registry_pb2_grpc as storage_registry_grpc
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc

SERVICES = [
    (
        gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
        GatewayServicer,
        gateway_pb2_grpc.GatewayServiceServicer,
    ),
    (
        admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
        AdminServicer,
        admin_pb2_grpc.AdminServiceServicer,
    ),
    (
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
        AuthServicer,
        auth_pb2_grpc.AuthServiceServicer,
    ),
    (
        ingest_pb2.DESCRIPTOR.services_by_name["IngestService"],
        IngestServicer,
        ingest_pb2_grpc.IngestServiceServicer,
    ),
    (
        processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
        ProcessorServicer,
        processor_pb2_grpc.ProcessorServiceServicer,
    ),
    (
        storage_pb2.DESCRIPTOR.services_by_name["StorageService"],
        StorageServicer,
        storage_pb2_grpc.StorageServiceServicer,
    ),
    (
        public_registry.DESCRIPTOR.services_by_name["SchemaRegistryService"],
        SchemaRegistryServicer,
        public_registry_grpc.SchemaRegistryServiceServicer,
    ),
    (
        storage_registry.DESCRIPTOR.services_by_name["SchemaRegistryService"],
        StorageRegistryServicer,
        storage_registry_grpc.SchemaRegistryServiceServicer,
    ),
    (
        public_rules.DESCRIPTOR.services_by_name["RuleService"],
        RuleServicer,
        public_rules_grpc.RuleServiceServicer,
    ),
    (
        storage_definitions.DESCRIPTOR.services_by_name["DefinitionService"],
        DefinitionServicer,
        storage_definitions_grpc.DefinitionServiceServicer,
    ),
]


@pytest.mark.parametrize(
    ("service", "servicer", "base"), SERVICES, ids=lambda v: getattr(v, "name", "")
)
def test_every_rpc_has_a_handler(service: ServiceDescriptor, servicer: type, base: type) -> None:
    missing = [
        m.name for m in service.methods if getattr(servicer, m.name) is getattr(base, m.name)
    ]
    assert missing == [], f"{servicer.__name__} does not implement {missing}"


def _assert_wire_compatible(public: Descriptor, internal: Descriptor, path: str) -> None:
    """Every public field has an internal twin of the same number, name, type and label;
    message-typed fields from different packages (a gateway.v1 twin of an auth.v1 message)
    are compared field by field in turn."""
    twins = {f.number: f for f in internal.fields}
    for field in public.fields:
        where = f"{path}.{field.name}"
        twin = twins.get(field.number)
        assert twin is not None, f"{where} (field {field.number}) has no internal twin"
        # Presence too: an `optional` filter field must stay optional on both sides, or "unset"
        # and "zero" would mean different things to the two services.
        shape = (field.name, field.type, field.is_repeated, field.has_presence)
        assert shape == (twin.name, twin.type, twin.is_repeated, twin.has_presence), (
            f"{where} differs"
        )
        if field.enum_type is not None:
            assert twin.enum_type is not None, f"{where} differs"
            assert field.enum_type.full_name == twin.enum_type.full_name, f"{where} differs"
        if field.message_type is not None:
            public_type, internal_type = field.message_type, twin.message_type
            assert internal_type is not None, f"{where} differs"
            if public_type.full_name != internal_type.full_name:
                _assert_wire_compatible(public_type, internal_type, where)


class GeneratedMessage(Protocol):
    """A generated message class, as its stub declares it. (The base `Message` types DESCRIPTOR
    as `Descriptor | upb's Descriptor`; at run time it is upb's, which protobuf makes an instance
    of `Descriptor`.)"""

    DESCRIPTOR: ClassVar[Descriptor]


DEAD_LETTER_METHODS = frozenset({"ListDeadLetters", "GetDeadLetter", "ReplayDeadLetter"})
"""AdminService methods the gateway serves with storage and ingest instead of relaying to auth."""

# (public message, internal message): the internal one may add fields, never change shared ones.
RELAYED = [
    (gateway_pb2.RegisterRequest, auth_pb2.RegisterRequest),
    (gateway_pb2.RegisterResponse, auth_pb2.RegisterResponse),
    (gateway_pb2.BeginTotpEnrollmentRequest, auth_pb2.BeginTotpEnrollmentRequest),
    (gateway_pb2.BeginTotpEnrollmentResponse, auth_pb2.BeginTotpEnrollmentResponse),
    (gateway_pb2.ConfirmTotpEnrollmentRequest, auth_pb2.ConfirmTotpEnrollmentRequest),
    (gateway_pb2.ConfirmTotpEnrollmentResponse, auth_pb2.ConfirmTotpEnrollmentResponse),
    (gateway_pb2.StartLoginRequest, auth_pb2.StartLoginRequest),
    (gateway_pb2.StartLoginResponse, auth_pb2.StartLoginResponse),
    (gateway_pb2.CompleteLoginRequest, auth_pb2.CompleteLoginRequest),
    (gateway_pb2.CompleteLoginResponse, auth_pb2.CompleteLoginResponse),
    (gateway_pb2.RefreshSessionRequest, auth_pb2.RefreshSessionRequest),
    (gateway_pb2.RefreshSessionResponse, auth_pb2.RefreshSessionResponse),
    (gateway_pb2.LogoutRequest, auth_pb2.LogoutRequest),
    (gateway_pb2.LogoutResponse, auth_pb2.LogoutResponse),
    (gateway_pb2.PublishRequest, ingest_pb2.PublishRequest),
    (gateway_pb2.PublishResponse, ingest_pb2.PublishResponse),
    (gateway_pb2.PublishBatchRequest, ingest_pb2.PublishBatchRequest),
    (gateway_pb2.PublishBatchResponse, ingest_pb2.PublishBatchResponse),
    (gateway_pb2.QueryEventsRequest, storage_pb2.QueryEventsRequest),
    (gateway_pb2.QueryEventsResponse, storage_pb2.QueryEventsResponse),
    (public_rules.SubscribeAlertsRequest, storage_definitions.SubscribeAlertsRequest),
    (public_rules.SubscribeAlertsResponse, storage_definitions.SubscribeAlertsResponse),
    (public_rules.SubscribeWindowResultsRequest, storage_definitions.SubscribeWindowResultsRequest),
    (
        public_rules.SubscribeWindowResultsResponse,
        storage_definitions.SubscribeWindowResultsResponse,
    ),
    (gateway_pb2.SubscribeEventsRequest, storage_pb2.SubscribeEventsRequest),
    (gateway_pb2.SubscribeEventsResponse, storage_pb2.SubscribeEventsResponse),
    (gateway_pb2.CountEventsRequest, storage_pb2.CountEventsRequest),
    (gateway_pb2.CountEventsResponse, storage_pb2.CountEventsResponse),
    (gateway_pb2.AggregateEventsRequest, storage_pb2.AggregateEventsRequest),
    (gateway_pb2.AggregateEventsResponse, storage_pb2.AggregateEventsResponse),
    *(
        (getattr(admin_pb2, f"{method.name}{kind}"), getattr(auth_pb2, f"{method.name}{kind}"))
        for method in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods
        if method.name not in DEAD_LETTER_METHODS
        for kind in ("Request", "Response")
    ),
    # Dead letters: listing and reading are relayed to storage; a replay returns storage's
    # DeadLetter (its request and response are the gateway's own).
    (admin_pb2.ListDeadLettersRequest, storage_pb2.ListDeadLettersRequest),
    (admin_pb2.ListDeadLettersResponse, storage_pb2.ListDeadLettersResponse),
    (admin_pb2.GetDeadLetterRequest, storage_pb2.GetDeadLetterRequest),
    (admin_pb2.GetDeadLetterResponse, storage_pb2.GetDeadLetterResponse),
    (admin_pb2.DeadLetter, storage_pb2.DeadLetter),
    # The schema registry: every method relayed to storage's, which adds `tenant`.
    *(
        (
            getattr(public_registry, f"{method.name}{kind}"),
            getattr(storage_registry, f"{method.name}{kind}"),
        )
        for method in public_registry.DESCRIPTOR.services_by_name["SchemaRegistryService"].methods
        for kind in ("Request", "Response")
    ),
    # Rules: alerts, window results and late events are relayed as they are (storage adds
    # `tenant` and `principal`); the rule and window calls are re-built by the gateway with the
    # kind (services/gateway/rules.py).
    *(
        (getattr(public_rules, f"{name}{kind}"), getattr(storage_definitions, f"{name}{kind}"))
        for name in ("ListAlerts", "ListWindowResults", "ListLateEvents")
        for kind in ("Request", "Response")
    ),
]


@pytest.mark.parametrize(("public", "internal"), RELAYED, ids=lambda m: m.DESCRIPTOR.full_name)
def test_relayed_messages_are_wire_compatible(
    public: type[GeneratedMessage], internal: type[GeneratedMessage]
) -> None:
    _assert_wire_compatible(public.DESCRIPTOR, internal.DESCRIPTOR, public.DESCRIPTOR.name)


@pytest.mark.parametrize(
    "service",
    [
        gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
        admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
        public_registry.DESCRIPTOR.services_by_name["SchemaRegistryService"],
    ],
    ids=lambda s: s.name,
)
def test_every_public_method_has_its_own_access_rule(service: ServiceDescriptor) -> None:
    """The gateway's table is default deny; each method is declared by name (no wildcard)."""
    from services.gateway.access import METHOD_ACCESS

    declared = {f"{service.full_name}/{m.name}" for m in service.methods}
    assert declared - set(METHOD_ACCESS) == set()


def test_every_admin_method_is_relayed_to_auth_or_declared_a_dead_letter_call() -> None:
    """A new AdminService method needs an auth twin or a place in DEAD_LETTER_METHODS."""
    service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    auth_methods = {m.name for m in auth_pb2.DESCRIPTOR.services_by_name["AuthService"].methods}
    storage_methods = {
        m.name for m in storage_pb2.DESCRIPTOR.services_by_name["StorageService"].methods
    }
    for method in service.methods:
        if method.name in DEAD_LETTER_METHODS:
            assert method.name == "ReplayDeadLetter" or method.name in storage_methods
        else:
            assert method.name in auth_methods, method.name
