"""One reason why a schema change is refused, and the JSON Pointer helpers that locate it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANY_TOKEN", "Violation", "pointer_join"]

# The instance-path token for "every array item past prefixItems" or "every property name the
# schema does not declare". JSON Pointer has no wildcard; a literal property named "*" is rare
# enough that the ambiguity is worth the readability.
ANY_TOKEN = "*"  # noqa: S105 (a pointer token, not a password)


def pointer_join(pointer: str, token: str | int) -> str:
    """`pointer` with one more reference token, escaped as RFC 6901 says (~ -> ~0, / -> ~1)."""
    text = str(token).replace("~", "~0").replace("/", "~1")
    return f"{pointer}/{text}"


@dataclass(frozen=True)
class Violation:
    """One way in which data written under one schema may be refused by a reader of another.

    The check always compares a *writer* schema (whose data exists or will exist) with a *reader*
    schema (which must accept it); `compatibility.check_compatibility` turns these into old/new
    terms for the client.
    """

    rule: str
    """A stable, kebab-case rule name (`required-added`, `type-narrowed`, ...), for tooling."""
    message: str
    """A sentence for a person, naming the values on both sides."""
    instance_path: str
    """JSON Pointer to the place in an *instance* (an event payload) where the two schemas
    disagree, `""` for the whole payload; `*` stands for any item or undeclared property."""
    writer_path: str
    """JSON Pointer into the writer schema document, to the schema object that admits the data."""
    reader_path: str
    """JSON Pointer into the reader schema document, to the schema object that refuses it."""
