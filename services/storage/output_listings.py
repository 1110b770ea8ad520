"""The request side of the output listings (ListAlerts, ListWindowResults, ListLateEvents):
the tenant and principal the gateway filled in, the AIP-160 filter checked before anything is
read, AIP-158 page sizes (streammesh.mesh.paging.page_size) and page tokens signed by the query
API's keys (streammesh.mesh.paging.PageTokens), bound to the listing, the tenant, the id fields,
the filter as written and the principal: a token replayed with another filter, or by another
user, is refused with INVALID_ARGUMENT."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
from google.protobuf.message import Message

from services.storage import registry
from services.storage.filters.resources import compile_resource_filter
from services.storage.output_queries import Listing, OutputQueries, position
from streammesh.mesh import paging
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.paging import PageTokens, Principal

__all__ = ["OutputListings", "Page"]

M = TypeVar("M", bound=Message)
_MAX_INT = 2**63
_ELEMENT_OVERHEAD = 8
"""Framing of one repeated element (tag and length), counted against the reply budget."""


class ListingRequest(Protocol):
    @property
    def tenant(self) -> str: ...
    @property
    def principal(self) -> str: ...
    @property
    def page_size(self) -> int: ...
    @property
    def page_token(self) -> str: ...
    @property
    def filter_expression(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Page(Generic[M]):
    items: list[M]
    next_page_token: str
    """Empty on the last page."""


def _opened_position(opened: Mapping[str, Any], listing: Listing) -> list[Any]:
    """The keyset position a (signed) token carries, its values checked against the listing's
    column types all the same: a key that signs tokens must not be enough to reach SQL with
    an argument of the wrong type."""
    values = opened.get("k")
    types = listing.position_types
    if (
        not isinstance(values, list)
        or len(values) != len(types)
        or any(type(value) is not kind for value, kind in zip(values, types, strict=True))
        or any(isinstance(value, int) and not -_MAX_INT <= value < _MAX_INT for value in values)
    ):
        raise InvalidArgument(
            "invalid page_token", field_violations=[("page_token", "no position")]
        )
    return values


class OutputListings:
    def __init__(
        self,
        queries: OutputQueries,
        tokens: PageTokens,
        *,
        max_response_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._queries = queries
        self._tokens = tokens
        self._max_bytes = max_response_bytes
        self._clock = clock

    async def page(
        self,
        listing: Listing,
        request: ListingRequest,
        equal: Mapping[str, str],
        render: Callable[[asyncpg.Record], M],
    ) -> Page[M]:
        """One page of `listing` for the request's caller, and the token of the next."""
        tenant = registry.checked_tenant(request.tenant)
        size = paging.page_size(request.page_size)
        # Checked first: a filter that does not fit costs no query (and no token check).
        compile_resource_filter(request.filter_expression, listing.fields)
        principal = Principal(tenant, request.principal)
        scope = {
            "what": listing.name,
            "tenant": tenant,
            "equal": dict(equal),
            "filter": request.filter_expression,
        }
        now = self._clock()
        opened = self._tokens.open(request.page_token, scope=scope, principal=principal, now=now)
        rows = await self._queries.page(
            listing,
            tenant,
            equal=equal,
            after=None if opened is None else _opened_position(opened, listing),
            filter_expression=request.filter_expression,
            limit=size + 1,
        )
        # Within the reply budget (an alert may name thousands of events): a page ends early,
        # with a token, rather than exceed the message limit; it holds at least one item.
        items: list[M] = []
        budget = self._max_bytes
        for row in rows[:size]:
            item = render(row)
            budget -= item.ByteSize() + _ELEMENT_OVERHEAD
            if budget < 0 and items:
                break
            items.append(item)
        token = ""
        if len(rows) > len(items):
            token = self._tokens.issue(
                {"k": position(listing, rows[len(items) - 1])},
                scope=scope,
                principal=principal,
                now=now,
            )
        return Page(items, token)
