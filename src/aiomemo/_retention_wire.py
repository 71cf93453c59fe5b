"""The frames :mod:`aiomemo._retention_child` and :mod:`aiomemo._retention` exchange.

A frame: 1 tag byte, a 4-byte big-endian payload length, the payload. Keys
travel as a 2-byte big-endian length and the raw key, many to a frame.
"""

from __future__ import annotations

import struct

__all__ = ["HEADER", "KEYS_PER_FRAME", "pack_keys", "unpack_keys"]

HEADER = struct.Struct(">cI")  # tag, payload length
_KEY_LEN = struct.Struct(">H")
KEYS_PER_FRAME = 4096


def pack_keys(keys: list[bytes]) -> bytes:
    """Raw keys, each as a 2-byte big-endian length and its bytes."""
    return b"".join(_KEY_LEN.pack(len(k)) + k for k in keys)


def unpack_keys(payload: bytes) -> list[bytes]:
    """The keys :func:`pack_keys` packed."""
    out: list[bytes] = []
    view, pos, end = memoryview(payload), 0, len(payload)
    while pos < end:
        if pos + 2 > end:
            raise ValueError("a key frame ends inside a key length")
        (n,) = _KEY_LEN.unpack_from(view, pos)
        pos += 2
        if pos + n > end:
            raise ValueError("a key frame ends inside a key")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    return out


