"""The output listings' filters (services.storage.filters.resources), pure: the SQL holds column
names of the field table and placeholders only, every value a typed parameter (a hostile value
stays a parameter), times become the columns' units, and every refusal names its token."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.storage.filters import FilterError
from services.storage.filters.resources import (
    ALERT_FIELDS,
    LATE_EVENT_FIELDS,
    WINDOW_RESULT_FIELDS,
    compile_resource_filter,
)

JAN_1 = 1_767_225_600 * 1_000_000_000


def test_values_are_parameters_never_sql() -> None:
    hostile = "x'); DROP TABLE alerts; --"
    compiled = compile_resource_filter(
        f'rule_id = "{hostile}" OR key:"{hostile}*"', ALERT_FIELDS, first_param=3
    )
    assert compiled is not None
    assert "DROP" not in compiled.sql
    assert compiled.sql == "(rule_id = $3::text OR key ^@ $4::text)"
    assert compiled.params == (hostile, hostile)


def test_times_in_the_columns_units() -> None:
    nanos = compile_resource_filter(
        'last_event_time >= "2026-01-01T00:00:00.000000005Z"', ALERT_FIELDS
    )
    assert nanos is not None
    assert nanos.sql == "last_event_nanos >= $1::bigint"
    assert nanos.params == (JAN_1 + 5,)
    stamp = compile_resource_filter('emit_time < "2026-01-01T00:00:00Z"', WINDOW_RESULT_FIELDS)
    assert stamp is not None
    assert stamp.sql == "(emitted_at, 0::int2) < ($1::timestamptz, $2::int2)"


def test_kinds_render_as_their_columns() -> None:
    compiled = compile_resource_filter(
        "NOT retracted = true AND revision > 0 AND values.p95 <= 2.5 AND values.n:*",
        WINDOW_RESULT_FIELDS,
    )
    assert compiled is not None
    assert "retracted = $1::boolean" in compiled.sql and "revision > $2::bigint" in compiled.sql
    assert "window_results.values #> $3::text[]" in compiled.sql
    assert compiled.params[:3] == (True, 0, ["p95"])
    assert Decimal("2.5") in compiled.params
    choice = compile_resource_filter("source = WINDOW", LATE_EVENT_FIELDS)
    assert choice is not None and choice.params == ("window",)
    assert compile_resource_filter("  ", ALERT_FIELDS) is None


@pytest.mark.parametrize(
    ("text", "fields", "column", "reason"),
    [
        ('window = "w"', WINDOW_RESULT_FIELDS, 1, 'unknown field "window"'),
        ("values.a.b > 1", WINDOW_RESULT_FIELDS, 10, "values holds numbers by aggregate name"),
        ("values.a:3", WINDOW_RESULT_FIELDS, 10, "test presence with :*"),
        ("key.part = 1", ALERT_FIELDS, 5, 'key has no field "part"'),
        ("rule_version = 99999999999999999999", ALERT_FIELDS, 16, "out of range"),
        ("rule_version = 1.5", ALERT_FIELDS, 16, "is an integer"),
        # Nanoseconds in a bigint end in 2262: refused, not sent to Postgres to overflow there.
        ('last_event_time < "2300-01-01T00:00:00Z"', ALERT_FIELDS, 19, "out of range"),
        ('event_time > "1600-01-01T00:00:00Z"', LATE_EVENT_FIELDS, 14, "out of range"),
        ('event_time:"2026"', LATE_EVENT_FIELDS, 11, "always set"),
        ("rule_version:2", ALERT_FIELDS, 13, "always set"),
        ("rule_kind > rate", ALERT_FIELDS, 13, "compared with = or !="),
        ("key", ALERT_FIELDS, 1, "needs a comparison"),
    ],
)
def test_refusals_name_the_token(text: str, fields: object, column: int, reason: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_resource_filter(text, fields)  # type: ignore[arg-type]
    assert caught.value.column == column, caught.value
    assert reason in str(caught.value), caught.value
    assert caught.value.field_violations[0][0] == "filter_expression"
