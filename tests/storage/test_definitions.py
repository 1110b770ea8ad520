"""Rule and window definitions, and the engines' outputs, in storage with real Postgres over mTLS:
versions from 1, update and enable/disable as new versions, INVALID_ARGUMENT naming the bad part,
tenant separation (NOT_FOUND), the change log the processors follow, idempotent
StoreEngineOutputs, keyset listings, and the peer policy."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest

from services.storage.server import DEFINITION_SERVICE
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.api.storage.v1 import definitions_pb2_grpc as pb_grpc
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from tests.storage.test_schema_registry import field_violations

if TYPE_CHECKING:
    Definitions = pb_grpc.DefinitionServiceAsyncStub
else:
    Definitions = pb_grpc.DefinitionServiceStub

RULE = common.DEFINITION_KIND_RULE
WINDOW = common.DEFINITION_KIND_WINDOW
WINDOW_ID = "orders-per-minute"
HOT = {
    "id": "hot-sensor",
    "kind": "threshold",
    "match": {"type": "reading"},
    "field": "payload.celsius",
    "op": "gt",
    "value": 80,
}
PER_MINUTE: dict[str, Any] = {
    "id": WINDOW_ID,
    "event_type": "order.created",
    "kind": "tumbling",
    "size": "1m",
    "aggregates": [{"name": "orders", "fn": "count"}],
}


@pytest.fixture
async def stub_for(
    pki_dir: Path, server: MeshServer
) -> AsyncIterator[Callable[[str], Definitions]]:
    channels: list[grpc.aio.Channel] = []

    def open_stub(who: str) -> Definitions:
        channel = create_channel(
            f"127.0.0.1:{server.port}",
            TlsMaterial.load(pki_dir, who),
            server_name="storage",
            config=service_config(DEFINITION_SERVICE, health_checked=False),
        )
        channels.append(channel)
        return cast(Definitions, pb_grpc.DefinitionServiceStub(channel))

    yield open_stub
    for channel in channels:
        await channel.close()


@pytest.fixture
def gateway(stub_for: Callable[[str], Definitions]) -> Definitions:
    return stub_for("gateway")


@pytest.fixture
def processor(stub_for: Callable[[str], Definitions]) -> Definitions:
    return stub_for("processor")


async def create(
    stub: Definitions,
    document: dict[str, Any],
    *,
    kind: common.DefinitionKind.ValueType = RULE,
    tenant: str = "t1",
) -> common.Definition:
    reply = await stub.CreateDefinition(
        pb.CreateDefinitionRequest(
            tenant=tenant, kind=kind, created_by="ada", definition_json=json.dumps(document)
        )
    )
    definition: common.Definition = reply.definition
    return definition


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def test_create_update_disable_as_versions(gateway: Definitions) -> None:
    first = await create(gateway, HOT)
    assert (first.id, first.version, first.enabled, first.created_by) == (
        "hot-sensor",
        1,
        True,
        "ada",
    )
    stored = json.loads(first.definition_json)
    # Storage owns tenant, version and (for a rule) enabled.
    assert (stored["tenant"], stored["version"], stored["enabled"]) == ("t1", 1, True)
    second = (
        await gateway.UpdateDefinition(
            pb.UpdateDefinitionRequest(
                tenant="t1",
                kind=RULE,
                id="hot-sensor",
                created_by="bob",
                definition_json=json.dumps({**HOT, "value": 90}),
            )
        )
    ).definition
    assert (second.version, second.created_by, json.loads(second.definition_json)["value"]) == (
        2,
        "bob",
        90,
    )
    off = await gateway.SetDefinitionEnabled(
        pb.SetDefinitionEnabledRequest(tenant="t1", kind=RULE, id="hot-sensor", enabled=False)
    )
    assert (off.changed, off.definition.version, off.definition.enabled) == (True, 3, False)
    assert json.loads(off.definition.definition_json)["enabled"] is False
    again = await gateway.SetDefinitionEnabled(
        pb.SetDefinitionEnabledRequest(tenant="t1", kind=RULE, id="hot-sensor", enabled=False)
    )
    assert (again.changed, again.definition.version) == (False, 3)
    latest = await gateway.GetDefinition(
        pb.GetDefinitionRequest(tenant="t1", kind=RULE, id="hot-sensor")
    )
    assert (latest.definition.version, latest.latest_version) == (3, 3)
    old = await gateway.GetDefinition(
        pb.GetDefinitionRequest(tenant="t1", kind=RULE, id="hot-sensor", version=1)
    )
    assert json.loads(old.definition.definition_json)["value"] == 80
    missing = await refused(
        gateway.GetDefinition(
            pb.GetDefinitionRequest(tenant="t1", kind=RULE, id="hot-sensor", version=9)
        )
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "versions 1 to 3" in missing.details()
    taken = await refused(create(gateway, HOT))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_window_is_checked_by_the_engine_parser_and_kinds_are_separate(
    gateway: Definitions,
) -> None:
    window = await create(gateway, PER_MINUTE, kind=WINDOW)
    assert (window.kind, window.version, window.enabled) == (WINDOW, 1, True)
    # A window document has no "enabled": disabling is the row's flag, in a new version.
    off = await gateway.SetDefinitionEnabled(
        pb.SetDefinitionEnabledRequest(tenant="t1", kind=WINDOW, id=WINDOW_ID, enabled=False)
    )
    assert (off.definition.version, off.definition.enabled) == (2, False)
    assert "enabled" not in json.loads(off.definition.definition_json)
    # The same id as a rule is another definition.
    rule_lookup = await refused(
        gateway.GetDefinition(pb.GetDefinitionRequest(tenant="t1", kind=RULE, id=WINDOW_ID))
    )
    assert rule_lookup.code() == grpc.StatusCode.NOT_FOUND
    bad = await refused(create(gateway, {**PER_MINUTE, "id": "w2", "size": "0s"}, kind=WINDOW))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(bad)[0][0] == "definition.size"


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({**HOT, "op": "between"}, "definition.op"),
        ({**HOT, "within": "soon"}, "definition.within"),
        ({**HOT, "frobnicate": 1}, "definition.frobnicate"),
        ({**HOT, "tenant": "t2"}, "definition.tenant"),
        ({k: v for k, v in HOT.items() if k != "id"}, "definition.id"),
        (
            {
                "id": "seq",
                "kind": "sequence",
                "steps": [{"type": "a"}, {"type": "b", "where": {"field": "nope", "op": "eq"}}],
                "within": "1m",
            },
            "definition.steps[1].where",
        ),
    ],
)
async def test_a_bad_rule_is_refused_naming_the_bad_part(
    gateway: Definitions, document: dict[str, Any], field: str
) -> None:
    error = await refused(create(gateway, document))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert violations and violations[0][0].startswith(field), violations


async def test_malformed_documents_are_refused(gateway: Definitions) -> None:
    for text, problem in (("", "required"), ("[1]", "JSON object"), ("{", "not JSON")):
        error = await refused(
            gateway.CreateDefinition(
                pb.CreateDefinitionRequest(tenant="t1", kind=RULE, definition_json=text)
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(error)[0][0] == "definition_json" and problem in error.details()
    huge = json.dumps({**HOT, "name": "x" * 70_000})
    error = await refused(
        gateway.CreateDefinition(
            pb.CreateDefinitionRequest(tenant="t1", kind=RULE, definition_json=huge)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    no_kind = await refused(
        gateway.CreateDefinition(
            pb.CreateDefinitionRequest(tenant="t1", definition_json=json.dumps(HOT))
        )
    )
    assert field_violations(no_kind)[0][0] == "kind"


async def test_a_version_given_is_replaced_by_the_one_written(gateway: Definitions) -> None:
    first = await create(gateway, {**HOT, "version": 7})
    assert json.loads(first.definition_json)["version"] == 1
    # The document as read back, edited and sent again: the next version.
    edited = {**json.loads(first.definition_json), "value": 99}
    second = await gateway.UpdateDefinition(
        pb.UpdateDefinitionRequest(
            tenant="t1", kind=RULE, id="hot-sensor", definition_json=json.dumps(edited)
        )
    )
    assert json.loads(second.definition.definition_json)["version"] == 2


async def test_activation_never_goes_backwards(gateway: Definitions) -> None:
    await create(gateway, {**HOT, "activation": "2026-12-01T12:00:00Z"})
    earlier = await refused(
        gateway.UpdateDefinition(
            pb.UpdateDefinitionRequest(
                tenant="t1",
                kind=RULE,
                id="hot-sensor",
                definition_json=json.dumps({**HOT, "activation": "2026-12-01T11:00:00Z"}),
            )
        )
    )
    assert field_violations(earlier)[0][0] == "definition.activation"
    # Left out, a version keeps the previous activation.
    kept = await gateway.UpdateDefinition(
        pb.UpdateDefinitionRequest(
            tenant="t1", kind=RULE, id="hot-sensor", definition_json=json.dumps(HOT)
        )
    )
    assert json.loads(kept.definition.definition_json)["activation"] == "2026-12-01T12:00:00Z"


async def test_tenants_do_not_see_or_touch_each_other(gateway: Definitions) -> None:
    await create(gateway, HOT, tenant="a")
    for call in (
        gateway.GetDefinition(pb.GetDefinitionRequest(tenant="b", kind=RULE, id="hot-sensor")),
        gateway.UpdateDefinition(
            pb.UpdateDefinitionRequest(
                tenant="b", kind=RULE, id="hot-sensor", definition_json=json.dumps(HOT)
            )
        ),
        gateway.SetDefinitionEnabled(
            pb.SetDefinitionEnabledRequest(tenant="b", kind=RULE, id="hot-sensor", enabled=False)
        ),
    ):
        assert (await refused(call)).code() == grpc.StatusCode.NOT_FOUND
    listed = await gateway.ListDefinitions(pb.ListDefinitionsRequest(tenant="b", kind=RULE))
    assert list(listed.definitions) == []
    # B may use the same id for its own rule.
    assert (await create(gateway, HOT, tenant="b")).version == 1


async def test_listing_pages_the_latest_versions_by_id(gateway: Definitions) -> None:
    for name in ("c", "a", "b"):
        await create(gateway, {**HOT, "id": name})
    await gateway.SetDefinitionEnabled(
        pb.SetDefinitionEnabledRequest(tenant="t1", kind=RULE, id="b", enabled=False)
    )
    first = await gateway.ListDefinitions(
        pb.ListDefinitionsRequest(tenant="t1", kind=RULE, page_size=2)
    )
    assert [(d.id, d.version) for d in first.definitions] == [("a", 1), ("b", 2)]
    rest = await gateway.ListDefinitions(
        pb.ListDefinitionsRequest(
            tenant="t1", kind=RULE, page_size=2, page_token=first.next_page_token
        )
    )
    assert [d.id for d in rest.definitions] == ["c"] and rest.next_page_token == ""
    other = await refused(
        gateway.ListDefinitions(
            pb.ListDefinitionsRequest(tenant="t2", kind=RULE, page_token=first.next_page_token)
        )
    )
    assert other.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_change_log_names_every_version_written(
    gateway: Definitions, processor: Definitions
) -> None:
    head = (await processor.ListDefinitionChanges(pb.ListDefinitionChangesRequest())).head_change_id
    await create(gateway, HOT, tenant="a")
    await create(gateway, PER_MINUTE, kind=WINDOW, tenant="b")
    await gateway.SetDefinitionEnabled(
        pb.SetDefinitionEnabledRequest(tenant="a", kind=RULE, id="hot-sensor", enabled=False)
    )
    # A no-op enable writes nothing and logs nothing.
    await gateway.SetDefinitionEnabled(
        pb.SetDefinitionEnabledRequest(tenant="a", kind=RULE, id="hot-sensor", enabled=False)
    )
    page = await processor.ListDefinitionChanges(
        pb.ListDefinitionChangesRequest(after_change_id=head, limit=2)
    )
    assert [(c.tenant, c.kind, c.id, c.version) for c in page.changes] == [
        ("a", RULE, "hot-sensor", 1),
        ("b", WINDOW, "orders-per-minute", 1),
    ]
    assert page.more
    rest = await processor.ListDefinitionChanges(
        pb.ListDefinitionChangesRequest(after_change_id=page.changes[-1].change_id)
    )
    assert [(c.id, c.version) for c in rest.changes] == [("hot-sensor", 2)]
    assert not rest.more and rest.head_change_id == rest.changes[-1].change_id
    # What a processor does with a change: read the version it names.
    named = await processor.GetDefinition(
        pb.GetDefinitionRequest(tenant="a", kind=RULE, id="hot-sensor", version=2)
    )
    assert not named.definition.enabled


def outputs(tenant: str = "t1") -> pb.StoreEngineOutputsRequest:
    return pb.StoreEngineOutputsRequest(
        alerts=[
            common.Alert(
                alert_id=f"{n:032x}",
                tenant=tenant,
                rule_id="hot-sensor",
                rule_version=1,
                rule_kind="threshold",
                key="sensor-1",
                first_event_time_unix_nanos=n * 1000,
                last_event_time_unix_nanos=n * 1000,
                event_ids=[f"e{n}", f"e{n + 1}"],
                detail_json=json.dumps({"value": 81 + n}),
            )
            for n in range(3)
        ],
        window_results=[
            common.WindowResult(
                tenant=tenant,
                window_id="orders-per-minute",
                window_version=1,
                partition=p,
                group="eu",
                start_unix_nanos=0,
                end_unix_nanos=60_000_000_000,
                revision=0,
                values_json=json.dumps({"orders": 3 + p}),
                watermark_unix_nanos=61_000_000_000,
            )
            for p in range(2)
        ],
        late_events=[
            common.LateEvent(
                tenant=tenant,
                source=WINDOW,
                definition_id="orders-per-minute",
                definition_version=1,
                event_id="late-1",
                event_key="k",
                event_time_unix_nanos=5,
                watermark_unix_nanos=200_000_000_000,
                window_start_unix_nanos=0,
                window_end_unix_nanos=60_000_000_000,
                reason="window closed beyond allowed lateness",
            )
        ],
    )


async def test_engine_outputs_are_stored_once_and_listed_by_tenant(
    gateway: Definitions, processor: Definitions
) -> None:
    first = await processor.StoreEngineOutputs(outputs())
    assert (first.alerts_written, first.window_results_written, first.late_events_written) == (
        3,
        2,
        1,
    )
    # A replay after a crash (same identities) writes nothing.
    replay = await processor.StoreEngineOutputs(outputs())
    assert (replay.alerts_written, replay.window_results_written, replay.late_events_written) == (
        0,
        0,
        0,
    )
    page = await gateway.ListAlerts(pb.ListAlertsRequest(tenant="t1", page_size=2))
    assert [a.alert_id for a in page.alerts] == [f"{2:032x}", f"{1:032x}"]
    assert list(page.alerts[0].event_ids) == ["e2", "e3"]
    assert json.loads(page.alerts[0].detail_json) == {"value": 83}
    rest = await gateway.ListAlerts(
        pb.ListAlertsRequest(tenant="t1", page_size=2, page_token=page.next_page_token)
    )
    assert [a.alert_id for a in rest.alerts] == [f"{0:032x}"] and not rest.next_page_token
    assert list((await gateway.ListAlerts(pb.ListAlertsRequest(tenant="t2"))).alerts) == []
    assert (
        list((await gateway.ListAlerts(pb.ListAlertsRequest(tenant="t1", rule_id="other"))).alerts)
        == []
    )
    results = await gateway.ListWindowResults(
        pb.ListWindowResultsRequest(tenant="t1", window_id="orders-per-minute", page_size=1)
    )
    assert [(r.partition, json.loads(r.values_json)) for r in results.window_results] == [
        (0, {"orders": 3})
    ]
    second = await gateway.ListWindowResults(
        pb.ListWindowResultsRequest(
            tenant="t1",
            window_id="orders-per-minute",
            page_size=1,
            page_token=results.next_page_token,
        )
    )
    assert [r.partition for r in second.window_results] == [1]
    forged = await refused(
        gateway.ListAlerts(pb.ListAlertsRequest(tenant="t1", page_token=results.next_page_token))
    )
    assert forged.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_outputs_are_refused_naming_the_item(processor: Definitions) -> None:
    request = outputs()
    request.window_results[1].values_json = "[1]"
    error = await refused(processor.StoreEngineOutputs(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error)[0][0] == "window_results[1].values_json"


async def test_peer_policy(
    gateway: Definitions, processor: Definitions, stub_for: Callable[[str], Definitions]
) -> None:
    denied = [
        processor.CreateDefinition(
            pb.CreateDefinitionRequest(tenant="t1", kind=RULE, definition_json="{}")
        ),
        gateway.StoreEngineOutputs(outputs()),
        gateway.ListDefinitionChanges(pb.ListDefinitionChangesRequest()),
        processor.ListAlerts(pb.ListAlertsRequest(tenant="t1")),
        stub_for("ingest").GetDefinition(pb.GetDefinitionRequest(tenant="t1", kind=RULE, id="x")),
    ]
    for call in denied:
        assert (await refused(call)).code() == grpc.StatusCode.PERMISSION_DENIED
