"""Every public RPC of the gateway, with two tenants (issue 9): a caller of tenant B never reads,
writes, counts, lists, subscribes to or learns of tenant A's events, schemas, rules, windows,
alerts, window results, dead letters, users or audit rows.

A's objects are made once for the module (through the gateway, a real stream worker storing
into storage, and the processor's StoreEngineOutputs for alerts and window results). Then one
case per method asks as B's people: a listing or count holds none of A's; naming A's object
answers exactly as naming one that does not exist (the same code, message and rich details once
the name is swapped, or the same empty reply), so nothing leaks its existence; and a write that
names A's id lands in B's own tenant, leaving A's as it was.

The methods come from the service descriptors of streammesh.api.gateway.v1: a new RPC without
a case (or a reason in NOT_APPLICABLE) fails test_every_public_rpc_has_a_case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf.message import Message
from grpc_status import rpc_status

from services.processor.delivery.storage_client import StorageWriter, storage_client
from services.processor.delivery.store import StoreResult
from services.processor.worker import StreamWorker
from services.storage.server import DEFINITION_SERVICE
from streammesh.api.common.v1 import definitions_pb2 as common_definitions
from streammesh.api.common.v1 import event_pb2
from streammesh.api.common.v1 import schema_registry_pb2 as common_schemas
from streammesh.api.gateway.v1 import admin_pb2, gateway_pb2, rules_pb2, schema_registry_pb2
from streammesh.api.gateway.v1 import rules_pb2_grpc as rules_grpc
from streammesh.api.gateway.v1 import schema_registry_pb2_grpc as schemas_grpc
from streammesh.api.storage.v1 import definitions_pb2
from streammesh.api.storage.v1 import definitions_pb2_grpc as definitions_grpc
from streammesh.entries import QueuedBody
from streammesh.mesh import TlsMaterial, create_channel, service_config
from streammesh.mesh.tasks import stop_task
from tests.gateway.conftest import PASSWORD, Person, Stack
from tests.gateway.test_dead_letters import WORKER
from tests.gateway.test_tenants import login
from tests.processor.conftest import drained, wait_for
from tests.storage.test_definitions import HOT, PER_MINUTE
from tests.storage.test_output_subscriptions import alert, result

if TYPE_CHECKING:
    Schemas = schemas_grpc.SchemaRegistryServiceAsyncStub
    Rules = rules_grpc.RuleServiceAsyncStub
else:
    Schemas = schemas_grpc.SchemaRegistryServiceStub
    Rules = rules_grpc.RuleServiceStub

pytestmark = pytest.mark.timeout(240)

Bearer = tuple[tuple[str, str], ...]
ROLES = {
    "user": ("producer", "analyst"),
    "schema": ("schema-admin",),
    "rules": ("rule-admin",),
    "admin": ("tenant-admin",),
}
"""The people of each tenant (a-user, b-schema, ...): their roles."""

SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}})
OTHER_SCHEMA = json.dumps({"type": "object", "properties": {"m": {"type": "string"}}})
MISSING = "zz-missing"
"""The name (id, type, key, username) of an object that exists in no tenant."""

NOT_APPLICABLE: dict[str, str] = {
    "GatewayService/Register": "self sign-up into the default tenant: names no tenant and "
    "returns nothing but the new user's own enrolment",
    "GatewayService/CompleteLogin": "takes only the challenge StartLogin issued for one user of "
    "one tenant (StartLogin's case checks the tenant boundary)",
    "GatewayService/RefreshSession": "takes only the caller's own refresh token, which belongs "
    "to one session of one tenant (test_tenants checks it keeps its tenant)",
    "GatewayService/Logout": "takes only the caller's own refresh token (one session of one "
    "tenant); it reads and returns no tenant data",
    "GatewayService/GetJwks": "the platform's public signing keys: no tenant data",
}


@dataclass
class World:
    """Tenants A and B, their people, and the names of A's objects."""

    stack: Stack
    a: str
    b: str
    people: dict[str, Person]
    schemas: Schemas
    rules: Rules
    run: str
    dead_letter_id: int

    def as_(self, name: str) -> dict[str, Any]:
        return {"metadata": self.people[name].bearer(), "timeout": 10}

    def name(self, what: str) -> str:
        """The name of A's object `what` (event id, key, type, rule or window id)."""
        return f"a-{what}-{self.run}"


@contextlib.asynccontextmanager
async def _worker(stack: Stack, poisoned: set[str]) -> AsyncIterator[None]:
    """A stream worker storing through the real StorageWriter; a batch holding a poisoned id
    fails until it is set aside as a dead letter (of its events' tenant)."""
    client = storage_client(f"127.0.0.1:{stack.storage_port}", stack.pki_dir, timeout_seconds=5)
    writer = StorageWriter(client)

    async def store(raw: QueuedBody) -> StoreResult:
        if poisoned & {q.event.id for q in raw.batch().events}:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "poison"
            )
        return await writer.store(raw)

    worker = StreamWorker(
        stack.redis,
        stack.layout,
        consumer="two-tenants",
        store=store,
        config=WORKER,
        dead_letters=writer.record_dead_letter,
    )
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await asyncio.wait({task}, timeout=5)
        await stop_task(task)
        await client.close()


@pytest.fixture(scope="module")
async def world(stack: Stack) -> AsyncIterator[World]:
    run = uuid.uuid4().hex[:6]
    a, b = f"wa-{run}", f"wb-{run}"
    platform = stack.admin_person.bearer()
    people: dict[str, Person] = {}
    for prefix, tenant in (("a", a), ("b", b)):
        await stack.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(tenant_id=tenant), metadata=platform, timeout=10
        )
        for kind, roles in ROLES.items():
            username = f"{prefix}-{kind}-{run}"
            await stack.admin.CreateUser(
                admin_pb2.CreateUserRequest(
                    username=username, password=PASSWORD, roles=list(roles), tenant=tenant
                ),
                metadata=platform,
                timeout=10,
            )
            people[f"{prefix}-{kind}"] = await login(stack, username, tenant, roles)
    built = World(
        stack,
        a,
        b,
        people,
        cast(Schemas, schemas_grpc.SchemaRegistryServiceStub(stack.gateway_channel)),
        cast(Rules, rules_grpc.RuleServiceStub(stack.gateway_channel)),
        run,
        0,
    )
    n = built.name
    events = [
        event_pb2.Event(id=n("event"), key=n("key"), type=n("type"), payload=b'{"n": 1}'),
        event_pb2.Event(id=n("event2"), key=n("key"), type=n("type"), payload=b'{"n": 2}'),
        event_pb2.Event(id=n("poison"), key=n("pkey"), type=n("type"), payload=b"{}"),
    ]
    async with _worker(stack, poisoned={n("poison")}):
        for event in events:  # one entry each: the poison must not take the other along
            reply = await stack.gateway.PublishBatch(
                gateway_pb2.PublishBatchRequest(events=[event]), **built.as_("a-user")
            )
            assert reply.accepted == 1
        await wait_for(lambda: drained(stack.redis, stack.layout), limit=30)
    dead = await stack.admin.ListDeadLetters(
        admin_pb2.ListDeadLettersRequest(page_size=500), **built.as_("a-admin")
    )
    (letter,) = [d for d in dead.dead_letters if n("poison") in d.event_ids]
    built.dead_letter_id = letter.id
    for what in ("schema", "shared-schema", "compat-schema"):
        await built.schemas.RegisterSchema(
            schema_registry_pb2.RegisterSchemaRequest(event_type=n(what), schema_json=SCHEMA),
            **built.as_("a-schema"),
        )
    for what in ("rule", "shared-rule"):
        await built.rules.CreateRule(
            rules_pb2.CreateRuleRequest(definition_json=json.dumps({**HOT, "id": n(what)})),
            **built.as_("a-rules"),
        )
    for what in ("window", "shared-window"):
        await built.rules.CreateWindow(
            rules_pb2.CreateWindowRequest(
                definition_json=json.dumps({**PER_MINUTE, "id": n(what)})
            ),
            **built.as_("a-rules"),
        )
    channel = create_channel(
        f"127.0.0.1:{stack.storage_port}",
        TlsMaterial.load(stack.pki_dir, "processor"),
        server_name="storage",
        config=service_config(DEFINITION_SERVICE, health_checked=False),
    )
    try:
        await definitions_grpc.DefinitionServiceStub(channel).StoreEngineOutputs(
            definitions_pb2.StoreEngineOutputsRequest(
                alerts=[alert(int(run, 16), tenant=a, rule=n("rule"))],
                window_results=[result(0, tenant=a, window=n("window"))],
                late_events=[late_event(i, tenant=a, window=n("window")) for i in range(2)],
            ),
            timeout=10,
        )
    finally:
        await channel.close()
    yield built


def late_event(n: int, *, tenant: str, window: str) -> common_definitions.LateEvent:
    return common_definitions.LateEvent(
        tenant=tenant,
        source=common_definitions.DEFINITION_KIND_WINDOW,
        definition_id=window,
        definition_version=1,
        event_id=f"{window}-late-{n}",
        event_key="k",
        event_time_unix_nanos=n + 1,
        watermark_unix_nanos=120_000_000_000,
        window_start_unix_nanos=0,
        window_end_unix_nanos=60_000_000_000,
        reason="beyond allowed lateness",
    )


# What a caller learns from one call ------------------------------------------------------


async def answer(call: Awaitable[Any], *names: str) -> tuple[Any, ...]:
    """Everything the caller learns: the reply, or code, message and rich details; every name
    in `names` replaced by "<name>" so that A's object and a missing one compare equal."""

    def scrub(text: str) -> str:
        for name in names:
            text = text.replace(name, "<name>")
        return text

    try:
        reply = await call
    except grpc.aio.AioRpcError as error:
        status = rpc_status.from_call(error)
        rich = [scrub(str(d)) for d in status.details] if status else []
        return ("error", error.code(), scrub(error.details() or ""), rich)
    return ("ok", scrub(str(reply)) if isinstance(reply, Message) else reply)


async def first_of_stream(call: Any) -> Any:
    """The first message of a server stream (the caller's view of it), then cancel it; resume
    tokens are per call and cursor, so they are dropped."""
    try:
        message = await asyncio.wait_for(call.read(), 10)
    finally:
        call.cancel()
    message.ClearField("resume_token")
    return message


async def same_as_missing(make: Callable[[str], Awaitable[Any]], theirs: str) -> tuple[Any, ...]:
    """B's answer naming A's `theirs` equals B's answer naming MISSING; returns it."""
    their_answer = await answer(make(theirs), theirs)
    missing_answer = await answer(make(MISSING), MISSING)
    assert their_answer == missing_answer, f"{theirs!r} is told apart from a missing name"
    return their_answer


def not_found(outcome: tuple[Any, ...]) -> None:
    assert outcome[:2] == ("error", grpc.StatusCode.NOT_FOUND), outcome


# The cases, by "Service/Method" ---------------------------------------------------------

Case = Callable[[World], Awaitable[None]]
CASES: dict[str, Case] = {}


def case(*methods: str) -> Callable[[Case], Case]:
    def register(function: Case) -> Case:
        for method in methods:
            assert method not in CASES, method
            CASES[method] = function
        return function

    return register


@case("GatewayService/StartLogin")
async def _start_login(w: World) -> None:
    # A's username under B's tenant: the answer a username nobody has gets.
    def start(username: str) -> Any:
        request = gateway_pb2.StartLoginRequest(username=username, password=PASSWORD, tenant=w.b)
        return w.stack.gateway.StartLogin(request, timeout=10)

    outcome = await same_as_missing(start, w.people["a-user"].username)
    assert outcome[1] == grpc.StatusCode.UNAUTHENTICATED


@case("GatewayService/BeginTotpEnrollment", "GatewayService/ConfirmTotpEnrollment")
async def _enrolment(w: World) -> None:
    gateway = w.stack.gateway
    for make in (
        lambda u: gateway.BeginTotpEnrollment(
            gateway_pb2.BeginTotpEnrollmentRequest(username=u, password=PASSWORD, tenant=w.b),
            timeout=10,
        ),
        lambda u: gateway.ConfirmTotpEnrollment(
            gateway_pb2.ConfirmTotpEnrollmentRequest(
                username=u, password=PASSWORD, code="000000", tenant=w.b
            ),
            timeout=10,
        ),
    ):
        outcome = await same_as_missing(make, w.people["a-user"].username)
        assert outcome[0] == "error"


@case("GatewayService/PublishBatch", "GatewayService/Publish")
async def _publish(w: World) -> None:
    # B publishes A's stored event ids with other content, by both methods: accepted as new
    # in B (no conflict nor duplicate that would reveal A's events), stored in B; A's stay A's.
    batch = await w.stack.gateway.PublishBatch(
        gateway_pb2.PublishBatchRequest(events=[_b_event(w, "event")]), **w.as_("b-user")
    )
    assert (batch.accepted, list(batch.refused), list(batch.duplicates)) == (1, [], [])
    stream = w.stack.gateway.Publish(**w.as_("b-user"))
    await stream.write(gateway_pb2.PublishRequest(sequence=1, events=[_b_event(w, "event2")]))
    ack = await stream.read()
    assert not ack.HasField("refusal") and ack.accepted == 1 and not ack.refused, ack
    await stream.done_writing()
    assert await stream.code() == grpc.StatusCode.OK
    await _drain(w)
    by_key = gateway_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(keys=[w.name("key")]))

    async def stored(person: str) -> list[tuple[str, str, bytes]]:
        page = await w.stack.gateway.QueryEvents(by_key, **w.as_(person))
        return sorted((e.event.id, e.event.type, e.event.payload) for e in page.events)

    ids = (w.name("event"), w.name("event2"))
    assert await stored("b-user") == [(i, "b.t", b'{"b": true}') for i in ids]
    assert await stored("a-user") == [
        (i, w.name("type"), b'{"n": %d}' % n) for n, i in enumerate(ids, 1)
    ]


def _b_event(w: World, what: str) -> event_pb2.Event:
    """B's event with the id and key of A's event `what`, and B's own type and content."""
    return event_pb2.Event(id=w.name(what), key=w.name("key"), type="b.t", payload=b'{"b": true}')


async def _drain(w: World) -> None:
    """Store what is queued (B's writes), so that reads see them."""
    async with _worker(w.stack, poisoned=set()):
        await wait_for(lambda: drained(w.stack.redis, w.stack.layout), limit=30)


def _b_filters(w: World) -> list[event_pb2.EventFilter]:
    """Filters naming A's key or type, and none at all: B's own data may match, A's never."""
    return [
        event_pb2.EventFilter(keys=[w.name("key"), w.name("pkey")]),
        event_pb2.EventFilter(type=w.name("type")),
        event_pb2.EventFilter(),
    ]


@case("GatewayService/QueryEvents")
async def _query(w: World) -> None:
    for flt in _b_filters(w):
        page = await w.stack.gateway.QueryEvents(
            gateway_pb2.QueryEventsRequest(filter=flt, page_size=1000), **w.as_("b-user")
        )
        assert all(e.event.type != w.name("type") for e in page.events), flt


@case("GatewayService/CountEvents")
async def _count(w: World) -> None:
    # (B never publishes A's type; A's key may hold B's own events once B published.)
    by_type = gateway_pb2.CountEventsRequest(filter=event_pb2.EventFilter(type=w.name("type")))
    assert (await w.stack.gateway.CountEvents(by_type, **w.as_("b-user"))).count == 0
    # A's two stored events (the poisoned one is a dead letter).
    assert (await w.stack.gateway.CountEvents(by_type, **w.as_("a-user"))).count == 2


@case("GatewayService/AggregateEvents")
async def _aggregate(w: World) -> None:
    request = gateway_pb2.AggregateEventsRequest(
        filter=event_pb2.EventFilter(), group_by=event_pb2.AGGREGATE_GROUP_BY_TYPE
    )
    groups = await w.stack.gateway.AggregateEvents(request, **w.as_("b-user"))
    assert w.name("type") not in {g.group for g in groups.groups}
    mine = await w.stack.gateway.AggregateEvents(request, **w.as_("a-user"))
    assert w.name("type") in {g.group for g in mine.groups}


@case("GatewayService/SubscribeEvents")
async def _subscribe(w: World) -> None:
    # From the start of the log until caught up: none of A's events.
    for flt in _b_filters(w):
        call = w.stack.gateway.SubscribeEvents(
            gateway_pb2.SubscribeEventsRequest(filter=flt), metadata=w.people["b-user"].bearer()
        )
        try:
            async with asyncio.timeout(10):
                async for message in call:
                    assert all(e.event.type != w.name("type") for e in message.events)
                    if message.current:
                        break
        finally:
            call.cancel()


# AdminService: B's tenant admin --------------------------------------------------------


@case("AdminService/ListUsers")
async def _list_users(w: World) -> None:
    listed = await w.stack.admin.ListUsers(
        admin_pb2.ListUsersRequest(page_size=500), **w.as_("b-admin")
    )
    assert {u.tenant for u in listed.users} == {w.b}
    prefix = await w.stack.admin.ListUsers(
        admin_pb2.ListUsersRequest(username_prefix=w.people["a-user"].username), **w.as_("b-admin")
    )
    assert list(prefix.users) == []

    def named(tenant: str) -> Any:
        return w.stack.admin.ListUsers(
            admin_pb2.ListUsersRequest(tenant=tenant), **w.as_("b-admin")
        )

    not_found(await same_as_missing(named, w.a))


@case("AdminService/CreateUser")
async def _create_user(w: World) -> None:
    def into(tenant: str) -> Any:
        request = admin_pb2.CreateUserRequest(
            username=f"x-{uuid.uuid4().hex[:6]}", password=PASSWORD, tenant=tenant
        )
        return w.stack.admin.CreateUser(request, **w.as_("b-admin"))

    not_found(await same_as_missing(into, w.a))
    # A's username, unqualified: a new user of B (usernames are per tenant).
    created = await w.stack.admin.CreateUser(
        admin_pb2.CreateUserRequest(username=w.people["a-schema"].username, password=PASSWORD),
        **w.as_("b-admin"),
    )
    assert created.user.tenant == w.b


@case(
    "AdminService/SetUserDisabled",
    "AdminService/SetUserRoles",
    "AdminService/ResetMfa",
    "AdminService/UnlockUser",
    "AdminService/RevokeSessions",
)
async def _user_changes(w: World) -> None:
    admin = w.stack.admin
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda u: admin.SetUserDisabled(
            admin_pb2.SetUserDisabledRequest(username=u, disabled=True), **w.as_("b-admin")
        ),
        lambda u: admin.SetUserRoles(
            admin_pb2.SetUserRolesRequest(username=u, roles=[]), **w.as_("b-admin")
        ),
        lambda u: admin.ResetMfa(admin_pb2.ResetMfaRequest(username=u), **w.as_("b-admin")),
        lambda u: admin.UnlockUser(admin_pb2.UnlockUserRequest(username=u), **w.as_("b-admin")),
        lambda u: admin.RevokeSessions(
            admin_pb2.RevokeSessionsRequest(username=u), **w.as_("b-admin")
        ),
    ]
    for make in calls:
        not_found(await same_as_missing(make, w.people["a-user"].username))
    # A's user still works (not disabled, sessions not revoked).
    await w.stack.gateway.CountEvents(gateway_pb2.CountEventsRequest(), **w.as_("a-user"))


@case(
    "AdminService/ListSigningKeys",
    "AdminService/RotateSigningKey",
    "AdminService/RetireSigningKey",
    "AdminService/CreateTenant",
    "AdminService/ListTenants",
    "AdminService/GetTenant",
    "AdminService/SetTenantDisabled",
)
async def _platform_only(w: World) -> None:
    # Platform methods: PERMISSION_DENIED for B's tenant admin, whichever tenant is named.
    admin = w.stack.admin
    boss = w.as_("b-admin")
    for make in (
        lambda t: admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=t), **boss),
        lambda t: admin.SetTenantDisabled(
            admin_pb2.SetTenantDisabledRequest(tenant_id=t, disabled=True), **boss
        ),
        lambda t: admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant_id=t), **boss),
    ):
        outcome = await same_as_missing(make, w.a)
        assert outcome[1] == grpc.StatusCode.PERMISSION_DENIED
    for call in (
        admin.ListTenants(admin_pb2.ListTenantsRequest(), **boss),
        admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest(), **boss),
        admin.RotateSigningKey(admin_pb2.RotateSigningKeyRequest(), **boss),
        admin.RetireSigningKey(admin_pb2.RetireSigningKeyRequest(), **boss),
    ):
        assert (await answer(call))[1] == grpc.StatusCode.PERMISSION_DENIED


@case("AdminService/ListAuditEvents")
async def _audit(w: World) -> None:
    rows = await w.stack.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(page_size=500), **w.as_("b-admin")
    )
    assert rows.events and {r.tenant for r in rows.events} == {w.b}
    # None of A's people's doings (logins, rules, schemas, publishes) shows in B's log.
    a_actors = {f"user:{p.username}" for k, p in w.people.items() if k.startswith("a-")}
    assert not {r.actor for r in rows.events} & a_actors

    def named(tenant: str) -> Any:
        return w.stack.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(tenant=tenant), **w.as_("b-admin")
        )

    not_found(await same_as_missing(named, w.a))


@case("AdminService/ListDeadLetters")
async def _list_dead_letters(w: World) -> None:
    page = await w.stack.admin.ListDeadLetters(
        admin_pb2.ListDeadLettersRequest(page_size=500), **w.as_("b-admin")
    )
    assert w.dead_letter_id not in {d.id for d in page.dead_letters}


@case("AdminService/GetDeadLetter", "AdminService/ReplayDeadLetter")
async def _dead_letter(w: World) -> None:
    admin = w.stack.admin
    boss = w.as_("b-admin")
    missing = w.dead_letter_id + 1_000_000
    makes: list[Callable[[int], Any]] = [
        lambda i: admin.GetDeadLetter(admin_pb2.GetDeadLetterRequest(id=i), **boss),
        lambda i: admin.ReplayDeadLetter(admin_pb2.ReplayDeadLetterRequest(id=i), **boss),
    ]
    for make in makes:
        # The message echoes the id asked for ("no dead letter <id>"): scrub just that.
        theirs = await answer(make(w.dead_letter_id), f"letter {w.dead_letter_id}")
        nobody = await answer(make(missing), f"letter {missing}")
        assert theirs == nobody
        not_found(theirs)
    got = await admin.GetDeadLetter(
        admin_pb2.GetDeadLetterRequest(id=w.dead_letter_id), **w.as_("a-admin")
    )
    assert not got.dead_letter.HasField("replayed_at")


# SchemaRegistryService ----------------------------------------------------------------


@case("SchemaRegistryService/GetSchema", "SchemaRegistryService/ListSchemaVersions")
async def _schema_reads(w: World) -> None:
    schemas = w.schemas
    for make in (
        lambda t: schemas.GetSchema(
            schema_registry_pb2.GetSchemaRequest(event_type=t), **w.as_("b-user")
        ),
        lambda t: schemas.ListSchemaVersions(
            schema_registry_pb2.ListSchemaVersionsRequest(event_type=t), **w.as_("b-user")
        ),
    ):
        await same_as_missing(make, w.name("schema"))


@case("SchemaRegistryService/ListSubjects")
async def _subjects(w: World) -> None:
    listed = await w.schemas.ListSubjects(
        schema_registry_pb2.ListSubjectsRequest(page_size=1000), **w.as_("b-user")
    )
    # (B's own subjects of A's "shared" and "compat" names exist once B's cases made them.)
    assert w.name("schema") not in {s.event_type for s in listed.subjects}


@case("SchemaRegistryService/CheckCompatibility")
async def _check(w: World) -> None:
    def check(t: str) -> Any:
        request = schema_registry_pb2.CheckCompatibilityRequest(
            event_type=t, schema_json=OTHER_SCHEMA
        )
        return w.schemas.CheckCompatibility(request, **w.as_("b-schema"))

    await same_as_missing(check, w.name("schema"))


@case("SchemaRegistryService/SetCompatibility")
async def _set_compatibility(w: World) -> None:
    # Naming A's type sets the mode of B's own subject of that name, which then exists in B
    # exactly as one made for a missing name: no versions, the mode asked for, new times.
    subjects = {}
    for name in (w.name("compat-schema"), MISSING):
        changed = await w.schemas.SetCompatibility(
            schema_registry_pb2.SetCompatibilityRequest(
                event_type=name, compatibility=common_schemas.COMPATIBILITY_MODE_NONE
            ),
            **w.as_("b-schema"),
        )
        subjects[name] = changed.subject
        assert changed.subject.compatibility == common_schemas.COMPATIBILITY_MODE_NONE
    theirs, missing = subjects[w.name("compat-schema")], subjects[MISSING]
    assert theirs.created_at.ToNanoseconds() <= missing.created_at.ToNanoseconds()
    mine = await w.schemas.GetSchema(
        schema_registry_pb2.GetSchemaRequest(event_type=w.name("compat-schema")), **w.as_("a-user")
    )
    assert mine.subject.compatibility == common_schemas.COMPATIBILITY_MODE_BACKWARD
    assert mine.subject.created_at.ToNanoseconds() < theirs.created_at.ToNanoseconds()
    await same_as_missing(
        lambda t: w.schemas.ListSchemaVersions(
            schema_registry_pb2.ListSchemaVersionsRequest(event_type=t), **w.as_("b-user")
        ),
        w.name("compat-schema"),
    )


@case("SchemaRegistryService/RegisterSchema")
async def _register(w: World) -> None:
    # B registers under A's type a schema A's BACKWARD mode would refuse: B's own version 1.
    registered = await w.schemas.RegisterSchema(
        schema_registry_pb2.RegisterSchemaRequest(
            event_type=w.name("shared-schema"), schema_json=OTHER_SCHEMA
        ),
        **w.as_("b-schema"),
    )
    assert (registered.created, registered.schema.version) == (True, 1)
    mine = await w.schemas.GetSchema(
        schema_registry_pb2.GetSchemaRequest(event_type=w.name("shared-schema")),
        **w.as_("a-user"),
    )
    assert (mine.schema.version, json.loads(mine.schema.schema_json)) == (1, json.loads(SCHEMA))


@case("SchemaRegistryService/GetSchemaPolicy", "SchemaRegistryService/SetSchemaPolicy")
async def _policy(w: World) -> None:
    refuse, accept = (
        common_schemas.UNKNOWN_TYPE_POLICY_REFUSE,
        common_schemas.UNKNOWN_TYPE_POLICY_ACCEPT,
    )
    get = schema_registry_pb2.GetSchemaPolicyRequest()
    try:
        await w.schemas.SetSchemaPolicy(
            schema_registry_pb2.SetSchemaPolicyRequest(unknown_types=refuse), **w.as_("b-schema")
        )
        assert (await w.schemas.GetSchemaPolicy(get, **w.as_("b-user"))).unknown_types == refuse
        assert (await w.schemas.GetSchemaPolicy(get, **w.as_("a-user"))).unknown_types == accept
    finally:
        await w.schemas.SetSchemaPolicy(
            schema_registry_pb2.SetSchemaPolicyRequest(unknown_types=accept), **w.as_("b-schema")
        )


# RuleService ---------------------------------------------------------------------------


@case(
    "RuleService/GetRule",
    "RuleService/UpdateRule",
    "RuleService/SetRuleEnabled",
    "RuleService/GetWindow",
    "RuleService/UpdateWindow",
    "RuleService/SetWindowEnabled",
)
async def _definitions_by_id(w: World) -> None:
    rules, boss = w.rules, w.as_("b-rules")
    for make, what in (
        (lambda i: rules.GetRule(rules_pb2.GetRuleRequest(rule_id=i), **boss), "rule"),
        (
            lambda i: rules.UpdateRule(
                rules_pb2.UpdateRuleRequest(
                    rule_id=i, definition_json=json.dumps({**HOT, "id": i, "value": 1})
                ),
                **boss,
            ),
            "rule",
        ),
        (
            lambda i: rules.SetRuleEnabled(
                rules_pb2.SetRuleEnabledRequest(rule_id=i, enabled=False), **boss
            ),
            "rule",
        ),
        (lambda i: rules.GetWindow(rules_pb2.GetWindowRequest(window_id=i), **boss), "window"),
        (
            lambda i: rules.UpdateWindow(
                rules_pb2.UpdateWindowRequest(
                    window_id=i, definition_json=json.dumps({**PER_MINUTE, "id": i, "size": "2m"})
                ),
                **boss,
            ),
            "window",
        ),
        (
            lambda i: rules.SetWindowEnabled(
                rules_pb2.SetWindowEnabledRequest(window_id=i, enabled=False), **boss
            ),
            "window",
        ),
    ):
        not_found(await same_as_missing(make, w.name(what)))
    rule = await rules.GetRule(rules_pb2.GetRuleRequest(rule_id=w.name("rule")), **w.as_("a-rules"))
    assert (rule.latest_version, rule.rule.enabled) == (1, True)
    window = await rules.GetWindow(
        rules_pb2.GetWindowRequest(window_id=w.name("window")), **w.as_("a-rules")
    )
    assert (window.latest_version, window.window.enabled) == (1, True)


@case("RuleService/ListRules", "RuleService/ListWindows")
async def _list_definitions(w: World) -> None:
    # (B's own "shared" ids may be listed once B created them: its copies, in its tenant.)
    ours = {w.name("rule"), w.name("window")}
    listed_rules = await w.rules.ListRules(
        rules_pb2.ListRulesRequest(page_size=1000), **w.as_("b-user")
    )
    listed_windows = await w.rules.ListWindows(
        rules_pb2.ListWindowsRequest(page_size=1000), **w.as_("b-user")
    )
    listed = [*listed_rules.rules, *listed_windows.windows]
    assert {json.loads(d.definition_json)["tenant"] for d in listed} <= {w.b}
    seen = {d.id for d in listed}
    assert not seen & ours, seen & ours


@case("RuleService/CreateRule", "RuleService/CreateWindow")
async def _create_definitions(w: World) -> None:
    # A's ids, created by B: B's own version 1; A's stay at version 1 with A's content.
    rule = await w.rules.CreateRule(
        rules_pb2.CreateRuleRequest(
            definition_json=json.dumps({**HOT, "id": w.name("shared-rule"), "value": 7})
        ),
        **w.as_("b-rules"),
    )
    assert json.loads(rule.rule.definition_json)["tenant"] == w.b
    window = await w.rules.CreateWindow(
        rules_pb2.CreateWindowRequest(
            definition_json=json.dumps({**PER_MINUTE, "id": w.name("shared-window"), "size": "5m"})
        ),
        **w.as_("b-rules"),
    )
    assert json.loads(window.window.definition_json)["tenant"] == w.b
    mine = await w.rules.GetRule(
        rules_pb2.GetRuleRequest(rule_id=w.name("shared-rule")), **w.as_("a-rules")
    )
    assert (mine.latest_version, json.loads(mine.rule.definition_json)["value"]) == (1, 80)
    theirs = await w.rules.GetWindow(
        rules_pb2.GetWindowRequest(window_id=w.name("shared-window")), **w.as_("a-rules")
    )
    assert json.loads(theirs.window.definition_json)["size"] == "1m"


@case("RuleService/ListAlerts", "RuleService/ListWindowResults")
async def _list_outputs(w: World) -> None:
    rules, analyst = w.rules, w.as_("b-user")
    everything = await rules.ListAlerts(rules_pb2.ListAlertsRequest(page_size=1000), **analyst)
    assert {a.tenant for a in everything.alerts} <= {w.b}
    await same_as_missing(
        lambda i: rules.ListAlerts(rules_pb2.ListAlertsRequest(rule_id=i), **analyst),
        w.name("rule"),
    )
    await same_as_missing(
        lambda i: rules.ListWindowResults(
            rules_pb2.ListWindowResultsRequest(window_id=i), **analyst
        ),
        w.name("window"),
    )
    # A's analyst does see them (the outputs exist).
    mine = await rules.ListAlerts(
        rules_pb2.ListAlertsRequest(rule_id=w.name("rule")), **w.as_("a-user")
    )
    assert [a.tenant for a in mine.alerts] == [w.a]
    results = await rules.ListWindowResults(
        rules_pb2.ListWindowResultsRequest(window_id=w.name("window")), **w.as_("a-user")
    )
    assert [r.tenant for r in results.window_results] == [w.a]


@case("RuleService/ListLateEvents")
async def _list_late_events(w: World) -> None:
    rules, analyst = w.rules, w.as_("b-user")
    everything = await rules.ListLateEvents(
        rules_pb2.ListLateEventsRequest(page_size=1000), **analyst
    )
    assert {e.tenant for e in everything.late_events} <= {w.b}

    def late(text: str, **who: Any) -> Any:
        request = rules_pb2.ListLateEventsRequest(filter_expression=text, page_size=1)
        return rules.ListLateEvents(request, **(who or analyst))

    # Naming A's window or event in a filter answers as for names nobody has.
    await same_as_missing(lambda i: late(f'definition_id = "{i}"'), w.name("window"))
    await same_as_missing(lambda i: late(f'event_id:"{i}*"'), w.name("window"))
    # A's analyst sees them, and B cannot continue A's paging (a page token of A's answers
    # as a made-up one does).
    mine = await late(f'definition_id = "{w.name("window")}"', **w.as_("a-user"))
    assert [e.tenant for e in mine.late_events] == [w.a] and mine.next_page_token
    text = f'definition_id = "{w.name("window")}"'
    stolen = await answer(
        rules.ListLateEvents(
            rules_pb2.ListLateEventsRequest(
                filter_expression=text, page_token=mine.next_page_token
            ),
            **analyst,
        )
    )
    made_up = await answer(
        rules.ListLateEvents(
            rules_pb2.ListLateEventsRequest(
                filter_expression=text, page_token=mine.next_page_token[:-4] + "AAAA"
            ),
            **analyst,
        )
    )
    assert stolen == made_up and stolen[1] == grpc.StatusCode.INVALID_ARGUMENT


@case("RuleService/SubscribeAlerts", "RuleService/SubscribeWindowResults")
async def _subscribe_outputs(w: World) -> None:
    rules, bearer = w.rules, w.people["b-user"].bearer()
    # From the start: the first reply is B's (nothing of A's), the same as for a missing id.
    everything = await first_of_stream(
        rules.SubscribeAlerts(rules_pb2.SubscribeAlertsRequest(), metadata=bearer)
    )
    assert {a.tenant for a in everything.alerts} <= {w.b}

    def alerts(rule_id: str) -> Any:
        request = rules_pb2.SubscribeAlertsRequest(rule_id=rule_id)
        return first_of_stream(rules.SubscribeAlerts(request, metadata=bearer))

    def results(window_id: str) -> Any:
        request = rules_pb2.SubscribeWindowResultsRequest(window_id=window_id)
        return first_of_stream(rules.SubscribeWindowResults(request, metadata=bearer))

    await same_as_missing(alerts, w.name("rule"))
    await same_as_missing(results, w.name("window"))


# The tests -----------------------------------------------------------------------------


def public_methods() -> set[str]:
    """ "Service/Method" of every RPC of the public gateway services."""
    return {
        f"{service.name}/{method.name}"
        for module in (gateway_pb2, admin_pb2, schema_registry_pb2, rules_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_every_public_rpc_has_a_case() -> None:
    methods = public_methods()
    assert not set(CASES) & set(NOT_APPLICABLE)
    assert set(CASES) | set(NOT_APPLICABLE) <= methods, "a case for an RPC that is gone"
    missing = methods - set(CASES) - set(NOT_APPLICABLE)
    assert not missing, f"RPCs without a two-tenant case (or a reason): {sorted(missing)}"
    assert all(reason.strip() for reason in NOT_APPLICABLE.values())


async def test_the_comparison_tells_an_existing_object_from_a_missing_one(world: World) -> None:
    """The check every case leans on does see existence: A's own rule is not a missing one."""
    with pytest.raises(AssertionError, match="told apart"):
        await same_as_missing(
            lambda i: world.rules.GetRule(
                rules_pb2.GetRuleRequest(rule_id=i), **world.as_("a-rules")
            ),
            world.name("rule"),
        )


LEAKS: dict[str, str] = {}
"""Known leaks, by case name: the case is xfail(strict) with the leak as reason."""


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=[pytest.mark.xfail(strict=True, reason=LEAKS[name])] if name in LEAKS else [],
        )
        for name in sorted({f.__name__ for f in CASES.values()})
    ],
    ids=lambda name: name.strip("_"),
)
async def test_tenant_b_never_reaches_tenant_a(world: World, name: str) -> None:
    (function,) = {f for f in CASES.values() if f.__name__ == name}
    await function(world)
