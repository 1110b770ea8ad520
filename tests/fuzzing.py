"""Fuzz inputs for any gRPC method, derived from its descriptor: random bytes, and mutations of a
valid request (flipped, inserted and dropped bytes, truncations, and invalid UTF-8 written into
each string field in turn), so that some inputs fail to decode and some decode and reach the
handler with odd values.

Everything is drawn from a `random.Random` the caller seeds, so a failure replays exactly.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message

__all__ = [
    "FuzzCase",
    "decodes",
    "fuzz_cases",
    "hosted_methods",
    "load_descriptors",
    "sample_request",
]

_MARKER = b"\x01fz"
"""Starts each string a sample carries; replaced byte for byte to make one field invalid."""

_INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf")
"""A stray byte, a broken pair, a surrogate, beyond U+10FFFF, an overlong encoding."""


_DEEP_GROUPS = b"\xbb\x3e" * 2000 + b"\xbc\x3e" * 2000
"""Unknown field 999 as a group nested 2000 deep: a parser without a depth limit recurses."""


@dataclass(frozen=True)
class FuzzCase:
    """One input: what was done to it, and the bytes."""

    label: str
    data: bytes


def load_descriptors() -> None:
    """Import every generated module of streammesh.api, health and reflection, so the default
    descriptor pool knows every service a server may host."""
    import grpc_health.v1.health_pb2  # noqa: F401
    import grpc_reflection.v1alpha.reflection_pb2  # noqa: F401

    import streammesh.api

    for module in pkgutil.walk_packages(streammesh.api.__path__, "streammesh.api."):
        if module.name.endswith("_pb2"):
            importlib.import_module(module.name)


def hosted_methods(service_names: list[str]) -> list[MethodDescriptor]:
    """Every method of the named services, from the default descriptor pool (the generated
    modules must be imported): a new RPC in the protos is fuzzed without touching the test."""
    pool = descriptor_pool.Default()
    return [m for name in service_names for m in pool.FindServiceByName(name).methods]


def message_class(descriptor: Descriptor) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def decodes(descriptor: Descriptor, data: bytes) -> bool:
    """Whether `data` is a valid serialized `descriptor` message (what the server decodes)."""
    try:
        message_class(descriptor).FromString(data)
    except DecodeError:
        return False
    return True


def sample_request(descriptor: Descriptor) -> Message:
    """A message with every field set (one element per repeated field or map, nested messages
    three levels deep): each string holds a distinct marker, found again in the bytes."""
    counter = iter(range(10_000))
    message = message_class(descriptor)()
    _fill(message, counter, depth=3)
    return message


def _string(counter: Iterator[int]) -> str:
    return (_MARKER + f"{next(counter):04d}".encode()).decode()


def _scalar(field: Any, counter: Iterator[int]) -> object:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _string(counter)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b'{"n": 1}'
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = field.enum_type.values
        return values[-1].number
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 1.5
    return 1


def _is_map(field: Any) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and bool(
        field.message_type.GetOptions().map_entry
    )


def _fill(message: Message, counter: Iterator[int], depth: int) -> None:
    # Any: the descriptor stubs make every nested descriptor optional.
    fields: list[Any] = list(message.DESCRIPTOR.fields)
    for field in fields:
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if _is_map(field):
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            entries = getattr(message, field.name)
            key = _scalar(key_field, counter)
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth > 0:
                    _fill(entries[key], counter, depth - 1)
            else:
                entries[key] = _scalar(value_field, counter)
        elif is_message:
            if depth == 0:
                continue
            if field.is_repeated:
                _fill(getattr(message, field.name).add(), counter, depth - 1)
            else:
                _fill(getattr(message, field.name), counter, depth - 1)
        elif field.is_repeated:
            getattr(message, field.name).append(_scalar(field, counter))
        elif field.containing_oneof is None or not message.HasField(field.containing_oneof.name):
            setattr(message, field.name, _scalar(field, counter))


_EDGE_STRINGS = (
    "",
    "\x00",
    "a\x00b",
    " ",
    "\u00e9\u6f22\U0001f600",
    "\ufeff",
    "%s%n",
    "'; --",
    "x" * 5000,
)
_EDGE_INTS = (0, -1, 1, 2**31 - 1, -(2**31), 2**32 - 1)
_EDGE_LONGS = (2**63 - 1, -(2**63), 253402300800, -62135596801)


def _edge(field: Any, rng: random.Random) -> object:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(_EDGE_STRINGS)
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.choice((b"", b"\x00" * 64, rng.randbytes(32), b"{" * 200))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.choice((True, False))
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice((0, -1, 999, 2**31 - 1))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice((0.0, -1.0, float("inf"), float("nan"), 1e308))
    unsigned = kind in (
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    )
    wide = kind in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED64,
    )
    values = _EDGE_INTS + (_EDGE_LONGS if wide else ())
    bits = 64 if wide else 32
    if unsigned:
        return rng.choice([v for v in values if 0 <= v < 2**bits])
    return rng.choice([v for v in values if -(2 ** (bits - 1)) <= v < 2 ** (bits - 1)])


def _scalar_slots(message: Message) -> list[tuple[Message, Any]]:
    """The singular scalar fields of `message` and of every message set inside it."""
    slots: list[tuple[Message, Any]] = []
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            if not field.is_repeated:
                slots.append((message, field))
        elif _is_map(field):
            continue
        elif field.is_repeated:
            for item in value:
                slots += _scalar_slots(item)
        else:
            slots += _scalar_slots(value)
    return slots


def _edge_variant(sample: Message, rng: random.Random) -> bytes:
    """The sample with one to three of its fields set to edge values: valid protobuf that
    reaches the handler."""
    variant = type(sample)()
    variant.CopyFrom(sample)
    slots = _scalar_slots(variant)
    for message, field in rng.sample(slots, min(len(slots), rng.randint(1, 3))):
        setattr(message, field.name, _edge(field, rng))
    return variant.SerializeToString()


def _mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    if not data:
        return "random", rng.randbytes(rng.randint(1, 16))
    buffer = bytearray(data)
    position = rng.randrange(len(buffer))
    kind = rng.choice(("flip", "insert", "delete", "truncate", "varint"))
    if kind == "flip":
        buffer[position] ^= rng.randint(1, 255)
    elif kind == "insert":
        buffer[position:position] = rng.randbytes(rng.randint(1, 4))
    elif kind == "delete":
        del buffer[position : position + rng.randint(1, 4)]
    elif kind == "truncate":
        del buffer[position:]
    else:  # an overlong varint where a tag or length was
        buffer[position:position] = b"\xff" * 10
    return kind, bytes(buffer)


def fuzz_cases(
    descriptor: Descriptor,
    rng: random.Random,
    *,
    random_count: int,
    mutation_count: int,
    edge_count: int,
) -> list[FuzzCase]:
    """The valid sample, the empty message, deeply nested groups, `random_count` random bytes,
    `mutation_count` byte-level mutations of the sample, `edge_count` valid variants with edge
    values, and the sample with invalid UTF-8 in each string field in turn (same length, so the
    message still frames and only the text is wrong)."""
    sample = sample_request(descriptor)
    valid = sample.SerializeToString()
    cases = [FuzzCase("valid", valid), FuzzCase("empty", b""), FuzzCase("deep", _DEEP_GROUPS)]
    cases += [FuzzCase("random", rng.randbytes(rng.randint(1, 96))) for _ in range(random_count)]
    for _ in range(mutation_count):
        kind, data = _mutate(rng, valid)
        cases.append(FuzzCase(kind, data))
    cases += [FuzzCase("edge", _edge_variant(sample, rng)) for _ in range(edge_count)]
    start = valid.find(_MARKER)
    while start != -1:
        bad = rng.choice(_INVALID_UTF8)
        marker_end = start + len(_MARKER) + 4
        replaced = (bad + valid[start + len(bad) : marker_end])[: marker_end - start]
        cases.append(FuzzCase("bad-utf8", valid[:start] + replaced + valid[marker_end:]))
        start = valid.find(_MARKER, marker_end)
    return cases
