"""The query API's request handling: a QueryEvents, CountEvents or AggregateEvents request ->
a validated `Selection` (keys, types, time range, the AIP-160 filter checked against the schemas
in scope) -> EventQueries -> the reply, with AIP-158 page tokens (streammesh.mesh.paging) bound
to the query and to the principal that asked.

The tenant and the principal come from the request's `tenant` and `principal` fields, which the
gateway fills from the caller's token (as for the schema registry); a request that leaves the
tenant empty (a peer from before tenants, an operator) acts in the tenant its metadata names,
else "default".
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.storage.batch import Limits, Violations, checked_time
from services.storage.filters import FieldScope
from services.storage.filters.check import check_filter
from services.storage.filters.syntax import FilterError, parse_filter
from services.storage.paging import event_page_scope
from services.storage.queries import EventQueries, GroupBy, Selection
from services.storage.rows import stored_event
from services.storage.store import StoredRow
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh import paging
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.paging import PageTokens, Principal, derive_page_token_key
from streammesh.mesh.settings import read_secret_file
from streammesh.mesh.tenancy import DEFAULT_TENANT, caller_tenant, canonical_tenant

__all__ = [
    "DEFAULT_MAX_GROUPS",
    "DEFAULT_PAGE_SIZE",
    "MAX_GROUPS",
    "MAX_PAGE_SIZE",
    "Cursor",
    "QueryApi",
    "page_tokens",
]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = paging.DEFAULT_PAGE_SIZE
"""Page size when the request leaves it 0."""
MAX_PAGE_SIZE = paging.MAX_PAGE_SIZE
"""Largest page; a larger page_size is lowered to it (AIP-158), a negative one refused."""
DEFAULT_MAX_GROUPS = 100
"""AggregateEvents groups when the request leaves max_groups 0."""
MAX_GROUPS = 1000
"""Largest max_groups a client may ask for."""
_ELEMENT_OVERHEAD = 8
"""Framing of one repeated element (tag + length varint), counted against the page budget."""
_TOKEN_PURPOSE = "storage.events"  # noqa: S105 (a key-derivation label, not a secret)
_GROUP_BY: dict[int, GroupBy] = {
    event_pb2.AGGREGATE_GROUP_BY_UNSPECIFIED: "",
    event_pb2.AGGREGATE_GROUP_BY_KEY: "key",
    event_pb2.AGGREGATE_GROUP_BY_TYPE: "type",
}


def page_tokens(secret_file: Path | None, *, max_age_seconds: float | None) -> PageTokens:
    """The page-token keys: one secret per line of `secret_file` (the first signs, all verify,
    so a secret is rotated by adding the new one first and dropping the old one after the
    token lifetime), or a random key of this process when there is none (tokens then work
    only on this replica, until it restarts)."""
    if secret_file is None:
        log.warning("no page_token_secret_file: page tokens hold on this storage replica only")
        return PageTokens([secrets.token_bytes(32)], max_age_seconds=max_age_seconds)
    lines = read_secret_file(secret_file).split(b"\n")
    keys = [derive_page_token_key(line.strip(), _TOKEN_PURPOSE) for line in lines if line.strip()]
    return PageTokens(keys, max_age_seconds=max_age_seconds)


def _tenant(request_tenant: str, context: grpc.aio.ServicerContext, trust_domain: str) -> str:
    if not request_tenant:
        return caller_tenant(context, trust_domain=trust_domain) or DEFAULT_TENANT
    tenant = canonical_tenant(request_tenant)
    if tenant is None:
        raise InvalidArgument("malformed tenant", field_violations=[("tenant", request_tenant)])
    return tenant


def _payload_path(field: str) -> tuple[str, ...]:
    names = tuple(field.split("."))
    if len(names) < 2 or names[0] != "payload" or not all(names[1:]):
        raise InvalidArgument(
            f"field: {field!r} is not a payload field (write payload.<field>, e.g. payload.amount)",
            field_violations=[("field", "not payload.<field>")],
        )
    return names[1:]


def _check_numeric(field: str, scope: FieldScope) -> None:
    """`field` must be a number in the schemas in scope that declare it (or, for types without
    a schema, undeclared by all)."""
    declared = scope.declarations(".".join(_payload_path(field)))
    wrong = sorted(
        f"{name}: {kind}" for name, kind in declared.items() if kind not in ("number", "integer")
    )
    if wrong:
        reason = f"not a number in every schema in scope ({', '.join(wrong)})"
    elif not declared and not scope.allow_undeclared:
        reason = "no schema in scope declares it"
    else:
        return
    raise InvalidArgument(f"field {field}: {reason}", field_violations=[("field", reason)])


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in one query's seq order, and the tokens of later positions."""

    after_seq: int
    """Events with a higher seq follow."""
    generation: int | None
    """The retention generation the token was issued under (services.storage.retention; 0
    for a token from before it was carried); None without a token."""
    _tokens: PageTokens
    _scope: dict[str, object]
    _principal: Principal
    _clock: Callable[[], float]

    def token(self, seq: int, generation: int) -> str:
        """The page (or resume) token that continues after `seq`, under the retention
        `generation` read before the rows up to `seq` were."""
        return self._tokens.issue(
            {"seq": seq, "rg": generation},
            scope=self._scope,
            principal=self._principal,
            now=self._clock(),
        )


class QueryApi:
    """QueryEvents, CountEvents and AggregateEvents over EventQueries."""

    def __init__(
        self,
        queries: EventQueries,
        tokens: PageTokens,
        limits: Limits,
        *,
        trust_domain: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._queries = queries
        self._tokens = tokens
        self._limits = limits
        self._trust_domain = trust_domain
        self._clock = clock

    @property
    def queries(self) -> EventQueries:
        """The queries this API runs."""
        return self._queries

    async def _selection(
        self, tenant: str, event_filter: event_pb2.EventFilter, expression: str, field: str = ""
    ) -> tuple[Selection, tuple[str, ...] | None]:
        """Validate the structured filter, and check the AIP-160 one and the aggregated `field`
        against the schemas of the types in scope (loaded once, only when one is given);
        INVALID_ARGUMENT naming the field (or the filter's token). The selection, and the
        field's payload path (None without a field)."""
        limits, problems = self._limits, Violations()
        for name, values in (("keys", event_filter.keys), ("types", event_filter.types)):
            if len(values) > limits.max_filter_keys:
                problems.add(f"filter.{name}", f"more than {limits.max_filter_keys}")
                continue
            for index, value in enumerate(values):
                problems.text(f"filter.{name}[{index}]", value, limits.max_text_chars)
        problems.text("filter.type", event_filter.type, limits.max_text_chars)
        types = sorted(set(event_filter.types))
        if event_filter.type:
            if types and event_filter.type not in types:
                problems.add("filter.type", "not among filter.types (both must match)")
            types = [event_filter.type]
        start = end = None
        if event_filter.HasField("start_time"):
            start = checked_time(event_filter.start_time, "filter.start_time", problems)
        if event_filter.HasField("end_time"):
            end = checked_time(event_filter.end_time, "filter.end_time", problems)
        if start is not None and end is not None and end < start:
            problems.add("filter.end_time", "before start_time")
        problems.raise_if_any()
        path = _payload_path(field) if field else None
        try:
            node = parse_filter(expression)  # before the scope: a syntax error costs no query
            scope = None
            if node is not None or field:
                scope = await self._queries.scope(tenant, types)
            predicate = check_filter(node, scope) if node is not None and scope else None
        except FilterError as error:  # named after this API's field
            raise FilterError(
                error.reason,
                column=error.column,
                token=error.token,
                detail=error.detail,
                field="filter_expression",
            ) from None
        if field and scope is not None:
            _check_numeric(field, scope)
        selection = Selection(
            tenant=tenant,
            keys=tuple(sorted(set(event_filter.keys))),
            types=tuple(types),
            start_time=start,
            end_time=end,
            predicate=predicate,
        )
        return selection, path

    async def query_events(
        self, request: storage_pb2.QueryEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.QueryEventsResponse:
        """One page of matching events in seq order, up to the first one not settled yet
        (services.storage.queries.PAGING_GUARANTEE), and the token for the next page."""
        page_size = paging.page_size(request.page_size)
        tenant = _tenant(request.tenant, context, self._trust_domain)
        principal = Principal(tenant, request.principal)
        selection, _ = await self._selection(tenant, request.filter, request.filter_expression)
        position = self.position(
            request.page_token, selection, request.filter_expression, principal
        )
        after_seq = position.after_seq
        page = await self._queries.page(
            selection, after_seq=after_seq, limit=page_size, generation=position.generation
        )
        response = storage_pb2.QueryEventsResponse()
        response.events.extend(self.render(page.rows))
        if page.more or len(page.rows) > len(response.events):
            # An empty page continues from where it started: its rows are not settled yet.
            last = response.events[-1].sequence if response.events else after_seq
            response.next_page_token = position.token(last, page.generation)
        return response

    async def resolve(
        self,
        request_tenant: str,
        event_filter: event_pb2.EventFilter,
        expression: str,
        context: grpc.aio.ServicerContext,
    ) -> Selection:
        """The caller's tenant's checked selection of a request (as QueryEvents checks it)."""
        tenant = _tenant(request_tenant, context, self._trust_domain)
        selection, _ = await self._selection(tenant, event_filter, expression)
        return selection

    def position(
        self, token: str, selection: Selection, expression: str, principal: Principal
    ) -> Cursor:
        """Where `token` (a page or resume token of this query and principal; empty: the
        start) continues, and how to issue the token of a later position."""
        scope = event_page_scope(
            tenant=selection.tenant,
            filter=expression,
            keys=selection.keys,
            types=selection.types,
            start_time=selection.start_time,
            end_time=selection.end_time,
        )
        opened = self._tokens.open(token, scope=scope, principal=principal, now=self._clock())
        after_seq, generation = 0, None
        if opened is not None:
            seq, generation = opened.get("seq"), opened.get("rg", 0)
            if type(seq) is not int or seq < 0 or type(generation) is not int or generation < 0:
                raise InvalidArgument(
                    "invalid page_token", field_violations=[("page_token", "no position")]
                )
            after_seq = seq
        return Cursor(after_seq, generation, self._tokens, scope, principal, self._clock)

    def render(self, rows: Sequence[StoredRow]) -> list[event_pb2.StoredEvent]:
        """The leading `rows` as messages, within the response budget (at least one row)."""
        events: list[event_pb2.StoredEvent] = []
        budget = self._limits.max_response_bytes
        odd: list[str] = []
        for row in rows:
            stored, problems = stored_event(row)
            budget -= stored.ByteSize() + _ELEMENT_OVERHEAD
            if budget < 0 and events:
                break
            events.append(stored)
            if problems:
                odd.append(f"{row.id!r} (seq {row.seq}): {'; '.join(problems)}")
        if odd:
            log.warning("rendered %d stored row(s) the API cannot carry: %s", len(odd), odd[:5])
        return events

    async def count_events(
        self, request: storage_pb2.CountEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.CountEventsResponse:
        """How many events match (RESOURCE_EXHAUSTED past the bounds)."""
        tenant = _tenant(request.tenant, context, self._trust_domain)
        selection, _ = await self._selection(tenant, request.filter, request.filter_expression)
        return storage_pb2.CountEventsResponse(count=await self._queries.count(selection))

    async def aggregate_events(
        self, request: storage_pb2.AggregateEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.AggregateEventsResponse:
        """Count, and sum/min/max/avg of a numeric payload field, per group."""
        if not 0 <= request.max_groups <= MAX_GROUPS:
            raise InvalidArgument(
                f"max_groups must be 0..{MAX_GROUPS} (0 means {DEFAULT_MAX_GROUPS})",
                field_violations=[("max_groups", f"{request.max_groups} is out of range")],
            )
        group_by = _GROUP_BY.get(request.group_by)
        if group_by is None:
            raise InvalidArgument(
                "unknown group_by", field_violations=[("group_by", str(request.group_by))]
            )
        tenant = _tenant(request.tenant, context, self._trust_domain)
        selection, path = await self._selection(
            tenant, request.filter, request.filter_expression, request.field
        )
        rows = await self._queries.aggregate(
            selection,
            group_by=group_by,
            field=path,
            max_groups=request.max_groups or DEFAULT_MAX_GROUPS,
        )
        response = storage_pb2.AggregateEventsResponse()
        for row in rows:
            group = response.groups.add(group=row.group, count=row.count)
            group.value_count = row.value_count
            for name in ("sum", "min", "max", "avg"):
                value = getattr(row, name)
                if value is not None:
                    setattr(group, name, value)
        return response
