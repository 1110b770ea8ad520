"""Number and string constraints of a writer schema against a reader's: the reader's bounds must
be at least as loose as the writer's."""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from services.storage.schemas.violations import Violation

if TYPE_CHECKING:
    from services.storage.schemas.subschema import SubschemaCheck

__all__ = ["check_numbers", "check_strings"]

Bound = tuple[float, bool]  # (value, exclusive)


def _bound(schema: Mapping[str, Any], inclusive: str, exclusive: str, lower: bool) -> Bound | None:
    """The tighter of `minimum`/`exclusiveMinimum` (or the maximum pair)."""
    candidates: list[Bound] = []
    if inclusive in schema:
        candidates.append((schema[inclusive], False))
    if exclusive in schema:
        candidates.append((schema[exclusive], True))
    if not candidates:
        return None
    if lower:
        return max(candidates, key=lambda bound: (bound[0], bound[1]))
    return min(candidates, key=lambda bound: (bound[0], not bound[1]))


def _looser(reader: Bound | None, writer: Bound | None, lower: bool) -> bool:
    """Whether the reader's bound admits everything the writer's does."""
    if reader is None:
        return True
    if writer is None:
        return False
    if writer[0] != reader[0]:
        return writer[0] > reader[0] if lower else writer[0] < reader[0]
    return writer[1] or not reader[1]


def _describe(bound: Bound | None, lower: bool) -> str:
    if bound is None:
        return "no lower bound" if lower else "no upper bound"
    sign = (">" if bound[1] else ">=") if lower else ("<" if bound[1] else "<=")
    return f"{sign} {bound[0]}"


def _fraction(number: float) -> Fraction:
    """A JSON number as an exact fraction of its decimal text (0.1 is 1/10, not a binary float)."""
    return Fraction(str(number))


def check_numbers(
    checker: SubschemaCheck,
    writer: Mapping[str, Any],
    wp: str,
    reader: Mapping[str, Any],
    rp: str,
    ip: str,
    any_number: bool,
) -> list[Violation]:
    """Bounds and multipleOf, for numbers the writer may write (`any_number`: not only integers)."""
    found: list[Violation] = []
    for lower, inclusive, exclusive, rule in (
        (True, "minimum", "exclusiveMinimum", "minimum-raised"),
        (False, "maximum", "exclusiveMaximum", "maximum-lowered"),
    ):
        reader_bound = _bound(reader, inclusive, exclusive, lower)
        writer_bound = _bound(writer, inclusive, exclusive, lower)
        if not _looser(reader_bound, writer_bound, lower):
            keyword = exclusive if reader_bound is not None and reader_bound[1] else inclusive
            found.append(
                checker.violation(
                    rule,
                    f"the reader requires {_describe(reader_bound, lower)}, the writer allows "
                    f"{_describe(writer_bound, lower)}",
                    ip,
                    wp,
                    f"{rp}/{keyword}",
                )
            )
    if "multipleOf" in reader:
        divisor = _fraction(reader["multipleOf"])
        if "multipleOf" in writer:
            ok = (_fraction(writer["multipleOf"]) / divisor).denominator == 1
        else:
            # Integers alone are all multiples of 1/n.
            ok = not any_number and (Fraction(1) / divisor).denominator == 1
        if not ok:
            found.append(
                checker.violation(
                    "multiple-of-added",
                    f"the reader requires multiples of {reader['multipleOf']}, the writer "
                    f"allows {writer.get('multipleOf', 'any value')}",
                    ip,
                    wp,
                    f"{rp}/multipleOf",
                )
            )
    return found


def check_strings(
    checker: SubschemaCheck,
    writer: Mapping[str, Any],
    wp: str,
    reader: Mapping[str, Any],
    rp: str,
    ip: str,
) -> list[Violation]:
    """Length bounds; a reader's pattern or format must be the writer's very own."""
    found: list[Violation] = []
    if reader.get("minLength", 0) > writer.get("minLength", 0):
        found.append(
            checker.violation(
                "min-length-raised",
                f"the reader requires at least {reader['minLength']} characters, the writer "
                f"allows {writer.get('minLength', 0)}",
                ip,
                wp,
                f"{rp}/minLength",
            )
        )
    if "maxLength" in reader and reader["maxLength"] < writer.get("maxLength", float("inf")):
        found.append(
            checker.violation(
                "max-length-lowered",
                f"the reader allows at most {reader['maxLength']} characters, the writer "
                f"{writer.get('maxLength', 'any number')}",
                ip,
                wp,
                f"{rp}/maxLength",
            )
        )
    # Regex inclusion is not decided: only an unchanged pattern is proven. Formats are treated
    # as assertions (ingest validates them), so an added or changed format may refuse data.
    for keyword, rule in (("pattern", "pattern-changed"), ("format", "format-changed")):
        if keyword in reader and writer.get(keyword) != reader[keyword]:
            found.append(
                checker.violation(
                    rule,
                    f"the reader requires {keyword} {reader[keyword]!r}, the writer "
                    + (f"{keyword} {writer[keyword]!r}" if keyword in writer else "none"),
                    ip,
                    wp,
                    f"{rp}/{keyword}",
                )
            )
    return found
