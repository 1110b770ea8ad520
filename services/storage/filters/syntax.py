r"""The AIP-160 filter syntax (https://google.aip.dev/160), the subset StreamMesh queries take,
parsed into a small immutable tree that records where each part stood in the text.

The grammar is lark's (LALR(1)): no AIP-160 parser is kept on PyPI that does
this job (the one SQLAlchemy-bound package is not served and would bypass our type checks), and
lark is well kept. The tree is built by an inline transformer during the parse, so a deeply
nested filter never recurses in Python; the depth is still capped so that the checks and the
SQL stay small.

Grammar (AIP-160's precedence: OR binds tighter than the implicit AND of a sequence, which binds
tighter than AND; so `a AND b c OR d` is `a AND (b AND (c OR d))`):

    filter      : [expression]
    expression  : sequence {"AND" sequence}
    sequence    : factor {factor}                       -- whitespace is AND
    factor      : term {"OR" term}
    term        : ["NOT" | "-"] simple
    simple      : restriction | "(" expression ")"
    restriction : member [comparator arg]
    member      : name {"." name}                       -- name: TEXT or a quoted STRING
    comparator  : "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"
    arg         : NUMBER | TEXT | STRING | "*"

Literals: STRING is "..." or '...' with the escapes \\ \" \' \n \r \t \uXXXX; NUMBER is a decimal
(-12, 3.5, 1e3); TEXT is a bare word (eu-west-1, true, false). Keywords are upper case; `and`
is a word; a word is letters, digits, _ and - (not first: a digit or -). AIP-160's functions (`f(x)`) and bare global values (`"gold"` alone) are not part of
the subset: the checks refuse a restriction without a comparator.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from streammesh.mesh.errors import InvalidArgument

__all__ = [
    "MAX_FILTER_CHARS",
    "MAX_FILTER_DEPTH",
    "And",
    "Comparator",
    "FilterError",
    "Member",
    "Node",
    "Not",
    "Or",
    "Restriction",
    "Value",
    "ValueKind",
    "parse_filter",
]

MAX_FILTER_CHARS = 4096
"""Longer filters are refused before parsing."""
MAX_FILTER_DEPTH = 32
"""Nesting of parentheses, NOT and operators, at most."""

Comparator = Literal["=", "!=", "<", "<=", ">", ">=", ":"]
ValueKind = Literal["string", "text", "number", "any"]
"""How a literal was written: quoted, a bare word, a number, or `*`."""


class FilterError(InvalidArgument):
    """A filter that does not parse or does not fit the fields in scope; the message names the
    offending token and its column (1-based character position in the filter text)."""

    def __init__(
        self, reason: str, *, column: int, token: str, detail: str = "", field: str = "filter"
    ) -> None:
        message = f"filter: {reason} at column {column}" + (f" ({detail})" if detail else "")
        super().__init__(
            message, field_violations=[(field, message)], error_reason="INVALID_FILTER"
        )
        self.reason = reason
        self.detail = detail
        self.column = column
        self.token = token


@dataclass(frozen=True, slots=True)
class Value:
    """A literal: `text` is the decoded value (a STRING without its quotes and escapes)."""

    kind: ValueKind
    text: str
    column: int
    source: str
    """As written, for messages."""


@dataclass(frozen=True, slots=True)
class Member:
    """A field path such as payload.customer.tier, split at the dots."""

    names: tuple[str, ...]
    columns: tuple[int, ...]
    """Where each name starts."""
    source: str

    @property
    def column(self) -> int:
        return self.columns[0]

    @property
    def path(self) -> str:
        return ".".join(self.names)


@dataclass(frozen=True, slots=True)
class Restriction:
    """`member comparator value`, or a bare member (comparator and value None)."""

    member: Member
    comparator: Comparator | None
    value: Value | None
    comparator_column: int = 0
    depth: int = 1

    @property
    def column(self) -> int:
        return self.member.column


@dataclass(frozen=True, slots=True)
class And:
    """All of `items` (AND, or terms side by side)."""

    items: tuple[Node, ...]
    column: int
    depth: int


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Node, ...]
    column: int
    depth: int


@dataclass(frozen=True, slots=True)
class Not:
    """NOT or `-`: every event in scope that `item` does not match."""

    item: Node
    column: int
    depth: int


Node = Restriction | And | Or | Not

_GRAMMAR = r"""
start: expression
expression: sequence (_AND sequence)*
sequence: factor+
factor: term (_OR term)*
term: NOT simple | MINUS simple | simple
?simple: restriction | _LPAREN expression _RPAREN
restriction: member (COMPARATOR arg)?
member: name (_DOT name)*
?name: TEXT | STRING
?arg: NUMBER | TEXT | STRING | ASTERISK

_AND: "AND"
_OR: "OR"
NOT: "NOT"
MINUS: "-"
_LPAREN: "("
_RPAREN: ")"
_DOT: "."
ASTERISK: "*"
COMPARATOR: "<=" | ">=" | "!=" | "<" | ">" | "=" | ":"
NUMBER.2: /-?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?(?![\w\-])/
STRING: /"(\\.|[^"\\])*"/ | /'(\\.|[^'\\])*'/
TEXT: /(?!\d)\w[\w\-]*/
%ignore /\s+/
"""

_VALUE_KINDS: dict[str, ValueKind] = {"NUMBER": "number", "STRING": "string", "ASTERISK": "any"}
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "r": "\r", "t": "\t"}
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_TOKEN_NAMES = {
    "_AND": "AND",
    "_OR": "OR",
    "NOT": "NOT",
    "MINUS": "-",
    "_LPAREN": "(",
    "_RPAREN": ")",
    "_DOT": ".",
    "ASTERISK": "*",
    "COMPARATOR": "a comparator",
    "NUMBER": "a number",
    "STRING": "a quoted string",
    "TEXT": "a name",
    "$END": "the end",
}


def _column(token: Token) -> int:
    return (token.start_pos or 0) + 1


def _decode_string(token: Token) -> str:
    def replace(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape in _ESCAPES:
            return _ESCAPES[escape]
        if len(escape) == 5:
            return chr(int(escape[1:], 16))
        raise FilterError(
            f"unknown escape \\{escape} in string {token.value}",
            column=_column(token) + match.start(),
            token=token.value,
        )

    decoded = _ESCAPE.sub(replace, token.value[1:-1])
    try:
        # Joins a surrogate pair written as two escapes (as JSON encoders write U+1F600);
        # a lone surrogate is no character at all.
        decoded = decoded.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        raise FilterError(
            f"string {token.value} holds a lone UTF-16 surrogate escape",
            column=_column(token),
            token=token.value,
        ) from None
    if "\0" in decoded:  # Postgres text cannot hold NUL
        raise FilterError(
            f"string {token.value} holds U+0000", column=_column(token), token=token.value
        )
    return decoded


def _depth(nodes: list[Node]) -> int:
    return max(node.depth for node in nodes) + 1


class _Build(Transformer[Token, Node]):
    """Inline (during the LALR parse) construction of the tree; checks the depth as it grows."""

    def __init__(self, max_depth: int) -> None:
        super().__init__()
        self._max_depth = max_depth

    def _checked(self, node: Node, token: str) -> Node:
        if node.depth > self._max_depth:
            raise FilterError(
                f"nested more than {self._max_depth} levels deep", column=node.column, token=token
            )
        return node

    def start(self, children: list[Node]) -> Node:
        return children[0]

    def expression(self, children: list[Node]) -> Node:
        if len(children) == 1:
            return children[0]
        return self._checked(And(tuple(children), children[0].column, _depth(children)), "AND")

    sequence = expression

    def factor(self, children: list[Node]) -> Node:
        if len(children) == 1:
            return children[0]
        return self._checked(Or(tuple(children), children[0].column, _depth(children)), "OR")

    def term(self, children: list[Token | Node]) -> Node:
        if len(children) == 1:
            only = children[0]
            assert not isinstance(only, Token)
            return only
        sign, item = children
        assert isinstance(sign, Token) and not isinstance(item, Token)
        return self._checked(Not(item, _column(sign), item.depth + 1), sign.value)

    def member(self, names: list[Token]) -> Member:
        decoded = tuple(
            _decode_string(name) if name.type == "STRING" else name.value for name in names
        )
        source = ".".join(name.value for name in names)
        return Member(decoded, tuple(_column(name) for name in names), source)

    def restriction(self, children: list[Member | Token]) -> Node:
        member = children[0]
        assert isinstance(member, Member)
        if len(children) == 1:
            return Restriction(member, None, None)
        comparator, arg = children[1], children[2]
        assert isinstance(comparator, Token) and isinstance(arg, Token)
        kind = _VALUE_KINDS.get(arg.type, "text")
        text = _decode_string(arg) if kind == "string" else arg.value
        value = Value(kind, text, _column(arg), arg.value)
        return Restriction(member, comparator.value, value, _column(comparator))


def _parser(max_depth: int) -> Lark:
    # The basic lexer (not the contextual one) keeps AND, OR and NOT reserved everywhere: in a
    # context that expects no keyword the contextual lexer would read `NOT` as a field name.
    return Lark(
        _GRAMMAR,
        parser="lalr",
        lexer="basic",
        transformer=_Build(max_depth),
        maybe_placeholders=False,
    )


_PARSER = _parser(MAX_FILTER_DEPTH)


def _expected(error: UnexpectedInput) -> str:
    names = sorted({_TOKEN_NAMES.get(name, name) for name in getattr(error, "expected", ())})
    return f" (expected {', '.join(names)})" if names else ""


def _syntax_error(text: str, error: UnexpectedInput) -> FilterError:
    if isinstance(error, UnexpectedCharacters):
        at = error.pos_in_stream or 0
        char = text[at]
        if char in "\"'":
            reason = f"unterminated string starting {text[at : at + 12]!r}"
        else:
            reason = f"unexpected character {char!r}"
        return FilterError(reason, column=at + 1, token=char)
    if isinstance(error, UnexpectedToken) and error.token.type != "$END":
        token = error.token
        return FilterError(
            f"unexpected {token.value!r}{_expected(error)}",
            column=_column(token),
            token=token.value,
        )
    assert isinstance(error, UnexpectedToken | UnexpectedEOF)
    return FilterError(
        f"unexpected end of filter{_expected(error)}", column=len(text) + 1, token=""
    )


@functools.lru_cache(maxsize=512)
def parse_filter(text: str) -> Node | None:
    """The tree of an AIP-160 filter, None for an empty (all-whitespace) one; FilterError when
    the text does not parse, is longer than MAX_FILTER_CHARS or nests deeper than
    MAX_FILTER_DEPTH. Cached (the tree is immutable): each page of a query sends its filter
    again."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(
            f"longer than {MAX_FILTER_CHARS} characters",
            column=MAX_FILTER_CHARS + 1,
            token=text[MAX_FILTER_CHARS : MAX_FILTER_CHARS + 10],
        )
    if not text.strip():
        return None
    try:
        tree = _PARSER.parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(text, error) from None
    assert not isinstance(tree, Token | Member)
    node: Node = tree  # type: ignore[assignment]
    return node
