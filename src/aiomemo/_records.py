"""What a checkpoint holds: the record types every layer above shares.

The bottom of the format layer (records -> framing, reader, writer, paths ->
stores -> memoizer -> adapters and the CLI): this module imports nothing of
aiomemo's. ``aiomemo.stores`` re-exports the record types.

Expiry and tombstones (segment format 3):

* every :class:`Record` carries ``expires``, an absolute unix time after
  which it is a miss (:data:`NEVER`, ``math.inf``, for no expiry);
* a *tombstone* is a record whose ``value`` is one of two short byte
  strings starting 0xc1 (no encoded value starts with 0xc1, and a value
  reference is exactly 33 bytes): :data:`FORGET_KEY` says "every record of
  ``key`` written at or before ``time`` is forgotten", :data:`FORGET_FUNC`
  says the same of every record whose ``func`` is the tombstone's ``func``
  (its key is :func:`func_tombstone_key` of the name). A record written
  after the tombstone's time is live again. :class:`Tombstones` collects
  them and answers :meth:`Tombstones.forgets`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Final, Literal

from blake3 import blake3

__all__ = [
    "FORGET_FUNC",
    "FORGET_KEY",
    "NEVER",
    "TOMBSTONE_EXPIRES",
    "LoadReport",
    "Record",
    "Tombstones",
    "ValueRef",
    "func_tombstone",
    "func_tombstone_key",
    "key_tombstone",
]

#: the clock loading compares expiries with (tests replace it)
clock = time.time

#: ``Record.expires`` of a record that never expires
NEVER: Final = math.inf
#: ``Record.value`` of a tombstone for one key
FORGET_KEY: Final = b"\xc1\x01"
#: ``Record.value`` of a tombstone for every record of one function
FORGET_FUNC: Final = b"\xc1\x02"
#: a tombstone's ``expires``: it has no life of its own (lets the loader's
#: fast path tell a batch without tombstones or expiring records at C speed)
TOMBSTONE_EXPIRES: Final = 0.0


@dataclass(frozen=True, slots=True, init=False)
class Record:
    """One finished task's result, as stores keep it (or a tombstone).

    Attributes:
        key: the task key as raw bytes (32 bytes of blake3; 16 bytes for a
            Parsl md5 key imported from Parsl's checkpoints).
        value: the result encoded by ``aiomemo._codec.encode`` (opaque here),
            or :data:`FORGET_KEY` / :data:`FORGET_FUNC` for a tombstone.
        func: ``"module.qualname"`` of the task's function.
        time: when the task finished (a tombstone: the time it forgets up
            to, inclusive), seconds since the epoch.
        digests: optional per-argument digests (for ``explain``); empty when off.
        expires: seconds since the epoch after which the record is a miss;
            :data:`NEVER` for no expiry.
    """

    key: bytes
    value: bytes
    func: str
    time: float
    digests: bytes = b""
    expires: float = NEVER

    def __init__(
        self,
        key: bytes,
        value: bytes,
        func: str,
        time: float,
        digests: bytes = b"",
        expires: float = NEVER,
    ) -> None:
        # What the generated __init__ of a frozen dataclass does, through the
        # slots' own descriptors: half the cost (a record per finished task)
        _set_key(self, key)
        _set_value(self, value)
        _set_func(self, func)
        _set_time(self, time)
        _set_digests(self, digests)
        _set_expires(self, expires)

    @property
    def tombstone(self) -> Literal["key", "func"] | None:
        """``"key"`` or ``"func"`` for a tombstone, None for a result.

        A tombstone has a marker value *and* ``expires`` of
        :data:`TOMBSTONE_EXPIRES` (only a format-3 record has both).
        """
        value = self.value
        if self.expires == TOMBSTONE_EXPIRES and len(value) == 2 and value[0] == 0xC1:
            if value == FORGET_KEY:
                return "key"
            if value == FORGET_FUNC:
                return "func"
        return None

    def expired(self, now: float) -> bool:
        """True when ``now`` is at or past the record's expiry (never for a tombstone)."""
        return self.expires <= now and self.tombstone is None


_set_key, _set_value, _set_func, _set_time, _set_digests, _set_expires = (
    Record.__dict__[name].__set__
    for name in ("key", "value", "func", "time", "digests", "expires")
)


def func_tombstone_key(func: str) -> bytes:
    """The key a function tombstone is stored under (a fixed derivation of the name)."""
    return blake3(b"aiomemo forget func\x00" + func.encode("utf-8", "surrogatepass")).digest()


def key_tombstone(key: bytes, func: str, time: float) -> Record:
    """A tombstone: records of ``key`` written at or before ``time`` are forgotten."""
    return Record(key, FORGET_KEY, func, float(time), b"", TOMBSTONE_EXPIRES)


def func_tombstone(func: str, time: float) -> Record:
    """A tombstone: records of function ``func`` written at or before ``time`` are forgotten."""
    return Record(func_tombstone_key(func), FORGET_FUNC, func, float(time), b"", TOMBSTONE_EXPIRES)


@dataclass(slots=True)
class Tombstones:
    """The tombstones a load (or a tool's scan) found: the newest time per key and per function."""

    keys: dict[bytes, float] = field(default_factory=dict)
    funcs: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.keys or self.funcs)

    def __len__(self) -> int:
        return len(self.keys) + len(self.funcs)

    def add(self, rec: Record) -> bool:
        """Take ``rec`` if it is a tombstone (True); False for a result."""
        kind = rec.tombstone
        if kind is None:
            return False
        if kind == "key":
            if rec.time > self.keys.get(rec.key, -math.inf):
                self.keys[rec.key] = rec.time
        elif rec.time > self.funcs.get(rec.func, -math.inf):
            self.funcs[rec.func] = rec.time
        return True

    def update(self, other: Tombstones) -> None:
        """Take every tombstone of ``other`` (the newer time wins)."""
        for k, t in other.keys.items():
            if t > self.keys.get(k, -math.inf):
                self.keys[k] = t
        for f, t in other.funcs.items():
            if t > self.funcs.get(f, -math.inf):
                self.funcs[f] = t

    def forgets(self, rec: Record) -> bool:
        """True when a tombstone here covers result ``rec`` (never for a tombstone)."""
        if rec.tombstone is not None:
            return False
        return self.covers(rec.key, rec.func, rec.time)

    def covers(self, key: bytes, func: str, time: float) -> bool:
        """True when a record of ``key``/``func`` written at ``time`` is forgotten."""
        t = self.keys.get(key)
        if t is not None and time <= t:
            return True
        t = self.funcs.get(func)
        return t is not None and time <= t


@dataclass(frozen=True, slots=True)
class ValueRef:
    """Where a large result's encoded bytes sit in a segment (format 2).

    Loading keeps this in the table instead of the bytes; a hit reads them
    with :func:`aiomemo._checkpoint.read_value`, which checks ``digest``.

    Attributes:
        path: the segment file.
        offset: file offset of the value's first byte.
        length: how many bytes the value takes.
        digest: blake3 of the value, first 16 bytes.
        prev: an earlier reference to the same bytes (same length and
            digest) that a later copy of the record replaced, tried when
            this one does not read back: a duplicated batch whose value
            frames did not come along must not hide the intact original.
    """

    path: str
    offset: int
    length: int
    digest: bytes
    prev: ValueRef | None = None


@dataclass(slots=True)
class LoadReport:
    """What a load found: the table plus counts for ``stats()`` and warnings.

    ``table`` maps a raw key to its encoded result, or to a :class:`ValueRef`
    for a large result left on disk (format-2 segments). Expired records and
    records a tombstone forgets are not in it.

    Attributes:
        expires: raw key -> expiry for the entries of ``table`` that expire
            (those that never expire are not in it).
        expired: records left out because they had expired at load time.
        forgotten: records left out because a tombstone forgets them.
        tombstones: every tombstone the load found (newest per key / function).
        bytes_on_disk: encoded bytes of the :class:`ValueRef` s in ``table``.
        parsl_keyed: whether ``table`` holds a key made by Parsl (16 bytes,
            imported); None when the load did not look (see
            :func:`note_parsl_keys`).
    """

    table: dict[bytes, bytes | ValueRef] = field(default_factory=dict)
    records: int = 0
    skipped: int = 0  # corrupt or torn records skipped
    files: int = 0
    errors: list[str] = field(default_factory=list)  # one line per problem found
    expires: dict[bytes, float] = field(default_factory=dict)
    expired: int = 0
    forgotten: int = 0
    tombstones: Tombstones = field(default_factory=Tombstones)
    bytes_on_disk: int = 0
    parsl_keyed: bool | None = None


def note_parsl_keys(report: LoadReport) -> LoadReport:
    """Set ``report.parsl_keyed``: a scan of the keys, to call off the event loop.

    At C speed a slice at a time: one C call over millions of keys would hold
    the GIL, so the event loop, for the whole scan.
    """
    keys = iter(report.table)
    found = False
    while not found and (chunk := list(itertools.islice(keys, KEY_SLICE))):
        found = PARSL_KEY_SIZE in map(len, chunk)
    report.parsl_keyed = found
    return report


#: keys per slice in a scan of a load's keys (a few milliseconds of GIL at most)
KEY_SLICE = 16_384


#: bytes of a key made by Parsl (an md5), as ``aiomemo import-parsl`` writes it
PARSL_KEY_SIZE = 16
