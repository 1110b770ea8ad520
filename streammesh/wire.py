"""Protobuf wire encoding for the few places that frame messages by hand, to skip a decode and
re-encode of bytes they already hold (the processor forwarding a queued batch, the bench's
pre-serialized requests)."""

from __future__ import annotations

__all__ = ["length_delimited_field", "varint", "varint_field"]


def varint(value: int) -> bytes:
    """`value` (non-negative) as a base-128 varint."""
    if value < 0:
        raise ValueError("only non-negative varints are framed here")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    """A varint-typed field (wire type 0)."""
    return varint(number << 3) + varint(value)


def length_delimited_field(number: int, payload: bytes) -> bytes:
    """A bytes, string or message field (wire type 2) holding `payload` as it is."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload
