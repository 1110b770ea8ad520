"""The query API of StorageService over real mTLS and Postgres: AIP-160 filters on payloads and
attributes (payloads that are not JSON never fail a query), tenant scope, page tokens bound to
the query and the principal, counts and aggregates, and the bounds that make a too-broad query
RESOURCE_EXHAUSTED. Paging while writers commit: test_query_paging.py."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.queries import NARROW_HINT
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from tests.storage.conftest import Connect, StartServer, Stub, queued
from tests.storage.test_storage import store_request


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields a refusal's BadRequest detail names (whatever other details it carries)."""
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [violation.field for violation in bad_request.field_violations]
    return fields


GROUP_BY_KEY = event_pb2.AGGREGATE_GROUP_BY_KEY
GROUP_BY_TYPE = event_pb2.AGGREGATE_GROUP_BY_TYPE


def _event(event_id: str, key: str, payload: bytes, **fields: Any) -> event_pb2.QueuedEvent:
    return queued(key, event_id=event_id, payload=payload, **fields)


# id, key, type, payload, content type, attributes
EVENTS = [
    _event("a1", "k1", b'{"amount": 5, "region": "eu"}', attributes={"channel": "web"}),
    _event("a2", "k1", b'{"amount": 15}', attributes={"channel": "app"}),
    _event("a3", "k2", b'{"amount": 25.5}', type_="order.paid"),
    _event("a4", "k2", b'{"amount": "30"}', type_="order.paid"),  # a string: not a number
    _event("a5", "k3", b"amount=40", content_type="text/plain"),  # not JSON by content type
    _event("a6", "k3", b'{"amount": 50', content_type="application/json"),  # broken JSON
    _event("a7", "k3", b'\xff\xfe{"amount": 60}'),  # not UTF-8
    _event("a8", "k4", b'{"amount": 70, "x": "\\u0000"}'),  # JSON Postgres' jsonb cannot hold
    _event("a9", "k4", b'{"amount": 80}', content_type="application/vnd.acme+json; v=2"),
]


async def _ids(stub: Stub, expression: str, page_token: str = "", **request: Any) -> list[str]:
    """Every page of a query, in order."""
    found, token = [], page_token
    while True:
        page = await stub.QueryEvents(
            storage_pb2.QueryEventsRequest(
                filter_expression=expression, page_token=token, **request
            ),
            timeout=10,
        )
        found += [stored.event.id for stored in page.events]
        token = page.next_page_token
        if not token:
            return found


@pytest.fixture
async def stored(processor: Stub) -> None:
    await processor.StoreEvents(store_request(EVENTS), timeout=5)


@pytest.mark.usefixtures("stored")
async def test_payload_filters_skip_what_is_not_json_and_never_fail(gateway: Stub) -> None:
    assert await _ids(gateway, "payload.amount > 10") == ["a2", "a3", "a9"]
    assert await _ids(gateway, "payload.amount >= 5 AND payload.amount < 20") == ["a1", "a2"]
    assert await _ids(gateway, 'payload.amount = "30"') == ["a4"]
    # NOT is the complement: events whose payload is no JSON are in it, and no query fails.
    assert await _ids(gateway, "NOT payload.amount > 10") == ["a1", "a4", "a5", "a6", "a7", "a8"]
    assert await _ids(gateway, "payload:*") == ["a1", "a2", "a3", "a4", "a9"]
    assert await _ids(gateway, 'payload.region = "eu" OR attributes.channel = "app"') == [
        "a1",
        "a2",
    ]
    assert await _ids(gateway, 'type:"order.p*"') == ["a3", "a4"]
    assert await _ids(gateway, 'key = "k3"') == ["a5", "a6", "a7"]


@pytest.mark.usefixtures("stored")
async def test_keys_types_and_the_filter_combine(gateway: Stub) -> None:
    both = event_pb2.EventFilter(keys=["k1", "k2"], types=["order.paid"])
    assert await _ids(gateway, "", filter=both) == ["a3", "a4"]
    assert await _ids(gateway, "payload.amount > 20", filter=both) == ["a3"]
    legacy = event_pb2.EventFilter(type="order.paid")
    assert await _ids(gateway, "payload.amount < 100", filter=legacy) == ["a3"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _ids(gateway, "", filter=event_pb2.EventFilter(type="a", types=["b"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["filter.type"]


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("payload.amount >", "at column 17"),
        ("payload.amount > 10 AND", "column"),
        ("colour = red", "colour"),
        ("payload > 1", "payload is an object"),
        ('event_time > "yesterday"', "RFC 3339"),
    ],
)
async def test_a_bad_filter_is_invalid_argument_naming_the_token(
    gateway: Stub, expression: str, fragment: str
) -> None:
    for call in (
        gateway.QueryEvents(storage_pb2.QueryEventsRequest(filter_expression=expression)),
        gateway.CountEvents(storage_pb2.CountEventsRequest(filter_expression=expression)),
        gateway.AggregateEvents(storage_pb2.AggregateEventsRequest(filter_expression=expression)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expression
        assert fragment in (caught.value.details() or ""), caught.value.details()
        assert field_violations(caught.value) == ["filter_expression"]


async def _register_schema(
    engine: AsyncEngine, tenant: str, event_type: str, schema: dict[str, Any]
) -> None:
    """A schema as the registry stores it (the registry's own tests cover registering)."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO schema_subjects (tenant, event_type, latest_version)"
                " VALUES (:t, :e, 1)"
            ),
            {"t": tenant, "e": event_type},
        )
        await conn.execute(
            text(
                "INSERT INTO schema_versions (tenant, event_type, version, schema_text,"
                " fingerprint) VALUES (:t, :e, 1, :s, :f)"
            ),
            {"t": tenant, "e": event_type, "s": json.dumps(schema), "f": uuid.uuid4().hex},
        )
        # The change log entry, which storage's scope cache follows (as the registry writes it).
        await conn.execute(
            text("INSERT INTO schema_changes (tenant, event_type) VALUES (:t, :e)"),
            {"t": tenant, "e": event_type},
        )


@pytest.mark.usefixtures("stored")
async def test_fields_are_checked_against_the_schemas_in_scope(
    gateway: Stub, engine: AsyncEngine
) -> None:
    schema = {"type": "object", "properties": {"amount": {"type": "number"}}}
    await _register_schema(engine, "default", "order.created", schema)
    created = event_pb2.EventFilter(types=["order.created"])
    assert await _ids(gateway, "payload.amount > 10", filter=created) == ["a2", "a9"]
    for expression, fragment in (
        ('payload.amount = "x"', "number"),
        ("payload.amout > 1", "amount"),  # a did-you-mean hint
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _ids(gateway, expression, filter=created)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.AggregateEvents(
            storage_pb2.AggregateEventsRequest(filter=created, field="payload.region")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no schema in scope declares it" in (caught.value.details() or "")


async def _insert_for_tenant(engine: AsyncEngine, tenant: str, ids: list[str]) -> None:
    """Rows of another tenant, written as storage's INSERT would once ingest names the tenant
    (that write path is not this change's)."""
    async with engine.begin() as conn:
        for event_id in ids:
            await conn.execute(
                text(
                    "INSERT INTO events (tenant, id, key, type, event_time, payload, content_type,"
                    " attributes, partition, ingest_time, producer) VALUES (:t, :i, 'k1',"
                    " 'order.created', now(), '{\"amount\": 99}', '', '{}', 0, now(), 'p')"
                ),
                {"t": tenant, "i": event_id},
            )


@pytest.mark.usefixtures("stored")
async def test_every_call_reads_one_tenant(gateway: Stub, engine: AsyncEngine) -> None:
    await _insert_for_tenant(engine, "acme", ["a1", "b2"])  # a1 also exists in default
    assert await _ids(gateway, "payload.amount > 90", tenant="acme") == ["a1", "b2"]
    assert await _ids(gateway, "payload.amount > 90") == []
    count = await gateway.CountEvents(storage_pb2.CountEventsRequest(tenant="acme"), timeout=5)
    assert count.count == 2
    reply = await gateway.AggregateEvents(
        storage_pb2.AggregateEventsRequest(tenant="acme", field="payload.amount"), timeout=5
    )
    assert [(g.count, g.sum) for g in reply.groups] == [(2, 198.0)]
    assert (await gateway.CountEvents(storage_pb2.CountEventsRequest(), timeout=5)).count == 9


@pytest.mark.usefixtures("stored")
async def test_a_page_token_is_bound_to_the_query_and_the_principal(gateway: Stub) -> None:
    first = await gateway.QueryEvents(
        storage_pb2.QueryEventsRequest(
            filter_expression="payload:*", page_size=2, tenant="default", principal="alice"
        ),
        timeout=5,
    )
    assert [s.event.id for s in first.events] == ["a1", "a2"] and first.next_page_token
    token = first.next_page_token
    replays: dict[str, dict[str, Any]] = {
        "another filter": {"filter_expression": "payload:amount", "principal": "alice"},
        "another principal": {"filter_expression": "payload:*", "principal": "bob"},
        "another tenant": {
            "filter_expression": "payload:*",
            "principal": "alice",
            "tenant": "acme",
        },
        "another key": {
            "filter_expression": "payload:*",
            "principal": "alice",
            "filter": event_pb2.EventFilter(keys=["k1"]),
        },
        "edited": {"filter_expression": "payload:*", "principal": "alice", "token": token[:-2]},
    }
    for name, fields in replays.items():
        request = storage_pb2.QueryEventsRequest(page_token=fields.pop("token", token), **fields)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.QueryEvents(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert field_violations(caught.value) == ["page_token"], name
    # The same query and principal continue, with another page size (AIP-158 allows it).
    rest = await _ids(gateway, "payload:*", page_token=token, principal="alice", page_size=1)
    assert rest == ["a3", "a4", "a9"]


async def test_count_and_aggregates_by_key_and_type(processor: Stub, gateway: Stub) -> None:
    await processor.StoreEvents(store_request(EVENTS), timeout=5)
    count = await gateway.CountEvents(
        storage_pb2.CountEventsRequest(filter_expression="payload.amount > 10"), timeout=5
    )
    assert count.count == 3
    by_key = await gateway.AggregateEvents(
        storage_pb2.AggregateEventsRequest(group_by=GROUP_BY_KEY, field="payload.amount"),
        timeout=5,
    )
    rows = [(g.group, g.count, g.value_count, g.sum, g.min, g.max, g.avg) for g in by_key.groups]
    assert rows == [
        ("k3", 3, 0, 0.0, 0.0, 0.0, 0.0),
        ("k1", 2, 2, 20.0, 5.0, 15.0, 10.0),
        ("k2", 2, 1, 25.5, 25.5, 25.5, 25.5),
        ("k4", 2, 1, 80.0, 80.0, 80.0, 80.0),
    ]
    assert not by_key.groups[0].HasField("sum")  # no number in k3: unset, not 0
    by_type = await gateway.AggregateEvents(
        storage_pb2.AggregateEventsRequest(
            group_by=GROUP_BY_TYPE, filter_expression='key != "k3"', field="payload.amount"
        ),
        timeout=5,
    )
    assert [(g.group, g.count, g.value_count, g.sum) for g in by_type.groups] == [
        ("order.created", 4, 3, 100.0),
        ("order.paid", 2, 1, 25.5),
    ]
    plain = await gateway.AggregateEvents(storage_pb2.AggregateEventsRequest(), timeout=5)
    assert [(g.group, g.count, g.HasField("avg")) for g in plain.groups] == [("", 9, False)]


async def test_too_broad_queries_are_resource_exhausted_with_a_hint(
    start_server: StartServer, engine: AsyncEngine, connect: Connect
) -> None:
    server = await start_server(engine, query_max_rows=5, query_timeout_ms=100)
    processor, gateway = connect(server.port, "processor"), connect(server.port, "gateway")
    await processor.StoreEvents(store_request(EVENTS), timeout=5)
    calls = {
        "count": gateway.CountEvents(storage_pb2.CountEventsRequest()),
        "aggregate": gateway.AggregateEvents(storage_pb2.AggregateEventsRequest()),
        "groups": gateway.AggregateEvents(
            storage_pb2.AggregateEventsRequest(
                group_by=GROUP_BY_KEY, max_groups=1, filter=event_pb2.EventFilter(keys=["k1", "k2"])
            )
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, name
        assert NARROW_HINT in (caught.value.details() or ""), name
    # Within the bounds the same calls answer.
    small = event_pb2.EventFilter(keys=["k1"])
    assert (await gateway.CountEvents(storage_pb2.CountEventsRequest(filter=small))).count == 2
    # Past the statement timeout: 100k payloads parsed at query time take longer than 100 ms.
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO events (id, key, type, event_time, payload, content_type, attributes,"
                " partition, ingest_time, producer) SELECT 'bulk' || n, 'bulk', 't', now(),"
                " convert_to('{\"amount\": ' || n || '}', 'UTF8'), '', '{}', 0, now(), 'p'"
                " FROM generate_series(1, 100000) AS n"
            )
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.QueryEvents(
            storage_pb2.QueryEventsRequest(filter_expression="payload.amount < 0"), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "longer than 0.1 s" in (caught.value.details() or "")


async def test_bad_aggregate_requests_are_invalid_argument(gateway: Stub) -> None:
    bad = {
        "max_groups": storage_pb2.AggregateEventsRequest(max_groups=1001),
        "group_by": storage_pb2.AggregateEventsRequest(group_by=7),  # type: ignore[arg-type]
        "field": storage_pb2.AggregateEventsRequest(field="amount"),
    }
    for name, request in bad.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.AggregateEvents(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert field_violations(caught.value) == [name]


def _hostile_payloads() -> list[bytes]:
    """Payloads labelled JSON that are not, or that Postgres' jsonb cannot hold, and random
    bytes (a fixed seed, so a failure repeats)."""
    rng = random.Random(9)
    made = [
        b"",
        b"\x00",
        b"{",
        b'{"amount": 1}\x00',
        b'{"amount": "\\u0000"}',
        b'{"amount": 1e400000}',
        b'{"amount": 1e1000}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"amount": ' + b"9" * 200_000 + b"}",
        '{"amount": "\ud800"}'.encode("utf-8", "surrogatepass"),
        b'\xef\xbb\xbf{"amount": 3}',  # a byte-order mark
        b'{"amount": NaN}',
        b'{"amount": [1, 2]}',
    ]
    made += [rng.randbytes(rng.randrange(1, 64)) for _ in range(100)]
    return made


async def test_no_payload_makes_a_query_count_or_aggregate_fail(
    processor: Stub, gateway: Stub
) -> None:
    batch = [
        _event(f"h{index}", "hostile", payload, content_type="application/json")
        for index, payload in enumerate(_hostile_payloads())
    ]
    await processor.StoreEvents(store_request(batch), timeout=30)
    for expression in (
        "payload.amount > 0",
        'payload.amount = "x"',
        "NOT payload.amount < 1",
        "payload.amount:*",
        "payload:amount",
        'payload.amount:"a*"',
        "payload.amount = 1",
    ):
        found = await _ids(gateway, expression)
        assert set(found) <= {event.event.id for event in batch}, expression
        count = await gateway.CountEvents(
            storage_pb2.CountEventsRequest(filter_expression=expression), timeout=10
        )
        assert count.count == len(found), expression
    reply = await gateway.AggregateEvents(
        storage_pb2.AggregateEventsRequest(group_by=GROUP_BY_KEY, field="payload.amount"),
        timeout=10,
    )
    (group,) = reply.groups
    assert group.count == len(batch)
    # The one number among them is 1e1000: jsonb holds it, a double cannot (so the sums are
    # infinite); 1e400000 and 200,000 digits are past numeric's range, and a byte-order mark or
    # a NUL byte makes the rest no JSON.
    assert group.value_count == 1 and group.max == float("inf")
