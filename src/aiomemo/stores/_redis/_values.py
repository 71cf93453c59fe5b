"""How RedisStore keeps a record in one Redis string, and its event messages.

Values
    ``MAGIC`` + tag + body, where body = ``>dHI`` (time, len(func),
    len(digests)) + func + digests + encoded result, and the tag covers (task
    key + body):

    * ``b"AMR\\x01"``, 16-byte plain blake3 checksum: written without a secret.
      It catches damage and a value copied under another key, not forgery:
      anyone who can write to the database can plant a result.
    * ``b"AMR\\x02"``, 32-byte keyed blake3 (keyed mode, the key derived from
      the store's ``secret`` with blake3's key derivation): written with a
      secret. A value whose tag does not verify under the reader's key (written
      without the secret, with another one, or tampered with) is a miss.
    * ``b"AMR\\x03"`` / ``b"AMR\\x04"``: the same two for a record that
      expires; body = ``>ddHI`` (time, expires, len(func), len(digests)) + ...
      (records that never expire keep the first two forms).

    Nothing read from Redis is ever unpickled.

Event messages (pub/sub)
    A kind byte (``b"p"``: results were put, ``b"r"``: leases were released),
    then ``u16 length + task key`` per key: one message per batch of writes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from blake3 import blake3

from aiomemo.stores._base import Record

__all__ = [
    "MAGIC",
    "MAGIC_EXP",
    "MAGIC_EXP_SIGNED",
    "MAGIC_SIGNED",
    "decode_value",
    "derive_key",
    "encode_value",
    "key_list",
    "parse_key_list",
]

MAGIC = b"AMR\x01"  # aiomemo redis record, checksummed
MAGIC_SIGNED = b"AMR\x02"  # aiomemo redis record, signed with a keyed hash
MAGIC_EXP = b"AMR\x03"  # ... checksummed, with an expiry
MAGIC_EXP_SIGNED = b"AMR\x04"  # ... signed, with an expiry
_HEAD_EXP = struct.Struct(">ddHI")  # time, expires, len(func), len(digests)
_SUM_LEN = 16
_MAC_LEN = 32
_HEAD = struct.Struct(">dHI")  # time, len(func), len(digests)
_KEY_CONTEXT = "aiomemo 2026-12 RedisStore result signing key"


def derive_key(secret: str | bytes) -> bytes:
    """The 32-byte blake3 key for signing values, derived from ``secret``."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("RedisStore secret must be a non-empty str or bytes")
    key: bytes = blake3(secret, derive_key_context=_KEY_CONTEXT).digest()
    return key


def _tag(key: bytes, parts: Sequence[bytes | memoryview], mac_key: bytes | None) -> bytes:
    if mac_key is None:
        h = blake3(key)
        for p in parts:
            h.update(p)
        digest: bytes = h.digest(length=_SUM_LEN)
        return digest
    h = blake3(key=mac_key)
    h.update(_HEAD_KLEN.pack(len(key)))
    h.update(key)
    for p in parts:
        h.update(p)
    mac: bytes = h.digest(length=_MAC_LEN)
    return mac


_HEAD_KLEN = struct.Struct(">H")


def encode_value(record: Record, mac_key: bytes | None = None) -> bytes:
    """The bytes RedisStore keeps for ``record`` (header, tag, body).

    With ``mac_key`` (see :func:`derive_key`) the value is signed.
    """
    func = record.func.encode("utf-8")
    if len(func) > 0xFFFF:  # absurd, but keep it decodable
        func = func[:0xFFFF].decode("utf-8", "ignore").encode("utf-8")
    if record.expires < math.inf:
        head = _HEAD_EXP.pack(record.time, record.expires, len(func), len(record.digests))
        magic = MAGIC_EXP if mac_key is None else MAGIC_EXP_SIGNED
    else:
        head = _HEAD.pack(record.time, len(func), len(record.digests))
        magic = MAGIC if mac_key is None else MAGIC_SIGNED
    parts = (head, func, record.digests, record.value)
    return b"".join((magic, _tag(record.key, parts, mac_key), *parts))


def decode_value(key: bytes, blob: bytes, mac_key: bytes | None = None) -> Record | None:
    """The record kept in ``blob`` under ``key``, or None when it is not sound.

    With ``mac_key`` only a value signed with that key is sound; without it
    only a checksummed (unsigned) value.
    """
    magic, tag_len = (MAGIC, _SUM_LEN) if mac_key is None else (MAGIC_SIGNED, _MAC_LEN)
    start = len(magic) + tag_len
    lead = blob[: len(magic)]
    timed = lead == (MAGIC_EXP if mac_key is None else MAGIC_EXP_SIGNED)
    head = _HEAD_EXP if timed else _HEAD
    if len(blob) < start + head.size or not (timed or lead == magic):
        return None
    mv = memoryview(blob)
    if _tag(key, (mv[start:],), mac_key) != blob[len(magic) : start]:
        return None
    expires = math.inf
    if timed:
        t, expires, flen, dlen = _HEAD_EXP.unpack_from(blob, start)
    else:
        t, flen, dlen = _HEAD.unpack_from(blob, start)
    pos = start + head.size
    if pos + flen + dlen > len(blob):
        return None
    try:
        func = bytes(mv[pos : pos + flen]).decode("utf-8")
    except UnicodeDecodeError:
        return None
    pos += flen
    digests = bytes(mv[pos : pos + dlen])
    pos += dlen
    return Record(key, bytes(mv[pos:]), func, t, digests, expires)


_KLEN = struct.Struct(">H")


def key_list(kind: bytes, keys: Sequence[bytes]) -> bytes:
    """One event message naming ``keys``."""
    parts = [kind]
    for k in keys:
        parts.append(_KLEN.pack(len(k)))
        parts.append(k)
    return b"".join(parts)


def parse_key_list(msg: bytes) -> list[bytes]:
    """The task keys an event message names (a truncated tail is ignored)."""
    out: list[bytes] = []
    pos = 1
    n = len(msg)
    while pos + _KLEN.size <= n:
        (ln,) = _KLEN.unpack_from(msg, pos)
        pos += _KLEN.size
        if pos + ln > n:
            break
        out.append(msg[pos : pos + ln])
        pos += ln
    return out
