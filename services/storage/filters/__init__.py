"""Query filters: the AIP-160 subset of QueryEvents, checked against the payload schemas in
scope and compiled to a parameterised Postgres WHERE expression.

    scope = FieldScope({"order.created": payload_fields(schema)})
    where = compile_filter('payload.amount > 10 AND attributes.region = "eu"', scope)
    rows = await conn.fetch("SELECT ... WHERE tenant = $1 AND " + where.sql, tenant, *where.params)

with `first_param=2` in that call, so that the filter's placeholders follow the caller's. Every
refusal is a FilterError (INVALID_ARGUMENT) naming the token and its column.
"""

from __future__ import annotations

from services.storage.filters.check import check_filter
from services.storage.filters.fields import FieldScope, JsonType, PayloadFields, payload_fields
from services.storage.filters.sql import CompiledFilter, EventColumns, render_sql
from services.storage.filters.syntax import (
    MAX_FILTER_CHARS,
    MAX_FILTER_DEPTH,
    FilterError,
    parse_filter,
)

__all__ = [
    "MAX_FILTER_CHARS",
    "MAX_FILTER_DEPTH",
    "CompiledFilter",
    "EventColumns",
    "FieldScope",
    "FilterError",
    "JsonType",
    "PayloadFields",
    "compile_filter",
    "payload_fields",
]

_MATCH_ALL = CompiledFilter("TRUE", ())


def compile_filter(
    text: str,
    scope: FieldScope,
    columns: EventColumns | None = None,
    *,
    first_param: int = 1,
) -> CompiledFilter:
    """The WHERE expression of an AIP-160 filter (TRUE for an empty one) and its parameters,
    numbered from `first_param`; FilterError when it does not parse or fit the scope."""
    node = parse_filter(text)
    if node is None:
        return _MATCH_ALL
    return render_sql(check_filter(node, scope), columns, first_param=first_param)
