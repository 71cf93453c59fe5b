"""The on-disk checkpoint log (format version 4, reads 1 to 3): framing, writer, reader, recovery.

A checkpoint directory (``<run_dir>/checkpoint/``) holds append-only *segment*
files named ``seg-<UTC time>-<pid>-<random>.amlog``. Every writer creates a
segment of its own (``O_EXCL``) and holds an exclusive ``flock`` on it while it
is open, so several processes can write one directory without ever
interleaving, and a compaction tool can tell a segment that is still in use
(``flock(LOCK_EX | LOCK_NB)`` fails) from a finished one. Names sort by the
time the segment was started; loading reads segments in name order and a
later record for a key overrides an earlier one.

Byte layout (all integers little-endian)::

    file header (16 bytes)
      0   8  magic            b"\\x89AMLOG\\r\\n"
      8   2  format version   4 (1 to 3 load forever: 3 is 4 with a record per
                                 array, 2 is 3 without expiry, 1 is 2 without
                                 value frames; a batch's payload says which
                                 layout it has, whatever the file header says)
      10  2  header size      16 (a reader skips any extra header bytes)
      12  4  header digest    blake3(bytes 0..12), first 4 bytes
    then batches and value frames, to the end of the file
      0   8  batch magic      b"\\x8dAMBTCH\\n"
      8   4  payload length   bytes
      12  4  record count
      16  16 payload digest   blake3(payload), first 16 bytes
      32  8  header digest    blake3(bytes 0..32 of this header), first 8 bytes
      40  .. payload          format 4: one flat msgpack array of 1 + stride * count
                              items: the stride (3 or 4), then each record's items;
                              formats 1-3: one msgpack array of ``count`` records
    record (format 4: ``stride`` items in a row, so it starts 0xc4, bin 8 key)
      key: bin 8 (1..255 bytes: 32 blake3, 16 imported Parsl md5)
      value: bin
      expires: float64 (0xcb; absolute unix time), only in a batch of stride 4
               (one in which some record expires or is a tombstone; stride 3
               means every record never expires)
      tail: bin holding one packed msgpack fixarray of 4 (0x94):
            func: str, time: float64 (0xcb), digests: bin,
            checksum: bin 16 (0xc4 0x10, then 16 bytes, the tail's last) =
            blake3(every byte of the record's items before the checksum's
            own 16 bytes: key, value, expires, the tail up to 0xc4 0x10)
      A loader takes keys, values and expiries as slices of the unpacked
      array and unpacks a tail only when it needs the func (tombstones,
      ``forget``, tools); the tails stay bytes otherwise.
    record (format 3: a msgpack array of 7, so it starts 0x97 0xc4: fixarray 7,
    bin 8 key; formats 1-2: the same without ``expires``, an array of 6, 0x96 0xc4)
      [key, value, func, time, digests, expires, checksum] as above, the
       checksum over every byte of the packed record before its own 16 bytes
    tombstone (format 3 on: a record whose value is 2 bytes starting 0xc1 and
    whose expires is 0.0; see :mod:`aiomemo._records`)
      value 0xc1 0x01  forget key: records of ``key`` with time <= ``time``
      value 0xc1 0x02  forget function: records whose func is ``func`` with
                       time <= ``time``; key = blake3("aiomemo forget func\0" + func)
      No encoded value starts with 0xc1 and a value reference is exactly 33
      bytes, so neither is ever taken for a value (or a value for them).
    value frame (format 2: an encoded value of LARGE_VALUE_MIN bytes or more)
      0   8  value magic      b"\\x8dAMVALU\\n"
      8   8  value length     bytes (u64)
      16  16 value digest     blake3(value), first 16 bytes
      32  8  header digest    blake3(bytes 0..32 of this header), first 8 bytes
      40  .. the value's bytes
    value reference (format 2: the value field of a record whose value is in
    a frame; 33 bytes, so a bin 8 of length 33)
      0   1  0xc1             (never the first byte of msgpack, so of no encoded value)
      1   8  back             batch offset - offset of the value's first byte
      9   8  length           the value's length
      17  16 digest           blake3(value), first 16 bytes

A writer puts the value frames of a batch right before the batch, so the
references are relative (a batch and its values move together) and a value
is on disk before any record points at it. Loading reads batch headers and
payloads only: it seeks past each value frame (its header digest checked) and
keeps a :class:`ValueRef` per large value, so load time and memory grow with
the number of records, not their bytes. :func:`read_value` reads one value
back and checks its digest; a damaged or vanished value is a
:class:`CorruptCheckpointError` there (a miss for the memo), never a wrong
value, and it costs only itself: the index around it still loads.

Expiry and tombstones at load: a record expired at load time is left out
(it is the newest for its key, so it removes an older one too); the expiry
of every other record that expires goes to :attr:`LoadReport.expires`.
Tombstones are collected while reading and applied once every segment is
read, by record time, never by segment order: a record written at or before
a tombstone's time is forgotten, one written after it is live (a second pass
over the batches that hold a tombstoned key or function; only when the load
found tombstones). ``compact`` leaves out what loading leaves out and keeps
every tombstone (the newest per key and per function).

Loading a sound batch costs one blake3 call and one ``msgpack.unpackb`` (C);
the per-record checksums are read only to recover what a damaged batch still
holds: the record walk keeps every record whose own checksum verifies and
resynchronises on the next ``0xc4`` (format 4), ``0x96 0xc4`` or ``0x97 0xc4``
after garbage (candidates are parsed by hand, every declared length checked
before anything is hashed, so garbage costs linear time), and the batch walk
resynchronises on the next batch magic (or value frame) whose header digest
verifies. A damaged *file* header is read on (each batch's payload says its
own layout, every batch carries its own digests, and every value
reference is checked against its value); only a sound header of another version
stops the reader. Loading never raises and never yields a value that was not
written for its key; every problem becomes one line in
:attr:`LoadReport.errors`.

Crash safety: a writer appends whole batches (``write`` loop, then ``fsync``
when asked); a crash mid-batch leaves a torn tail that the reader reports and
skips, keeping every complete record before it. A failed write is cut back
(``ftruncate``) to the last complete batch, a failed ``fsync`` abandons the
segment, so a retried batch is never half-present twice.

Parsl's pickled ``tasks.pkl`` is never loaded here (unpickling runs code);
``aiomemo import-parsl --trust`` converts it.

Layering: this module (with :mod:`aiomemo._records`, :mod:`aiomemo._paths`
and :mod:`aiomemo._maintenance`) is the format layer; it imports nothing from
the stores, the Memoizer or the CLI above it. Segment names, path resolution
and opening a segment for reading live in :mod:`aiomemo._paths`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import io
import itertools
import math
import operator
import os
import re
import struct
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, NoReturn, TypeVar

import msgpack
from blake3 import blake3

from aiomemo import _records
from aiomemo._exceptions import CheckpointError, CorruptCheckpointError
from aiomemo._paths import (
    FILE_MAGIC,
    SEGMENT_SUFFIX,
    list_segments,
    open_fd,
    open_segment,
    resolve,
    segment_name,
    segment_stamp,
)
from aiomemo._records import (
    FORGET_FUNC,
    FORGET_KEY,
    TOMBSTONE_EXPIRES,
    LoadReport,
    Record,
    ValueRef,
)
from aiomemo._rundir import ensure_dir

__all__ = [
    "BATCH_HEADER_SIZE",
    "BATCH_MAGIC",
    "FILE_HEADER_SIZE",
    "FILE_MAGIC",
    "FORMAT_VERSION",
    "SEGMENT_SUFFIX",
    "BadSpan",
    "RecordInfo",
    "SegmentHeader",
    "SegmentWriter",
    "ValueRef",
    "encode_batch",
    "file_header",
    "fsync_dir",
    "is_segment_in_use",
    "iter_segment",
    "keys_of_funcs",
    "list_segments",
    "load_paths",
    "read_segment_header",
    "read_value",
    "read_value_with",
    "segment_stamp",
]

FORMAT_VERSION: Final = 4
#: the versions this reader loads (1: no value frames; 2: no expiry, no tombstones)
READ_VERSIONS: Final = frozenset({1, 2, 3, 4})
FILE_HEADER_SIZE: Final = 16
_FILE_HEADER = struct.Struct("<8sHH")  # the 12 bytes the file header digest covers

BATCH_MAGIC: Final = b"\x8dAMBTCH\n"
BATCH_HEADER_SIZE: Final = 40
_BATCH_FIXED = struct.Struct("<8sII16s")  # the 32 bytes the header digest covers
_PAYLOAD_DIGEST_SIZE: Final = 16
_HEADER_DIGEST_SIZE: Final = 8

VALUE_MAGIC: Final = b"\x8dAMVALU\n"
VALUE_HEADER_SIZE: Final = 40
_VALUE_FIXED = struct.Struct("<8sQ16s")  # the 32 bytes the value header digest covers
_VALUE_DIGEST_SIZE: Final = 16
#: an encoded value this long or longer goes to a value frame of its own. Below
#: it, holding the bytes in the index (~16 KiB at most per record) is cheaper
#: than the worker-thread read a hit on disk costs (~90 µs hop + read + hash);
#: above it, the bytes a load would hold grow faster than the index does.
LARGE_VALUE_MIN: Final = 16 * 1024
_REF = struct.Struct("<BQQ16s")
REF_SIZE: Final = _REF.size  # 33
_REF_TAG: Final = 0xC1  # never the first byte of any msgpack object

RECORD_CHECKSUM_SIZE: Final = 16
# Every record starts with one of these two-byte pairs: fixarray of 6 (formats
# 1-2) or of 7 (format 3), then the key as bin 8.
_RECORD_STARTS: Final = re.compile(b"[\x96\x97]\xc4|\xc4")
_INF: Final = math.inf
#: the expiries of a batch in which nothing expires
_NEVER: Final = frozenset({math.inf})
MAX_KEY_SIZE: Final = 255
_CHECKSUM_BIN_HEADER: Final = b"\xc4\x10"  # msgpack bin 8, length 16
_ZERO_CHECKSUM: Final = bytes(RECORD_CHECKSUM_SIZE)

#: a batch's payload is kept below this so its length fits the u32 field with
#: room to spare and a damaged batch costs a bounded amount of re-reading
MAX_BATCH_PAYLOAD: Final = 256 * 1024 * 1024
_MAX_PAYLOAD_FIELD: Final = 0xFFFF_FFFF
#: encode_batch runs on the event loop only below this many value bytes
_INLINE_ENCODE_LIMIT: Final = 256 * 1024
_INLINE_ENCODE_RECORDS: Final = 512
#: larger batches of small values are packed on the loop in slices of this many
#: records (or value bytes), yielding between slices: a worker thread would
#: hold the GIL for whole switch intervals (5 ms) and stall the loop
_ENCODE_SLICE_RECORDS: Final = 64
_ENCODE_SLICE_BYTES: Final = 64 * 1024
#: ... up to this many value bytes; beyond, framing (one hash of the whole
#: payload) would itself stall the loop, so the batch goes to a worker thread
_SLICED_ENCODE_LIMIT: Final = 4 * 1024 * 1024
_READ_BUFFER: Final = 1024 * 1024
_SCAN_CHUNK: Final = 1024 * 1024
#: the loader's read after skipping a value frame: a batch or two, not the next value
_SMALL_READ: Final = 64 * 1024

_T = TypeVar("_T")
_get_key = operator.itemgetter(0)
_get_value = operator.itemgetter(1)
_get_func = operator.itemgetter(2)
_get_expires = operator.itemgetter(5)


# --------------------------------------------------------------------------
# What the reader yields (for tools: inspect, verify, compact)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """A segment's file header.

    Attributes:
        version: the format version (1).
        header_size: bytes before the first batch.
    """

    version: int
    header_size: int


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """One record read from a segment, with where it sits.

    Attributes:
        record: the record (key, value, func, time, digests).
        offset: file offset of the record's first byte.
        length: bytes the packed record takes (checksum included).
        batch_offset: file offset of the batch header the record belongs to
            (for a record recovered from a region with no trustworthy header,
            the offset where that damaged region starts).
        recovered: False when the record came out of a sound batch (its batch
            digest verified); True when it was recovered one by one from a
            damaged batch on the strength of its own checksum.
        ref: for a value kept in a value frame (format 2), where it sits;
            ``record.value`` then holds the value read back and verified, or
            ``b""`` when the reader was asked not to read values.
    """

    record: Record
    offset: int
    length: int
    batch_offset: int
    recovered: bool = False
    ref: ValueRef | None = None


@dataclass(frozen=True, slots=True)
class BadSpan:
    """A stretch of a segment that holds no usable record.

    Attributes:
        offset: file offset of the first bad byte.
        length: how many bytes are bad (to the end of the file for a torn tail).
        reason: one human-readable line.
        lost: records known to be lost in it: the count a trustworthy batch
            header promised minus those recovered, or 1 for a damaged stretch
            no header vouches for (best effort; 0 when the damage lost nothing,
            e.g. a flipped byte in a batch header whose records all verified).
        torn: True when the span runs to the end of the file (an interrupted
            write, or a file cut short).
    """

    offset: int
    length: int
    reason: str
    lost: int = 0
    torn: bool = False


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _record_bytes(
    packer: msgpack.Packer,
    rec: Record,
    ref: bytes | None = None,
    version: int = FORMAT_VERSION,
    expiry: bool = False,
) -> bytes:
    """One packed record (its checksum included) as format ``version`` lays it out.

    Format 4: ``expiry`` is the batch's layout (records carry their expiry,
    see the module docstring); without it a record that expires is a
    ``ValueError`` (a caller's bug: :func:`_encode` picks the layout).
    """
    key, value, digests, func, expires = rec.key, rec.value, rec.digests, rec.func, rec.expires
    if (
        ref is None
        and version >= 3
        and type(key) is bytes
        and type(value) is bytes
        and type(digests) is bytes
        and type(func) is str
        and type(expires) is float
        and 0 < len(key) <= MAX_KEY_SIZE
        and expires == expires
        and (expiry or version < 4 or expires == _INF)
    ):
        # the common record (what RecordMaker makes), checked in one go
        body: bytes
        if version >= 4:
            tail = packer.pack((func, float(rec.time), digests, _ZERO_CHECKSUM))
            body = packer.pack((key, value, expires, tail) if expiry else (key, value, tail))
            signed = body[1:-RECORD_CHECKSUM_SIZE]  # without the fixarray header
        else:
            body = packer.pack(
                (key, value, func, float(rec.time), digests, expires, _ZERO_CHECKSUM)
            )
            signed = body[:-RECORD_CHECKSUM_SIZE]
        return signed + blake3(signed).digest(RECORD_CHECKSUM_SIZE)
    # Exact types only: what the reader gets back must equal what was given, and
    # a subclass (or a bytearray) would pack the same but mislead the caller.
    if type(key) is not bytes:
        raise TypeError(f"Record.key must be bytes, not {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY_SIZE:
        raise ValueError(f"Record.key must be 1 to {MAX_KEY_SIZE} bytes, not {len(key)}")
    if type(value) is not bytes:
        raise TypeError(f"Record.value must be bytes, not {type(value).__name__}")
    if type(digests) is not bytes:
        raise TypeError(f"Record.digests must be bytes, not {type(digests).__name__}")
    if type(func) is not str:
        raise TypeError(f"Record.func must be str, not {type(func).__name__}")
    if type(expires) not in (float, int) or expires != expires:
        raise ValueError(f"Record.expires must be a number of seconds, not {expires!r}")
    if ref is not None:
        value = ref
    fields: tuple[Any, ...]
    if version >= 4:
        if not expiry and expires != _INF:
            raise ValueError("a record that expires in a batch laid out without expiries")
        tail = packer.pack((func, float(rec.time), digests, _ZERO_CHECKSUM))
        fields = (key, value, float(expires), tail) if expiry else (key, value, tail)
        view = memoryview(packer.pack(fields))[1:-RECORD_CHECKSUM_SIZE]
    else:
        if version == 3:
            fields = (key, value, func, float(rec.time), digests, float(expires), _ZERO_CHECKSUM)
        elif expires != _INF or rec.tombstone is not None:
            raise ValueError(f"format {version} has no expiry or tombstones (format 3 has)")
        else:
            fields = (key, value, func, float(rec.time), digests, _ZERO_CHECKSUM)
        view = memoryview(packer.pack(fields))[:-RECORD_CHECKSUM_SIZE]
    return b"".join((view, blake3(view).digest(RECORD_CHECKSUM_SIZE)))


def _frame(packer: msgpack.Packer, parts: list[bytes], stride: int | None = None) -> bytes:
    """``parts`` (packed records) as one batch; ``stride``: format 4's items per record."""
    if stride is None:
        head = packer.pack_array_header(len(parts))
    else:
        head = packer.pack_array_header(1 + stride * len(parts)) + bytes((stride,))
    payload = b"".join([head, *parts])
    if len(payload) > _MAX_PAYLOAD_FIELD:
        raise ValueError(f"a record of {len(payload)} bytes is too large for one batch")
    fixed = _BATCH_FIXED.pack(
        BATCH_MAGIC, len(payload), len(parts), blake3(payload).digest(_PAYLOAD_DIGEST_SIZE)
    )
    return b"".join((fixed, blake3(fixed).digest(_HEADER_DIGEST_SIZE), payload))


def _stride(records: Sequence[Record], version: int) -> int | None:
    """Format 4's items per record for a batch of ``records`` (None before format 4).

    3 (key, value, tail) when no record expires (nor is a tombstone, which
    expires at 0.0); 4 (key, value, expires, tail) otherwise.
    """
    if version < 4:
        return None
    return 4 if any(rec.expires != _INF for rec in records) else 3


def encode_batch(
    records: Sequence[Record], *, large_values: bool = True, version: int = FORMAT_VERSION
) -> bytes:
    """Frame ``records`` as they go to disk: one batch (several when very large).

    Values of :data:`LARGE_VALUE_MIN` bytes or more go to value frames right
    before their batch (format 2 on); ``large_values=False`` keeps every value
    inline (what format 1 holds). ``version`` below 3 writes the 6-field
    records of formats 1-2 (for tests of old files; a record that expires or
    a tombstone is then a ``ValueError``). The bytes are position-independent: they
    may be appended at any offset. Pure and thread-safe, so callers may run
    it in a worker thread for large values. Raises ``TypeError`` for a record
    whose fields have the wrong types and ``ValueError`` for a single inline
    record too large for a batch (4 GiB). Returns ``b""`` for no records.
    """
    return _encode(records, large_values=large_values, version=version)[0]


#: (key, offset of the value relative to the encoded bytes, length, digest)
_Located = list[tuple[bytes, int, int, bytes]]


def _encode(
    records: Sequence[Record], *, large_values: bool = True, version: int = FORMAT_VERSION
) -> tuple[bytes, _Located]:
    """:func:`encode_batch`, plus where each framed value sits in the bytes.

    ``large_values=False`` also when the caller knows none is large.
    """
    packer = msgpack.Packer(use_bin_type=True)  # one per call: Packer is not thread-safe
    located: _Located = []
    if not large_values or not any(_is_large(rec.value) for rec in records):
        stride = _stride(records, version)
        expiry = stride == 4
        raws = [_record_bytes(packer, rec, None, version, expiry) for rec in records]
        return _frame_all(packer, raws, stride), located
    out: list[bytes] = []
    pos = 0
    group: list[Record] = []
    size = 0
    for rec in records:
        est = (REF_SIZE if _is_large(rec.value) else len(rec.value)) + len(rec.key) + 64
        est += len(rec.digests) + 4 * len(rec.func)
        if group and size + est > MAX_BATCH_PAYLOAD:
            pos = _frame_group(packer, group, out, pos, located, version)
            group, size = [], 0
        group.append(rec)
        size += est
    _frame_group(packer, group, out, pos, located, version)
    return b"".join(out), located


async def _encode_sliced(records: Sequence[Record]) -> bytes:
    """:func:`encode_batch` of records without large values, on the running loop.

    The same bytes (same records, same framing); the packing yields to the
    loop after every slice of :data:`_ENCODE_SLICE_RECORDS` records or
    :data:`_ENCODE_SLICE_BYTES` value bytes (~0.15 ms each here).
    """
    packer = msgpack.Packer(use_bin_type=True)  # ours alone: no other caller packs with it
    raws: list[bytes] = []
    count = size = 0
    stride = _stride(records, FORMAT_VERSION)
    expiry = stride == 4
    for rec in records:
        raws.append(_record_bytes(packer, rec, None, FORMAT_VERSION, expiry))
        count += 1
        size += len(rec.value)
        if count >= _ENCODE_SLICE_RECORDS or size >= _ENCODE_SLICE_BYTES:
            await asyncio.sleep(0)
            count = size = 0
    return _frame_all(packer, raws, stride)


def _is_large(value: object) -> bool:
    return type(value) is bytes and len(value) >= LARGE_VALUE_MIN


def _frame_group(
    packer: msgpack.Packer,
    group: list[Record],
    out: list[bytes],
    pos: int,
    located: _Located,
    version: int = FORMAT_VERSION,
) -> int:
    """Append ``group``'s value frames, then its batch, to ``out``; return the new end."""
    where: dict[int, tuple[int, bytes]] = {}
    for i, rec in enumerate(group):
        value = rec.value
        if _is_large(value):
            digest = blake3(value).digest(_VALUE_DIGEST_SIZE)
            fixed = _VALUE_FIXED.pack(VALUE_MAGIC, len(value), digest)
            out += (fixed, blake3(fixed).digest(_HEADER_DIGEST_SIZE), value)
            where[i] = (pos + VALUE_HEADER_SIZE, digest)
            located.append((rec.key, pos + VALUE_HEADER_SIZE, len(value), digest))
            pos += VALUE_HEADER_SIZE + len(value)
    batch_at = pos
    raws = []
    stride = _stride(group, version)
    for i, rec in enumerate(group):
        ref = None
        if i in where:
            at, digest = where[i]
            ref = _REF.pack(_REF_TAG, batch_at - at, len(rec.value), digest)
        raws.append(_record_bytes(packer, rec, ref, version, stride == 4))
    frame = _frame(packer, raws, stride)
    out.append(frame)
    return pos + len(frame)


def _frame_all(packer: msgpack.Packer, raws: list[bytes], stride: int | None) -> bytes:
    """Packed records framed as batches, a new batch whenever one would pass the limit."""
    out: list[bytes] = []
    parts: list[bytes] = []
    size = 0
    for raw in raws:
        if parts and size + len(raw) > MAX_BATCH_PAYLOAD:
            out.append(_frame(packer, parts, stride))
            parts, size = [], 0
        parts.append(raw)
        size += len(raw)
    if parts:
        out.append(_frame(packer, parts, stride))
    return b"".join(out)


def file_header(version: int = FORMAT_VERSION) -> bytes:
    """The 16-byte file header every segment starts with (``version`` for tests of old files)."""
    fixed = _FILE_HEADER.pack(FILE_MAGIC, version, FILE_HEADER_SIZE)
    return fixed + blake3(fixed).digest(4)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """fsync directory ``path`` (its entries become durable); raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_exclusive(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        # Some network file systems have no flock. The segment is still ours
        # alone (O_EXCL, unique name); only the "in use" hint for tools is lost.
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


class SegmentWriter:
    """Appends batches of records to a segment file of its own.

    Create with ``await SegmentWriter.create(directory)``: nothing touches the
    disk until the first write, which creates the directory (and parents) and
    a new segment (``O_EXCL``, exclusively ``flock``-ed for as long as the
    writer keeps it open). The file work is synchronous under a thread lock,
    so a writer is safe to use from any thread: the ``async`` methods run it
    in a worker thread (the event loop never blocks on the disk), and
    :meth:`write_records_blocking` runs it in the calling thread (an engine's
    own thread, never the loop's). Writes are serialised by that lock; a
    cancelled ``async`` call finishes its write in the background before the
    next one starts, so the file is never left in an unknown state.

    When a write fails, it raises :class:`CheckpointError` (``unsaved`` = the
    batch's record count, chained from the ``OSError``) after cutting the
    segment back to its last complete batch (or, when even that fails, or
    when ``fsync`` failed, abandoning the segment: the next write starts a
    fresh one). Retrying the same records is therefore always correct.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Prefer :meth:`create`; this does no I/O either."""
        self._dir = Path(directory)
        self._fd: int | None = None  # the open segment (unbuffered: plain os.write)
        self._path: Path | None = None
        self._offset = 0  # end of the last complete batch
        # guards the file and everything below: held for a whole write (and fsync)
        self._lock = threading.Lock()
        self._closed = False
        self._synced_dirs = False
        self._created_dirs: list[Path] = []
        self._stamp: str | None = None
        self._refs: dict[bytes, ValueRef] = {}
        #: remember where large values went, for :meth:`take_refs`
        self.collect_refs = False
        self.batches_written = 0
        self.records_written = 0
        self.bytes_written = 0

    @classmethod
    async def create(
        cls, directory: str | os.PathLike[str], *, lazy: bool = True, stamp: str | None = None
    ) -> SegmentWriter:
        """A writer for ``directory``; with ``lazy=False`` the segment is created now.

        ``stamp`` replaces the UTC time at the front of the segment's name (see
        :func:`segment_stamp`; no ``-`` in it). Raises :class:`CheckpointError`
        (from the ``OSError``) when ``lazy=False`` and the directory or segment
        cannot be created.
        """
        if stamp is not None and (not stamp or "-" in stamp or "/" in stamp):
            raise ValueError(f"bad segment stamp {stamp!r}")
        self = cls(directory)
        self._stamp = stamp
        if not lazy:
            await _in_thread(self._open_now)
        return self

    @property
    def directory(self) -> Path:
        """The checkpoint directory this writer writes to."""
        return self._dir

    @property
    def path(self) -> Path | None:
        """The current segment file, or None before the first write."""
        return self._path

    @property
    def offset(self) -> int:
        """Bytes of the current segment that hold complete batches."""
        return self._offset

    def _open_now(self) -> None:
        with self._lock:
            if self._fd is None:
                self._open_or_raise(0)

    def _open_or_raise(self, count: int) -> None:
        """:meth:`_open`, its OSError as a CheckpointError (``unsaved=count``); locked."""
        try:
            self._open()
        except OSError as exc:
            raise CheckpointError(
                f"could not create a checkpoint segment in {self._dir}: {exc}", unsaved=count
            ) from exc

    def _open(self) -> None:
        created = ensure_dir(self._dir)
        self._created_dirs.extend(created)
        for _ in range(5):
            name = segment_name(self._stamp)
            tmp = self._dir / f".{name}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - five random 32-bit collisions in a row
            raise FileExistsError(errno.EEXIST, "could not pick a fresh segment name", str(tmp))
        try:
            # Lock before the file gets its real name: a compaction tool that
            # sees a ``seg-*.amlog`` name can trust ``flock`` to say it is live.
            _lock_exclusive(fd)
            _write_then_sync(fd, file_header(), False)
            final = self._dir / name
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd, self._path, self._offset = fd, final, FILE_HEADER_SIZE
        self._synced_dirs = False

    def _abandon(self) -> None:
        fd, self._fd, self._path = self._fd, None, None
        self._offset = 0
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the flock; the segment stays readable

    def _roll_back(self, offset: int, *, abandon: bool) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except OSError:
            abandon = True
        if abandon:
            self._abandon()

    async def write_batch(self, records: Sequence[Record], *, fsync: bool) -> int:
        """Append ``records`` as one batch; return the bytes written.

        With ``fsync=True`` the batch is durable when this returns (the file is
        fsynced, and the directory entry too the first time). Raises
        :class:`CheckpointError` (``unsaved=len(records)``) when the write
        fails; the segment is left so that retrying the same records is correct.
        Raises ``TypeError``/``ValueError`` for malformed records (see
        :func:`encode_batch`). No records: returns 0 and does nothing.
        """
        if not records:
            return 0
        # Small batches are cheaper to encode here than a thread hop (~90 µs);
        # many small records are packed here in slices (the loop runs between
        # them); large values, or many bytes in all, go to a worker thread.
        total = sum(len(r.value) for r in records)
        if total <= _INLINE_ENCODE_LIMIT and len(records) <= _INLINE_ENCODE_RECORDS:
            # values adding up to less than one large value: none is large
            data, located = _encode(records, large_values=total >= LARGE_VALUE_MIN)
        elif total <= _SLICED_ENCODE_LIMIT and not any(_is_large(r.value) for r in records):
            data, located = await _encode_sliced(records), []
        else:
            data, located = await asyncio.to_thread(_encode, records)
        if not data:
            return 0
        await _in_thread(self._write, data, len(records), fsync, located)
        return len(data)

    def write_records_blocking(self, records: Sequence[Record], *, fsync: bool) -> int:
        """:meth:`write_batch` in the calling thread (never the event loop's: it blocks).

        For engines that complete tasks on threads of their own: the thread
        that waits for its records to be durable writes them itself.
        """
        if not records:
            return 0
        data, located = _encode(records)
        if data:
            # one system call for the write and its sync where the kernel has
            # it: each call that gives the GIL away costs a busy process a wait
            self._write(data, len(records), fsync, located, append=_append_synced)
        return len(data)

    def take_refs(self) -> dict[bytes, ValueRef]:
        """Where the large values written since the last call now sit (key -> ref); clears."""
        with self._lock:
            refs, self._refs = self._refs, {}
        return refs

    async def write_encoded(self, data: bytes, count: int, *, fsync: bool) -> int:
        """Append bytes made by :func:`encode_batch` (``count`` records); see :meth:`write_batch`."""
        if not data:
            return 0
        await _in_thread(self._write, data, count, fsync, [])
        return len(data)

    def _write(
        self,
        data: bytes,
        count: int,
        fsync: bool,
        located: _Located,
        *,
        append: Callable[[int, bytes], None] | None = None,
    ) -> None:
        """Append ``data`` (``count`` records) under the lock; blocking.

        ``append(fd, data)``, when given, writes and syncs in one go (with
        ``fsync``); its OSError counts as a failed fsync.
        """
        with self._lock:
            if self._closed:
                raise CheckpointError(f"segment writer for {self._dir} is closed", unsaved=count)
            if self._fd is None:
                self._open_or_raise(count)
            fd = self._fd
            assert fd is not None
            start = self._offset
            path = self._path
            try:
                if append is not None and fsync:
                    try:
                        append(fd, data)
                    except OSError as exc:
                        # written or not, durable or not: nobody can tell
                        raise _FsyncFailed() from exc
                else:
                    _write_then_sync(fd, data, fsync)
            except _FsyncFailed as exc:
                # After a failed fsync the kernel may have dropped dirty pages
                # and a later fsync can "succeed" without them: never trust
                # this segment again.
                self._roll_back(start, abandon=True)
                raise CheckpointError(
                    f"could not fsync {count} records to {path}: {exc.__cause__}", unsaved=count
                ) from exc.__cause__
            except OSError as exc:
                self._roll_back(start, abandon=False)
                raise CheckpointError(
                    f"could not write {count} records to {path}: {exc}", unsaved=count
                ) from exc
            if fsync and not self._synced_dirs:
                try:
                    self._sync_dirs()
                    self._synced_dirs = True
                except OSError as exc:
                    self._roll_back(start, abandon=True)
                    raise CheckpointError(
                        f"could not fsync {count} records to {path}: {exc}", unsaved=count
                    ) from exc
            self._offset = start + len(data)
            self.batches_written += 1
            self.records_written += count
            self.bytes_written += len(data)
            if located and path is not None and self.collect_refs:
                where = os.fspath(path)
                for key, rel, length, digest in located:
                    self._refs[key] = ValueRef(where, start + rel, length, digest)

    def _sync_dirs(self) -> None:
        # The segment's directory entry, and the entries of every directory we
        # created on the way (each lives in its parent).
        fsync_dir(self._dir)
        for d in self._created_dirs:
            fsync_dir(d.parent)
        self._created_dirs.clear()

    async def sync(self) -> None:
        """fsync the current segment (for callers that wrote with ``fsync=False``)."""
        await _in_thread(self._sync)

    def _sync(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                os.fsync(self._fd)
                if not self._synced_dirs:
                    self._sync_dirs()
                    self._synced_dirs = True
            except OSError as exc:
                self._roll_back(self._offset, abandon=True)
                raise CheckpointError(f"could not fsync {self._dir}: {exc}") from exc

    async def close(self) -> None:
        """Close the segment (releasing its lock). Idempotent; later writes raise."""
        await _in_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    os.close(fd)
                except OSError as exc:  # e.g. NFS reporting a deferred write error
                    raise CheckpointError(f"error closing {self._path}: {exc}") from exc


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a worker thread; a cancelled caller leaves it to finish there."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        # Shielded: if our caller is cancelled, the write still completes (or
        # rolls back) under the writer's lock before anything else touches the file.
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_consume_result)
        raise


class _FsyncFailed(Exception):
    """Internal: the write went through, its fsync did not (the OSError is the cause)."""


#: the one place bytes reach a segment (tests inject faults here)
_os_write = os.write


def _write_then_sync(fd: int, data: bytes, fsync: bool) -> None:
    # The file is unbuffered: a write may be short (e.g. just before ENOSPC),
    # so loop; there is no hidden buffer that could later flush stale bytes.
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = _os_write(fd, view[done:])
        if not n:
            raise OSError(errno.EIO, "write wrote nothing")
        done += n
    if fsync:
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _FsyncFailed() from exc


#: pwritev2 flags that append and sync in one call (Linux 4.16+), until refused
_APPEND_DSYNC: int | None = (
    os.RWF_APPEND | os.RWF_DSYNC
    if hasattr(os, "pwritev") and hasattr(os, "RWF_APPEND") and hasattr(os, "RWF_DSYNC")
    else None
)


def _append_synced_now(fd: int, data: bytes) -> None:
    """Append ``data`` at the end of ``fd`` and make it durable before returning.

    One ``pwritev2(RWF_APPEND | RWF_DSYNC)`` per (rare) short write: the
    bytes and the file size that reaches them are on disk when it returns
    (``fdatasync``'s guarantee, per write); the file offset moves to the end
    as with ``os.write``. Where the kernel or file system refuses the flags,
    ``os.write`` + ``os.fsync`` from then on.
    """
    global _APPEND_DSYNC
    flags = _APPEND_DSYNC
    view = memoryview(data)
    done = 0
    while flags is not None and done < len(view):
        try:
            n = os.pwritev(fd, [view[done:]], -1, flags)
        except OSError as exc:
            if done or exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            _APPEND_DSYNC = flags = None  # not here: the two-call way
            break
        if not n:
            raise OSError(errno.EIO, "write wrote nothing")
        done += n
    if flags is None:
        try:
            _write_then_sync(fd, bytes(view[done:]), True)
        except _FsyncFailed as exc:
            raise exc.__cause__ from None  # type: ignore[misc]


#: the one place an engine thread's batch reaches a segment, synced (tests inject faults here)
_append_synced = _append_synced_now


def _consume_result(task: asyncio.Future[Any]) -> None:
    # The caller was cancelled and will never see this result: retrieve it so
    # asyncio does not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def read_segment_header(path: str | os.PathLike[str]) -> SegmentHeader:
    """The file header of segment ``path``.

    Raises :class:`~aiomemo.CorruptCheckpointError` when the header is damaged,
    cut short, of another format version or not an aiomemo header at all, and
    ``OSError`` when the file cannot be read.
    """
    with open_segment(path) as f:
        raw = f.read(FILE_HEADER_SIZE)
    header, problem = _parse_file_header(raw)
    if header is None or problem:
        raise CorruptCheckpointError(f"{os.fspath(path)}: {problem or 'bad file header'}")
    return header


def _parse_file_header(raw: bytes) -> tuple[SegmentHeader | None, str]:
    """The header and a problem ("" when none).

    ``(None, why)``: stop, nothing to read (cut short, or a sound header of
    another format version). ``(header, why)``: a damaged header, read the rest
    as format 1 anyway (every batch carries its own digests, so nothing wrong
    can come of it, and a flipped byte here must not cost the whole file).
    """
    if len(raw) < FILE_HEADER_SIZE:
        return None, f"torn tail: file header cut short ({len(raw)} of {FILE_HEADER_SIZE} bytes)"
    magic, version, size = _FILE_HEADER.unpack_from(raw)
    sound = blake3(raw[:12]).digest(4) == raw[12:16]
    if sound and magic == FILE_MAGIC:
        if version not in READ_VERSIONS:
            return None, (
                f"unsupported checkpoint format version {version} "
                f"(this reader loads versions {', '.join(map(str, sorted(READ_VERSIONS)))})"
            )
        if size >= FILE_HEADER_SIZE:
            return SegmentHeader(version, size), ""
    why = "damaged file header" if magic == FILE_MAGIC else "bad magic: not an aiomemo segment?"
    return SegmentHeader(FORMAT_VERSION, FILE_HEADER_SIZE), f"{why} (reading on)"


def is_segment_in_use(path: str | os.PathLike[str]) -> bool:
    """True when a writer holds segment ``path`` open (its ``flock`` is taken).

    A compaction tool must leave such a segment alone. False for a missing
    file and for anything that is not a regular file.
    """
    try:
        fd = open_fd(path)  # never blocks on a FIFO
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class _Source:
    """Random-ish access to a segment through a buffered reader (bounded memory)."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self.f = f
        self.size = size

    def read(self, offset: int, n: int) -> bytes:
        # BufferedReader.seek within its buffer is free, so sequential use of
        # read(offset, n) costs no extra syscalls.
        self.f.seek(offset)
        return self.f.read(max(0, min(n, self.size - offset)))

    def next_header(self, start: int) -> int:
        """Offset of the next batch or value header at or after ``start`` that verifies; size if none."""
        pos = start
        keep = BATCH_HEADER_SIZE - 1
        while pos < self.size:
            chunk = self.read(pos, _SCAN_CHUNK + keep)
            for i in _frame_starts(chunk):
                if i + BATCH_HEADER_SIZE > len(chunk):
                    if pos + len(chunk) >= self.size:
                        return self.size  # a magic too close to the end: no header
                    break  # re-read it from the next window
                if _frame_ok(chunk[i : i + BATCH_HEADER_SIZE]):
                    return pos + i
            if pos + len(chunk) >= self.size:
                return self.size
            pos += max(1, len(chunk) - keep)
        return self.size


def _header_ok(raw: bytes) -> bool:
    return (
        len(raw) >= BATCH_HEADER_SIZE
        and raw[:8] == BATCH_MAGIC
        and blake3(raw[:32]).digest(_HEADER_DIGEST_SIZE) == raw[32:40]
    )


def _value_header(raw: bytes | memoryview) -> int:
    """The length a sound value-frame header declares, or -1."""
    if len(raw) < VALUE_HEADER_SIZE or bytes(raw[:8]) != VALUE_MAGIC:
        return -1
    if blake3(raw[:32]).digest(_HEADER_DIGEST_SIZE) != bytes(raw[32:40]):
        return -1
    length: int = _VALUE_FIXED.unpack_from(raw)[1]
    return length


def _frame_ok(raw: bytes) -> bool:
    return _header_ok(raw) or _value_header(raw) >= 0


def _frame_starts(data: bytes) -> Iterator[int]:
    """Offsets of every batch or value magic in ``data``, in order (linear time overall)."""
    a = data.find(BATCH_MAGIC)
    b = data.find(VALUE_MAGIC)
    while a != -1 or b != -1:
        if b == -1 or (a != -1 and a < b):
            yield a
            a = data.find(BATCH_MAGIC, a + 1)
        else:
            yield b
            b = data.find(VALUE_MAGIC, b + 1)


def _header_within(src: _Source, start: int, end: int) -> int:
    """Offset of the first sound batch or value header that starts in ``[start, end)``, or -1."""
    window = src.read(start, end - start + BATCH_HEADER_SIZE - 1)
    for i in _frame_starts(window):
        if start + i >= end:
            break
        if _frame_ok(window[i : i + BATCH_HEADER_SIZE]):
            return start + i
    return -1


def _as_ref(value: bytes, path: str, batch_offset: int) -> ValueRef | None:
    """The :class:`ValueRef` a format-2 value field holds, or None when it holds the value."""
    if len(value) != REF_SIZE or value[0] != _REF_TAG:
        return None
    _, back, length, digest = _REF.unpack(value)
    next(_refs_made)
    # a reference pointing before the file (damage moved its batch): it stays
    # a reference, one that never reads back (a miss), never a value
    return ValueRef(path, batch_offset - back if back <= batch_offset else -1, length, digest)


def _read_exact(read: Any, ref: ValueRef) -> bytes:
    where = f"{ref.path}: value at offset {ref.offset} ({ref.length} bytes)"
    if ref.offset < 0:
        raise CorruptCheckpointError(f"{where}: a reference to before the file (damaged)")
    data: bytes = read(ref.offset, ref.length)
    if len(data) != ref.length:
        raise CorruptCheckpointError(f"{where}: cut short ({len(data)} bytes left)")
    if blake3(data).digest(_VALUE_DIGEST_SIZE) != ref.digest:
        raise CorruptCheckpointError(f"{where}: checksum mismatch")
    return data


def read_value(ref: ValueRef) -> bytes:
    """The value ``ref`` points at, its digest verified (blocking: call it in a worker thread).

    Raises :class:`~aiomemo.CorruptCheckpointError` naming the segment and
    offset when the value is cut short, fails its checksum, or cannot be read
    (the file was deleted or compacted meanwhile: the ``OSError`` is chained).
    An earlier copy of the same bytes (``ref.prev``) is tried before giving up.
    """
    return _first_readable(ref, lambda r: bytes(_read_checked(r, bytearray)))


def _first_readable(ref: ValueRef, read: Callable[[ValueRef], _T]) -> _T:
    """``read(ref)``, else ``read`` of the earlier copies ``ref.prev`` ...; the first error if none reads."""
    try:
        return read(ref)
    except CorruptCheckpointError as first:
        r = ref.prev
        while r is not None:
            try:
                return read(r)
            except CorruptCheckpointError:
                r = r.prev
        raise first


#: one read buffer, shared by the worker threads that read values (one at a
#: time; the others make their own), so a run of hits on large values does not
#: fault fresh pages in for every read and a pool of threads does not keep a
#: buffer each
_KEEP_BUFFER: Final = 64 * 1024 * 1024
_buffer_lock = threading.Lock()
_buffer = bytearray()


#: ``direct(head, length)`` for :func:`read_value_with`: where a value's raw
#: contents start, the object they fill and its writable view (None: the
#: contents as one bytes object are the result), or None to decode it whole
Direct = Callable[[bytes, int], "tuple[int, object, memoryview | None] | None"]
#: how many leading bytes of a value a :data:`Direct` planner is shown
DIRECT_HEAD: Final = 1024


def read_value_with(
    ref: ValueRef, use: Callable[[memoryview], _T], direct: Direct | None = None
) -> _T | object:
    """``use(value)`` for the value ``ref`` points at, verified as :func:`read_value` does.

    The view is valid only during the call (it may be a reused buffer), so
    ``use`` must copy what it keeps (decoding does). With ``direct``, a
    value it recognizes (a flat result: bytes, bytearray, numpy array) is
    read straight into its result object, which is returned as is (``use``
    is not called): one pass from the page cache into the result, no buffer
    and no decode copy in between. Earlier copies (``ref.prev``) are tried
    before giving up. Blocking: a worker thread's job.
    """
    return _first_readable(ref, lambda r: _read_with(r, use, direct))


def _read_with(ref: ValueRef, use: Callable[[memoryview], _T], direct: Direct | None) -> _T | object:
    if direct is not None:
        with _open_value(ref) as fd:
            head = _pread_exact(fd, ref, 0, min(DIRECT_HEAD, ref.length))
            plan = direct(head, ref.length)
            if plan is not None:
                return _read_into(fd, ref, head, plan)
    global _buffer
    if ref.length <= _KEEP_BUFFER and _buffer_lock.acquire(blocking=False):
        try:

            def shared(n: int) -> bytearray:
                global _buffer
                if len(_buffer) < n:
                    _buffer = bytearray(max(n, 1 << 20))
                return _buffer

            view = _read_checked(ref, shared)
            try:
                return use(view)
            finally:
                view.release()
        finally:
            _buffer_lock.release()
    return use(_read_checked(ref, bytearray))


def _where(ref: ValueRef) -> str:
    return f"{ref.path}: value at offset {ref.offset} ({ref.length} bytes)"


@contextlib.contextmanager
def _open_value(ref: ValueRef) -> Iterator[int]:
    """An fd on ``ref``'s segment, checked to hold the whole value (closed after)."""
    if ref.offset < 0:
        raise CorruptCheckpointError(f"{_where(ref)}: a reference to before the file (damaged)")
    try:
        fd = open_fd(ref.path)
    except OSError as exc:
        raise CorruptCheckpointError(f"{_where(ref)}: cannot open: {exc.strerror or exc}") from exc
    try:
        try:
            left = os.fstat(fd).st_size - ref.offset
        except OSError as exc:
            raise CorruptCheckpointError(
                f"{_where(ref)}: read error: {exc.strerror or exc}"
            ) from exc
        if left < ref.length:  # checked before any buffer is made for it
            raise CorruptCheckpointError(f"{_where(ref)}: cut short ({max(0, left)} bytes left)")
        yield fd
    finally:
        os.close(fd)


def _pread_exact(fd: int, ref: ValueRef, start: int, n: int) -> bytes:
    """Bytes ``[start, start + n)`` of ``ref``'s value, as one bytes object (no copy when read at once)."""
    try:
        data = os.pread(fd, n, ref.offset + start)
        if len(data) < n:  # a short read (rare): the rest, joined
            parts = [data]
            got = len(data)
            while got < n:
                more = os.pread(fd, n - got, ref.offset + start + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
    except OSError as exc:
        raise CorruptCheckpointError(f"{_where(ref)}: read error: {exc.strerror or exc}") from exc
    if len(data) != n:
        raise CorruptCheckpointError(f"{_where(ref)}: cut short ({start + len(data)} bytes left)")
    return data


def _fill(fd: int, ref: ValueRef, start: int, view: memoryview) -> int:
    """Read the value's bytes from ``start`` on into ``view``; how many were there."""
    got = 0
    try:
        while got < len(view):
            n = os.preadv(fd, [view[got:]], ref.offset + start + got)
            if not n:
                break
            got += n
    except OSError as exc:
        raise CorruptCheckpointError(f"{_where(ref)}: read error: {exc.strerror or exc}") from exc
    return got


def _read_into(
    fd: int, ref: ValueRef, head: bytes, plan: tuple[int, object, memoryview | None]
) -> object:
    """Fill ``plan``'s result with the value's contents; verify the whole value's digest."""
    start, result, view = plan
    hasher = blake3(memoryview(head)[:start])
    if view is None:
        data = _pread_exact(fd, ref, start, ref.length - start)
        hasher.update(data)
        result = data
    else:
        try:
            got = _fill(fd, ref, start, view)
            if got != len(view):
                raise CorruptCheckpointError(f"{_where(ref)}: cut short ({start + got} bytes left)")
            hasher.update(view)
        finally:
            view.release()
    if hasher.digest(_VALUE_DIGEST_SIZE) != ref.digest:
        raise CorruptCheckpointError(f"{_where(ref)}: checksum mismatch")
    return result


def _read_checked(ref: ValueRef, buffer: Callable[[int], bytearray]) -> memoryview:
    with _open_value(ref) as fd:
        view = memoryview(buffer(ref.length))[: ref.length]
        got = _fill(fd, ref, 0, view)
    if got != ref.length:
        raise CorruptCheckpointError(f"{_where(ref)}: cut short ({got} bytes left)")
    # one thread: blake3's own pool (max_threads=AUTO) halved the hash time
    # on an idle 2-core machine but made hits 30% slower on a loaded one
    if blake3(view).digest(_VALUE_DIGEST_SIZE) != ref.digest:
        raise CorruptCheckpointError(f"{_where(ref)}: checksum mismatch")
    return view


def _check_record(obj: Any, raw: memoryview) -> Record | None:
    """The record ``obj`` unpacked from ``raw`` if it is well-formed and its checksum verifies."""
    if type(obj) is not tuple or len(obj) not in (6, 7):
        return None
    if len(obj) == 7:
        key, value, func, when, digests, expires, checksum = obj
        if type(expires) is not float:
            return None
    else:
        key, value, func, when, digests, checksum = obj
        expires = _INF
    if not (
        type(key) is bytes
        and 0 < len(key) <= MAX_KEY_SIZE
        and type(value) is bytes
        and type(func) is str
        and type(when) is float
        and type(digests) is bytes
        and type(checksum) is bytes
        and len(checksum) == RECORD_CHECKSUM_SIZE
        and len(raw) > RECORD_CHECKSUM_SIZE + 2
        and raw[-RECORD_CHECKSUM_SIZE - 2 : -RECORD_CHECKSUM_SIZE].tobytes() == _CHECKSUM_BIN_HEADER
    ):
        return None
    if blake3(raw[:-RECORD_CHECKSUM_SIZE]).digest(RECORD_CHECKSUM_SIZE) != checksum:
        return None
    return Record(key, value, func, when, digests, expires)


def _unpacker(bio: io.BytesIO, limit: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(
        bio,
        read_size=min(64 * 1024, max(1, limit)),
        use_list=False,
        raw=False,
        strict_map_key=False,
        max_buffer_size=max(1, limit),
    )


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")


def _span(data: bytes, p: int, limit: int, *, text: bool) -> tuple[int, int] | None:
    """(start, end) of the msgpack bin (or str, with ``text``) at ``p``, within ``limit``."""
    if p >= limit:
        return None
    tag = data[p]
    if text and 0xA0 <= tag <= 0xBF:
        start, length = p + 1, tag & 0x1F
    elif tag == (0xD9 if text else 0xC4):
        if p + 2 > limit:
            return None
        start, length = p + 2, data[p + 1]
    elif tag == (0xDA if text else 0xC5):
        if p + 3 > limit:
            return None
        start, length = p + 3, _U16.unpack_from(data, p + 1)[0]
    elif tag == (0xDB if text else 0xC6):
        if p + 5 > limit:
            return None
        start, length = p + 5, _U32.unpack_from(data, p + 1)[0]
    else:
        return None
    end = start + length
    return (start, end) if end <= limit else None


def _record_at(data: bytes, view: memoryview, pos: int, limit: int) -> tuple[Record, int] | None:
    """The record starting at ``pos`` and its end, if well-formed with a verified checksum.

    Parses the six (format 3: seven) msgpack headers by hand, so a candidate made of garbage
    costs O(1) (every declared length is checked against ``limit`` before
    anything is read or hashed) and only a well-formed one is hashed.
    """
    if pos + 2 > limit:
        return None
    if data[pos] == 0xC4:
        return _flat_record_at(data, view, pos, limit)
    if data[pos] not in (0x96, 0x97):
        return None
    key = _span(data, pos + 1, limit, text=False)
    if key is None or not 0 < key[1] - key[0] <= MAX_KEY_SIZE:
        return None
    value = _span(data, key[1], limit, text=False)
    if value is None:
        return None
    func = _span(data, value[1], limit, text=True)
    if func is None:
        return None
    t = func[1]
    if t + 9 > limit or data[t] != 0xCB:
        return None
    digests = _span(data, t + 9, limit, text=False)
    if digests is None:
        return None
    c = digests[1]
    expires = _INF
    if data[pos] == 0x97:
        if c + 9 > limit or data[c] != 0xCB:
            return None
        expires = _F64.unpack_from(data, c + 1)[0]
        c += 9
    end = c + 2 + RECORD_CHECKSUM_SIZE
    if end > limit or data[c : c + 2] != _CHECKSUM_BIN_HEADER:
        return None
    if blake3(view[pos : c + 2]).digest(RECORD_CHECKSUM_SIZE) != data[c + 2 : end]:
        return None
    try:
        name = data[func[0] : func[1]].decode("utf-8")
    except UnicodeDecodeError:
        return None
    rec = Record(
        key=data[key[0] : key[1]],
        value=data[value[0] : value[1]],
        func=name,
        time=_F64.unpack_from(data, t + 1)[0],
        digests=data[digests[0] : digests[1]],
        expires=expires,
    )
    return rec, end


def _flat_record_at(
    data: bytes, view: memoryview, pos: int, limit: int
) -> tuple[Record, int] | None:
    """:func:`_record_at` for a format-4 record: key, value, [expires,] tail.

    The tail's own layout (fixarray 4: func str, time float64, digests bin,
    checksum bin 16, ending where the tail does) is checked by hand before
    anything is hashed, as the older layout's headers are.
    """
    key = _span(data, pos, limit, text=False)
    if key is None or not 0 < key[1] - key[0] <= MAX_KEY_SIZE:
        return None
    value = _span(data, key[1], limit, text=False)
    if value is None:
        return None
    p = value[1]
    expires = _INF
    if p < limit and data[p] == 0xCB:
        if p + 9 > limit:
            return None
        expires = _F64.unpack_from(data, p + 1)[0]
        p += 9
    tail = _span(data, p, limit, text=False)
    if tail is None:
        return None
    ts, end = tail
    c = end - RECORD_CHECKSUM_SIZE - 2  # the checksum's bin header
    if c <= ts or data[ts] != 0x94:
        return None
    func = _span(data, ts + 1, c, text=True)
    if func is None:
        return None
    t = func[1]
    if t + 9 > c or data[t] != 0xCB:
        return None
    digests = _span(data, t + 9, c, text=False)
    if digests is None or digests[1] != c or data[c : c + 2] != _CHECKSUM_BIN_HEADER:
        return None
    if blake3(view[pos : c + 2]).digest(RECORD_CHECKSUM_SIZE) != data[c + 2 : end]:
        return None
    try:
        name = data[func[0] : func[1]].decode("utf-8")
    except UnicodeDecodeError:
        return None
    rec = Record(
        key=data[key[0] : key[1]],
        value=data[value[0] : value[1]],
        func=name,
        time=_F64.unpack_from(data, t + 1)[0],
        digests=data[digests[0] : digests[1]],
        expires=expires,
    )
    return rec, end


def _walk(
    data: bytes,
    base: int,
    batch_offset: int,
    *,
    skip_array_header: bool,
) -> Iterator[RecordInfo | tuple[int, int]]:
    """Records in ``data`` (file offset ``base``) one by one, verifying each checksum.

    Yields :class:`RecordInfo` for every record that verifies and ``(start,
    end)`` file-offset pairs for the stretches in between that hold none.
    After garbage it resynchronises on every later ``0x96 0xc4`` or ``0x97
    0xc4`` (the first two bytes of any record: a 6-array, or in format 3 a
    7-array, whose key is a bin 8), so one damaged record costs only itself.
    """
    view = memoryview(data)
    n = len(data)
    pos = 0
    if skip_array_header and n:
        # the payload's array header: fixarray, array 16 or array 32
        tag = data[0]
        pos = 1 if 0x90 <= tag <= 0x9F else 3 if tag == 0xDC else 5 if tag == 0xDD else 0
        if pos < n - 1 and data[pos] in (3, 4) and data[pos + 1] == 0xC4:
            pos += 1  # format 4's stride
    bad_from: int | None = None
    while pos < n:
        found = _record_at(data, view, pos, n)
        if found is not None:
            rec, end = found
            if bad_from is not None:
                yield (base + bad_from, base + pos)
                bad_from = None
            yield RecordInfo(rec, base + pos, end - pos, batch_offset, recovered=True)
            pos = end
            continue
        if bad_from is None:
            bad_from = pos
        m = _RECORD_STARTS.search(data, pos + 1)
        if m is None:
            break
        pos = m.start()
    if bad_from is not None:
        yield (base + bad_from, base + n)


def _recover(
    data: bytes, base: int, batch_offset: int, *, skip_array_header: bool
) -> Generator[tuple[str, int, Any], None, tuple[int, list[tuple[int, int]]]]:
    """Yield the records of a damaged stretch that verify; return (count, bad spans)."""
    recovered = 0
    spans: list[tuple[int, int]] = []
    for item in _walk(data, base, batch_offset, skip_array_header=skip_array_header):
        if isinstance(item, RecordInfo):
            recovered += 1
            yield ("record", item.offset, item)
        else:
            spans.append(item)
    return recovered, spans


def _iter_batches(src: _Source, start: int) -> Iterator[tuple[str, int, Any]]:
    """The segment from ``start`` as events.

    ``("batch", offset, (count, payload))`` for a sound batch (payload digest
    verified; its records are not unpacked here);
    ``("record", offset, RecordInfo)`` for a record recovered from a damaged
    stretch; ``("bad", offset, BadSpan)`` for each damaged stretch.

    The loop handles sound batches and value frames (the load path) inline;
    damage is read by :func:`_damaged_batch` and :func:`_unframed`.
    """
    pos = start
    size = src.size
    while pos < size:
        raw = src.read(pos, BATCH_HEADER_SIZE)
        if len(raw) == BATCH_HEADER_SIZE and _header_ok(raw):
            _, length, count, digest = _BATCH_FIXED.unpack_from(raw)
            body_at = pos + BATCH_HEADER_SIZE
            payload = src.read(body_at, length)
            if len(payload) == length and blake3(payload).digest(_PAYLOAD_DIGEST_SIZE) == digest:
                yield ("batch", pos, (count, payload))
                pos = body_at + length
                continue
            nxt = yield from _damaged_batch(src, pos, length, count, payload)
        else:
            vlen = _value_header(raw)
            if vlen >= 0 and pos + VALUE_HEADER_SIZE + vlen <= size:
                pos += VALUE_HEADER_SIZE + vlen  # read only through a reference
                continue
            nxt = yield from _unframed(src, pos, raw, vlen)
        if nxt is None:
            return  # a torn tail: nothing follows
        pos = nxt


def _damaged_batch(
    src: _Source, pos: int, length: int, count: int, payload: bytes
) -> Generator[tuple[str, int, Any], None, int | None]:
    """A batch at ``pos`` whose payload fails its digest: recover what verifies.

    Returns where reading goes on, or None after a torn tail.
    """
    size = src.size
    body_at = pos + BATCH_HEADER_SIZE
    torn = len(payload) < length
    # A sound batch header inside the claimed payload: this batch was cut
    # short and another follows (e.g. a torn write, then a later append).
    # The damage ends there; reading on from that header keeps every
    # record of the next batch (a record walk across it could cut one).
    inner = _header_within(src, body_at, body_at + len(payload))
    if inner != -1:
        payload = payload[: inner - body_at]
        torn = False
    recovered, spans = yield from _recover(payload, body_at, pos, skip_array_header=True)
    end = body_at + len(payload)
    lost = max(0, count - recovered)
    if torn:
        why = (
            f"torn tail: batch at offset {pos} cut short "
            f"({len(payload)} of {length} payload bytes); "
            f"recovered {recovered} of {count} records"
        )
        yield ("bad", pos, BadSpan(pos, size - pos, why, lost, torn=True))
        return None
    why = (
        f"damaged batch at offset {pos} (payload checksum mismatch); "
        f"recovered {recovered} of {count} records"
    )
    first = spans[0][0] if spans else pos
    last = spans[-1][1] if spans else end
    yield ("bad", first, BadSpan(first, last - first, why, lost))
    return end


def _unframed(
    src: _Source, pos: int, raw: bytes, vlen: int
) -> Generator[tuple[str, int, Any], None, int | None]:
    """No sound batch header at ``pos``: a torn tail, or damage up to the next header.

    ``vlen`` is the length a sound value-frame header there claims (-1: none).
    Returns where reading goes on, or None after a torn tail.
    """
    size = src.size
    if vlen >= 0:  # a value frame cut short
        why = (
            f"torn tail: value at offset {pos} cut short "
            f"({size - pos - VALUE_HEADER_SIZE} of {vlen} bytes)"
        )
        yield ("bad", pos, BadSpan(pos, size - pos, why, 1, torn=True))
        return None
    if len(raw) < BATCH_HEADER_SIZE and (
        BATCH_MAGIC.startswith(raw[:8][: len(raw)]) or VALUE_MAGIC.startswith(raw[:8][: len(raw)])
    ):
        why = f"torn tail: batch header at offset {pos} cut short ({len(raw)} bytes)"
        yield ("bad", pos, BadSpan(pos, size - pos, why, 1, torn=True))
        return None
    nxt = src.next_header(pos + 1)
    region = src.read(pos, nxt - pos)
    recovered, spans = yield from _recover(region, pos, pos, skip_array_header=False)
    # A damaged header alone (its records all verified) loses nothing; any
    # other stretch no header vouches for counts as one lost record.
    lost = sum(
        1 for a, b in spans if not (a == pos and b - a <= BATCH_HEADER_SIZE + 6 and recovered)
    )
    torn = nxt >= size and bool(spans) and spans[-1][1] >= size
    why = (
        f"{'torn tail' if torn and not recovered else 'damaged data'} at offset {pos} "
        f"({nxt - pos} bytes with no sound batch header); recovered {recovered} records"
    )
    first = spans[0][0] if spans else pos
    last = spans[-1][1] if spans else nxt
    yield ("bad", first, BadSpan(first, last - first, why, lost, torn=torn))
    return nxt


@contextlib.contextmanager
def _reading(path: str | os.PathLike[str]) -> Iterator[tuple[_Source, SegmentHeader | None, str]]:
    """Open segment ``path`` and read its file header: (source, header, problem).

    The one opening routine of both readers (:func:`iter_segment` for tools,
    :func:`_load_segment` for loading). ``header`` is None with ``problem``
    "" for an empty file (a writer died before its header: nothing lost) and
    with a problem for a header that stops the reader; see
    :func:`_parse_file_header`. Raises ``OSError`` (a FIFO or other
    non-regular file is refused, never waited on: see :func:`open_segment`).
    """
    with open_segment(path) as f:
        size = os.fstat(f.fileno()).st_size
        src = _Source(f, size)
        if not size:
            yield src, None, ""
            return
        header, problem = _parse_file_header(src.read(0, FILE_HEADER_SIZE))
        yield src, header, problem


def iter_segment(
    path: str | os.PathLike[str], *, verify_records: bool = True, values: bool = True
) -> Iterator[RecordInfo | BadSpan]:
    """Everything segment ``path`` holds, in file order, for tools.

    Yields a :class:`RecordInfo` per usable record (full record, its offset
    and length, whether it was recovered from a damaged batch) and a
    :class:`BadSpan` per damaged stretch (offset, length, reason, records
    lost, torn tail or not). A file header of another format version (or
    one cut short) yields one ``BadSpan`` covering the file and nothing else;
    a damaged header yields a ``BadSpan`` for its 16 bytes and the rest is
    read as format 1. An empty file yields nothing. Never raises for damaged
    content; ``OSError`` when the file cannot be opened or read.

    With ``verify_records`` (the default) every record's own checksum is
    checked even inside a sound batch, and a record that fails is reported as
    a ``BadSpan`` (a writer bug: the batch digest matched); without it a sound
    batch is trusted as a whole, as loading does.

    A value kept in a value frame (format 2) is read back and verified with
    ``values`` (the default; one value in memory at a time), and a value that
    fails is a ``BadSpan`` (1 lost) instead of its record; with
    ``values=False`` such a record comes with ``value=b""`` and its
    :attr:`RecordInfo.ref` only (nothing of the value is read).
    """
    with _reading(path) as (src, header, problem):
        size = src.size
        if header is None:
            if problem:
                yield BadSpan(0, size, problem, 0, torn=size < FILE_HEADER_SIZE)
            return
        if problem:
            yield BadSpan(0, FILE_HEADER_SIZE, problem, 0)
        v2 = header.version >= 2
        shown = os.fspath(path)
        for kind, offset, item in _iter_batches(src, header.header_size):
            if kind == "batch":
                count, payload = item
                items: Iterator[RecordInfo | BadSpan] = _records_of_sound_batch(
                    offset, count, payload, verify_records=verify_records
                )
            else:
                items = iter((item,))
            for it in items:
                if v2 and isinstance(it, RecordInfo):
                    it = _with_value(src, shown, it, read=values)
                yield it


def _with_value(src: _Source, shown: str, info: RecordInfo, *, read: bool) -> RecordInfo | BadSpan:
    """``info`` with its frame-held value resolved (see :func:`iter_segment`)."""
    ref = _as_ref(info.record.value, shown, info.batch_offset)
    if ref is None:
        return info
    value = b""
    if read:
        try:
            value = _read_exact(src.read, ref)
        except CorruptCheckpointError as exc:
            why = f"{str(exc).removeprefix(shown + ': ')} (record at offset {info.offset})"
            return BadSpan(ref.offset, ref.length, why, 1)
    rec = info.record
    return RecordInfo(
        Record(rec.key, value, rec.func, rec.time, rec.digests, rec.expires),
        info.offset,
        info.length,
        info.batch_offset,
        info.recovered,
        ref,
    )


def _records_of_sound_batch(
    offset: int, count: int, payload: bytes, *, verify_records: bool
) -> Iterator[RecordInfo | BadSpan]:
    body_at = offset + BATCH_HEADER_SIZE
    view = memoryview(payload)
    up = _unpacker(io.BytesIO(payload), len(payload))
    stride = 0  # formats 1-3: one object per record
    try:
        n = up.read_array_header()
        if n != count and n > 0:  # format 4: the stride, then its items per record
            stride = up.unpack()
            if type(stride) is not int or stride not in (3, 4) or n != 1 + stride * count:
                stride = -1
    except Exception:
        n = -1
    if stride < 0 or (not stride and n != count):
        yield BadSpan(
            offset,
            BATCH_HEADER_SIZE + len(payload),
            f"batch at offset {offset}: record count mismatch ({n} items for {count} records)",
            count,
        )
        return
    for _ in range(count):
        start = up.tell()
        try:
            obj = up.unpack() if not stride else tuple(up.unpack() for _ in range(stride))
        except Exception:
            yield BadSpan(
                body_at + start,
                len(payload) - start,
                f"batch at offset {offset}: undecodable record",
                1,
            )
            return
        end = up.tell()
        raw = view[start:end]
        if stride:
            rec = _check_flat(obj, raw, verify_records)
        else:
            rec = _check_record(obj, raw) if verify_records else _trusted_record(obj)
        if rec is None:
            yield BadSpan(
                body_at + start,
                end - start,
                f"record at offset {body_at + start}: checksum mismatch in a sound batch",
                1,
            )
            continue
        yield RecordInfo(rec, body_at + start, end - start, offset, recovered=False)


def _trusted_record(obj: Any) -> Record | None:
    if type(obj) is not tuple or len(obj) not in (6, 7):
        return None
    key, value, func, when, digests = obj[:5]
    expires = obj[5] if len(obj) == 7 else _INF
    if not (
        type(key) is bytes
        and type(value) is bytes
        and type(func) is str
        and type(when) is float
        and type(digests) is bytes
        and type(expires) is float
    ):
        return None
    return Record(key, value, func, when, digests, expires)


def _check_flat(obj: tuple[Any, ...], raw: memoryview, verify: bool) -> Record | None:
    """A format-4 record's items (key, value[, expires], tail) read from ``raw``, as a Record.

    None if malformed, or with ``verify`` if its checksum (the tail's last
    16 bytes) does not verify over ``raw``.
    """
    key, value, tail = obj[0], obj[1], obj[-1]
    expires = obj[2] if len(obj) == 4 else _INF
    fields = _tail_fields(tail, raw=False)
    if fields is None:
        return None
    func, when, digests, checksum = fields
    if not (
        type(key) is bytes
        and 0 < len(key) <= MAX_KEY_SIZE
        and type(value) is bytes
        and type(expires) is float
        and type(func) is str
        and type(when) is float
        and type(digests) is bytes
        and type(checksum) is bytes
        and len(checksum) == RECORD_CHECKSUM_SIZE
        and raw[-RECORD_CHECKSUM_SIZE - 2 : -RECORD_CHECKSUM_SIZE].tobytes() == _CHECKSUM_BIN_HEADER
    ):
        return None
    if verify and blake3(raw[:-RECORD_CHECKSUM_SIZE]).digest(RECORD_CHECKSUM_SIZE) != checksum:
        return None
    return Record(key, value, func, when, digests, expires)


class _Sink:
    """Where a load puts what it reads: the table, expiries, tombstones, counts.

    ``put`` is "a later record for a key overrides an earlier one", with
    expiry: a record already expired at ``now`` removes the key (it is the
    newest, and it is a miss). Tombstones are only collected here; they are
    applied once every segment is read (:func:`_apply_tombstones`), so that
    they act the same whatever order the segments load in.
    """

    __slots__ = ("expired", "expires", "now", "segments", "table", "tombs")

    def __init__(self, report: LoadReport, now: float) -> None:
        self.table = report.table
        self.expires = report.expires
        self.tombs = report.tombstones
        self.now = now
        self.expired = 0
        #: (path, its value-reference base or None) of every segment read, in load order
        self.segments: list[tuple[Path, str | None]] = []

    def add(
        self,
        key: bytes,
        raw: bytes,
        func: bytes | str,
        when: float,
        expires: float,
        value: bytes | ValueRef,
    ) -> None:
        """One record that may expire or be a tombstone (``raw``: its value field)."""
        if expires == TOMBSTONE_EXPIRES and raw in (FORGET_KEY, FORGET_FUNC):
            name = func.decode("utf-8", "surrogateescape") if type(func) is bytes else func
            if type(name) is str and type(when) is float:  # else a foreign writer's: ignored
                self.tombs.add(Record(key, raw, name, when, b"", expires))
            return
        self.put(key, value, expires)

    def put(self, key: bytes, value: bytes | ValueRef, expires: float) -> None:
        if expires <= self.now:
            self.table.pop(key, None)
            self.expires.pop(key, None)
            self.expired += 1
            return
        self.table[key] = value
        if expires < _INF:
            self.expires[key] = expires
        elif self.expires:
            self.expires.pop(key, None)

    def overwrite(self, keys: Sequence[bytes]) -> None:
        """Records that never expire replace ``keys``: forget their old expiries."""
        expires = self.expires
        if expires and not expires.keys().isdisjoint(keys):
            for k in keys:
                expires.pop(k, None)


def _load_segment(path: Path, sink: _Sink, report: LoadReport) -> None:
    """Add segment ``path``'s records to ``sink`` (later records override)."""
    shown = os.fspath(path)
    with contextlib.ExitStack() as stack:
        try:
            src, header, problem = stack.enter_context(_reading(path))
        except OSError as exc:
            report.errors.append(f"{shown}: cannot open: {exc.strerror or exc}")
            return
        try:
            f, size = src.f, src.size
            if header is None:
                if problem:
                    report.errors.append(f"{shown}: skipped: {problem}")
                return
            if problem:
                report.errors.append(f"{shown}: {problem}")
            report.files += 1
            refs = shown if header.version >= 2 else None
            sink.segments.append((path, refs))
            pos, n = _load_run(f, size, header.header_size, sink, refs)
            report.records += n
            if pos >= size:
                return
            # Something irregular at `pos`: the careful reader takes over.
            for kind, _offset, item in _iter_batches(src, pos):
                if kind == "batch":
                    count, payload = item
                    if _load_sound_batch(sink, count, payload, refs, _offset):
                        report.records += count
                    else:  # digest fine, contents not: a foreign or buggy writer
                        for rec in _records_of_sound_batch(
                            _offset, count, payload, verify_records=True
                        ):
                            if isinstance(rec, RecordInfo):
                                _put(sink, rec, refs)
                                report.records += 1
                            else:
                                report.skipped += rec.lost
                                report.errors.append(f"{shown}: {rec.reason}")
                elif kind == "record":
                    _put(sink, item, refs)
                    report.records += 1
                else:
                    span: BadSpan = item
                    report.skipped += span.lost
                    note = ""
                    if span.torn and is_segment_in_use(path):
                        note = " (the segment is open in a writer: its tail may still be in flight)"
                    report.errors.append(f"{shown}: {span.reason}{note}")
        except OSError as exc:
            report.errors.append(f"{shown}: read error: {exc.strerror or exc}")


_unpackb = msgpack.unpackb


class _MapInRecords(Exception):
    """Internal: a sound batch holds a map, which no writer of this format puts in one."""


def _no_map(_: object) -> NoReturn:
    """``object_hook`` of the fast loader: a map stops the unpacking (see :func:`_load_sound_batch`)."""
    raise _MapInRecords


_Table = dict[bytes, bytes | ValueRef]


def _ref_or(
    value: bytes, refs: str | None, batch_offset: int, prev: bytes | ValueRef | None
) -> bytes | ValueRef:
    """``value``, or the :class:`ValueRef` it holds (remembering ``prev``, see :func:`_after`)."""
    if refs is not None and len(value) == REF_SIZE:
        ref = _as_ref(value, refs, batch_offset)
        if ref is not None:
            return _after(prev, ref)
    return value


def _put(sink: _Sink, info: RecordInfo, refs: str | None) -> None:
    rec = info.record
    value = _ref_or(rec.value, refs, info.batch_offset, sink.table.get(rec.key))
    if rec.expires < _INF:
        sink.add(rec.key, rec.value, rec.func, rec.time, rec.expires, value)
    else:
        sink.table[rec.key] = value
        if sink.expires:
            sink.expires.pop(rec.key, None)


_FADVISE = getattr(os, "posix_fadvise", None)
_WILLNEED: Final = getattr(os, "POSIX_FADV_WILLNEED", 3)


def _read_span(f: IO[bytes], pos: int, n: int, size: int, ahead: bool) -> bytes:
    """``n`` bytes of ``f`` at ``pos``; with ``ahead``, the kernel is asked for the next ``n`` too.

    The ask (``posix_fadvise(WILLNEED)``, a hint) lets the disk read the next
    span while the loader unpacks this one, so a segment that is not in the
    page cache costs less than its CPU time plus the disk's (~0.5-1 s of a
    cold 10M-record load here). The loader asks only in a run of batches:
    from a value frame on (skipped, read on a hit only) nothing is read
    ahead until a batch follows, so a segment of large values is not read
    through.
    """
    f.seek(pos)
    buf = f.read(n)
    end = pos + len(buf)
    if ahead and _FADVISE is not None and end < size:
        with contextlib.suppress(OSError, ValueError):
            _FADVISE(f.fileno(), end, min(len(buf), size - end), _WILLNEED)
    return buf


def _load_run(
    f: IO[bytes], size: int, start: int, sink: _Sink, refs: str | None = None
) -> tuple[int, int]:
    """Load sound batches from ``start`` on, as fast as possible; stop at the first irregularity.

    Returns (offset reached, records loaded). Reads the file in big chunks and
    works on memoryview slices (no per-batch reads or copies). Anything
    irregular (bad magic, a digest mismatch, a torn tail, an odd payload)
    ends the run at that batch for :func:`_iter_batches` to handle.

    ``refs``: the segment's path for a format-2 segment (value frames are
    skipped, value references become :class:`ValueRef` s), None for format 1.

    One long loop on purpose: it runs once per batch (a task_exit segment is
    a batch per record, millions of them), and every step here is inline
    because a function call per batch is a measurable share of a batch of
    one record's cost; damage leaves the loop for :func:`_iter_batches`.
    """
    fields = _BATCH_FIXED.unpack_from
    hsize = BATCH_HEADER_SIZE
    magic_expected = BATCH_MAGIC
    table = sink.table
    loaded = 0
    pos = start
    buf = b""
    view = memoryview(buf)
    base = pos  # file offset of buf[0]
    want = _READ_BUFFER * 4
    ahead = False
    while pos < size:
        off = pos - base
        if off + hsize > len(buf):
            buf = _read_span(f, pos, min(want, size - pos), size, ahead)
            view, base, off = memoryview(buf), pos, 0
            if len(buf) < hsize:
                break
        magic, length, count, digest = fields(buf, off)
        if magic != magic_expected:
            if refs is None or magic != VALUE_MAGIC:
                break
            vlen = _value_header(view[off : off + hsize])
            if vlen < 0 or pos + hsize + vlen > size:
                break  # damaged header or torn value: the careful reader says which
            # Seek past the value (read on a hit only); the next read is small,
            # so a run of big values is never read through.
            pos += hsize + vlen
            want = _SMALL_READ
            ahead = False
            continue
        body, end = off + hsize, off + hsize + length
        if end > len(buf):
            if pos + hsize + length > size:
                break  # torn tail
            buf = _read_span(f, pos, max(want, hsize + length), size, ahead)
            view, base, off = memoryview(buf), pos, 0
            body, end = hsize, hsize + length
        want = min(want * 4, _READ_BUFFER * 4)
        ahead = True  # in a run of batches: what follows is likely batches too
        payload = view[body:end]
        if (
            blake3(payload).digest(_PAYLOAD_DIGEST_SIZE) != digest
            or blake3(view[off : off + 32]).digest(_HEADER_DIGEST_SIZE)
            != buf[off + 32 : off + hsize]
        ):
            break
        one = False
        if count == 1:
            # A batch of one (task_exit with little concurrency) that never
            # expires: skip the column machinery, it costs more than the record.
            try:
                recs = _unpackb(payload, use_list=False, raw=True)
                if len(recs) == 4:  # format 4: (stride 3, key, value, tail)
                    key, raw = recs[1], recs[2]
                    one = recs[0] == 3 and type(recs[0]) is int
                else:
                    rec = recs[0]
                    key, raw = rec[0], rec[1]
                    one = len(recs) == 1 and type(rec) is tuple and (
                        len(rec) == 6 or (len(rec) == 7 and rec[5] == _INF)
                    )
                one = one and type(key) is bytes and type(raw) is bytes
            except Exception:
                one = False
        if one:
            value = _ref_or(raw, refs, pos, table.get(key)) if len(raw) == REF_SIZE else raw
            table[key] = value
            if sink.expires:
                sink.expires.pop(key, None)
        elif not _load_sound_batch(sink, count, payload, refs, pos):
            break
        loaded += count
        pos += hsize + length
    return pos, loaded


def _load_sound_batch(
    sink: _Sink,
    count: int,
    payload: bytes | memoryview,
    refs: str | None = None,
    batch_offset: int = 0,
) -> bool:
    # The hot path: one C call to unpack, C-level slices or maps to pull keys
    # and values out, one dict.update. raw=True leaves func names as bytes
    # (never decoded). No record holds a map: a map anywhere (a foreign
    # writer's) stops the unpacking; see _columns for the shape checks.
    try:
        recs = msgpack.unpackb(payload, use_list=False, raw=True, object_hook=_no_map)
        cols = _columns(recs, count)
    except Exception:
        return False
    if cols is None:
        return False
    keys, values, exps, named = cols
    # Shape check at C speed: a wrong type here would put a non-bytes value
    # in the table (only a foreign writer could produce such a sound batch).
    if set(map(type, keys)) != {bytes} or set(map(type, values)) != {bytes}:
        return False
    table = sink.table
    if exps is not None:  # formats 3-4: an expiry per record
        try:
            never = set(exps) == _NEVER
        except TypeError:  # unhashable: a foreign writer's, record by record
            return False
        if never:  # the usual batch: nothing in it expires
            lo = hi = _INF
            special = False
        else:
            if set(map(type, exps)) != {float}:  # a foreign writer's, record by record
                return False
            lo = min(exps)
            special = lo <= sink.now
            hi = max(exps)
            if hi != hi:  # NaN: a foreign writer's, record by record
                return False
        if special:
            # tombstones (expires 0.0) or records already expired: one by one
            for i, (key, raw, exp) in enumerate(zip(keys, values, exps, strict=True)):
                prev = table.get(key) if len(raw) == REF_SIZE else None
                value = _ref_or(raw, refs, batch_offset, prev)
                if exp < _INF:
                    func, when = named(i) if exp == TOMBSTONE_EXPIRES else (b"", 0.0)
                    sink.add(key, raw, func, when, exp, value)
                else:
                    table[key] = value
                    if sink.expires:
                        sink.expires.pop(key, None)
            return True
        sink.overwrite(keys)
        before = _before_refs(table, keys, values, refs)
        table.update(zip(keys, values, strict=True))
        if lo < _INF:
            if hi < _INF:
                sink.expires.update(zip(keys, exps, strict=True))
            else:
                sink.expires.update((k, e) for k, e in zip(keys, exps, strict=True) if e < _INF)
    else:
        sink.overwrite(keys)
        before = _before_refs(table, keys, values, refs)
        table.update(zip(keys, values, strict=True))
    if before is not None:
        # value references (format 2 on): rare enough for a Python loop
        for k, v in zip(keys, values, strict=True):
            if len(v) == REF_SIZE and table.get(k) is v:
                ref = _as_ref(v, refs or "", batch_offset)
                if ref is not None:
                    table[k] = _after(before[k], ref)
    return True


#: (keys, values, expiries or None, (func, time) of record i) of a sound batch
_Columns = tuple[
    Sequence[bytes], Sequence[bytes], Sequence[float] | None, Callable[[int], tuple[Any, Any]]
]


def _columns(recs: Any, count: int) -> _Columns | None:
    """A sound batch's unpacked payload as columns, whichever format wrote it; None: neither.

    Format 4 (the payload's first item is the stride, 3 or 4, and there are
    ``1 + stride * count`` items): slices, no per-record work; a record's
    func and time are read from its tail only when asked for. Formats 1-3
    (``count`` tuples of 6 or 7 fields): C-level maps. A record of the
    wrong shape (a scalar, bytes, an ExtType, mixed lengths) gives None or
    ``TypeError``; the caller's type checks refuse the rest.
    """
    if type(recs) is not tuple:
        return None
    n = len(recs)
    if n == count:  # formats 1-3: a tuple per record
        keys = list(map(_get_key, recs))  # a scalar record: TypeError
        values = list(map(_get_value, recs))
        lens = set(map(len, recs))  # a bytes record gives int keys; an ExtType has 2 fields
        if lens == {7}:
            exps: Sequence[float] | None = list(map(_get_expires, recs))
        elif lens == {6}:
            exps = None
        else:
            return None  # mixed shapes: the careful reader, record by record
        return keys, values, exps, lambda i: (recs[i][2], recs[i][3])
    stride = recs[0] if n else None
    if type(stride) is not int or stride not in (3, 4) or n != 1 + stride * count:
        return None

    def named(i: int) -> tuple[Any, Any]:
        fields = _tail_fields(recs[stride * (i + 1)], raw=True)
        return (fields[0], fields[1]) if fields is not None else (None, None)

    return recs[1::stride], recs[2::stride], recs[3::4] if stride == 4 else None, named


def _tail_fields(tail: object, *, raw: bool) -> tuple[Any, Any, Any, Any] | None:
    """(func, time, digests, checksum) of a format-4 record's tail; None if malformed."""
    if type(tail) is not bytes:
        return None
    try:
        fields = msgpack.unpackb(tail, use_list=False, raw=raw, object_hook=_no_map)
    except Exception:
        return None
    if type(fields) is not tuple or len(fields) != 4:
        return None
    return fields


def _before_refs(
    table: _Table, keys: Sequence[bytes], values: Sequence[bytes], refs: str | None
) -> dict[bytes, bytes | ValueRef | None] | None:
    """What the table held for the keys of a batch's value references (None: the batch has none)."""
    if refs is None or REF_SIZE not in set(map(len, values)):
        return None
    return {k: table.get(k) for k, v in zip(keys, values, strict=True) if len(v) == REF_SIZE}


def _apply_tombstones(sink: _Sink, report: LoadReport) -> None:
    """Drop what the load's tombstones forget, whatever order the segments loaded in.

    A second pass over the segments read, only when some tombstone was found:
    for every key with a forgotten record, the table ends up holding the last
    record (in load order) that no tombstone forgets, or nothing. Records
    written after a tombstone's time stay live. Only batches holding a
    tombstoned key or function are looked into: every record of a key names
    the same function (a key is derived from the function's name), so no
    other batch holds a record of a key with a forgotten record.
    """
    tombs = sink.tombs
    tkeys = tombs.keys
    tfuncs = {f.encode("utf-8", "surrogateescape"): t for f, t in tombs.funcs.items()}
    dead: set[bytes] = set()
    live: dict[bytes, tuple[bytes | ValueRef, float]] = {}
    forgotten = 0

    def one(key: bytes, raw: bytes, func: bytes, when: float, expires: float, value: Any) -> None:
        nonlocal forgotten
        if expires == TOMBSTONE_EXPIRES and raw in (FORGET_KEY, FORGET_FUNC):
            return
        t = tkeys.get(key)
        ft = tfuncs.get(func)
        if (t is not None and when <= t) or (ft is not None and when <= ft):
            dead.add(key)
            forgotten += 1
        else:
            live[key] = (value, expires)

    for path, refs in sink.segments:
        try:
            with _reading(path) as (src, header, _problem):
                if header is None:
                    continue
                for kind, offset, item in _iter_batches(src, header.header_size):
                    if kind == "batch":
                        count, payload = item
                        recs = _sound_records(offset, count, payload)
                        if not tkeys.keys().isdisjoint(map(_get_key, recs)) or not (
                            tfuncs.keys().isdisjoint(map(_get_func, recs))
                        ):
                            for rec in recs:
                                if rec[0] not in tkeys and rec[2] not in tfuncs:
                                    continue  # a key with no tombstone on it or its function
                                exp = rec[5] if len(rec) == 7 else _INF
                                prev = live.get(rec[0])
                                value = _ref_or(rec[1], refs, offset, prev[0] if prev else None)
                                one(rec[0], rec[1], rec[2], rec[3], exp, value)
                    elif kind == "record":
                        info: RecordInfo = item
                        r = info.record
                        prev = live.get(r.key)
                        value = _ref_or(r.value, refs, info.batch_offset, prev[0] if prev else None)
                        one(r.key, r.value, r.func.encode("utf-8", "surrogateescape"), r.time,
                            r.expires, value)
        except OSError as exc:  # vanished or unreadable since: say so, keep what we have
            report.errors.append(f"{os.fspath(path)}: read error applying tombstones: {exc}")
    table, expires = sink.table, sink.expires
    for key in dead:
        got = live.get(key)
        if got is None:
            table.pop(key, None)
            expires.pop(key, None)
        else:  # (an expired one was counted when it was read)
            value, exp = got
            if exp <= sink.now:
                table.pop(key, None)
                expires.pop(key, None)
            else:
                table[key] = value
                if exp < _INF:
                    expires[key] = exp
                else:
                    expires.pop(key, None)
    report.forgotten += forgotten


def _sound_records(offset: int, count: int, payload: bytes) -> list[tuple[Any, ...]]:
    """The records of a sound batch as (key, value, func bytes, time, digests[, expires], ...)."""
    try:
        recs = msgpack.unpackb(payload, use_list=False, raw=True, strict_map_key=False)
        if type(recs) is tuple and len(recs) != count:
            recs = _flat_records(recs, count)
        if (
            type(recs) is tuple
            and len(recs) == count
            and set(map(type, recs)) <= {tuple}
            and set(map(len, recs)) <= {6, 7}
            and all(type(r[0]) is bytes and type(r[1]) is bytes and type(r[2]) is bytes
                    and type(r[3]) is float for r in recs)
        ):
            return list(recs)
    except Exception:
        pass
    out: list[tuple[Any, ...]] = []  # what the careful reader still finds in it
    for it in _records_of_sound_batch(offset, count, payload, verify_records=True):
        if isinstance(it, RecordInfo):
            r = it.record
            out.append((r.key, r.value, r.func.encode("utf-8", "surrogateescape"), r.time,
                        r.digests, r.expires, b""))
    return out


def _flat_records(items: tuple[Any, ...], count: int) -> tuple[tuple[Any, ...], ...] | None:
    """A format-4 payload's items as format 3's records (key, value, func, time, digests,
    expires, checksum); None when they are not ``count`` well-formed format-4 records.

    The tails are unpacked in one C call (joined under one array header), so
    a pass that needs every record's function costs ~0.2 µs a record.
    """
    cols = _columns(items, count)
    if cols is None or len(items) == count:
        return None
    keys, values, exps, _named = cols
    stride = items[0]
    tails = items[stride::stride]
    if set(map(type, tails)) - {bytes}:
        return None
    fields = msgpack.unpackb(
        _array_header(len(tails)) + b"".join(tails),
        use_list=False,
        raw=True,
        object_hook=_no_map,
    )
    if (
        type(fields) is not tuple
        or len(fields) != count
        or set(map(type, fields)) - {tuple}
        or set(map(len, fields)) - {4}
    ):
        return None
    return tuple(
        (k, v, f[0], f[1], f[2], e, f[3])
        for k, v, e, f in zip(
            keys, values, exps if exps is not None else itertools.repeat(_INF), fields,
            strict=False,  # repeat() is endless; the lengths were checked above
        )
    )


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items."""
    if n < 16:
        return bytes((0x90 | n,))
    return b"\xdc" + _U16.pack(n) if n < 0x10000 else b"\xdd" + _U32.pack(n)


def _after(old: bytes | ValueRef | None, ref: ValueRef) -> ValueRef:
    """``ref``, remembering ``old`` when it is a reference to the same bytes elsewhere."""
    if (
        type(old) is ValueRef
        and old.digest == ref.digest
        and old.length == ref.length
        and (old.path, old.offset) != (ref.path, ref.offset)
    ):
        return ValueRef(ref.path, ref.offset, ref.length, ref.digest, old)
    return ref


def _looks_like_runinfo(d: Path) -> bool:
    try:
        return any(c.name.isdigit() and (c / "checkpoint").is_dir() for c in d.iterdir())
    except OSError:
        return False


def _pickle_skipped(pkl: Path) -> str:
    return (
        f"{pkl}: Parsl pickle checkpoint skipped (unpickling can run code); "
        "convert it with `aiomemo import-parsl --trust`"
    )


def load_paths(
    paths: Sequence[str | os.PathLike[str]], *, now: float | None = None, parsl_keys: bool = False
) -> LoadReport:
    """Load checkpoints into one table (key -> encoded value); never raises for bad data.

    Each path may be a run directory (holding ``checkpoint/``), a checkpoint
    directory, or a single segment file (resolved by
    :func:`aiomemo._paths.resolve`; a runinfo root is refused with a line
    saying to pass ``get_all_checkpoints()`` of it). Paths load in the order
    given, segments of a directory in name order (= start time), records in
    file order; a later record for a key overrides an earlier one. Problems
    (a missing path, a damaged batch, a torn tail, a Parsl ``tasks.pkl``,
    which is never unpickled, a FIFO or other non-regular file named like a
    segment, which is never opened) each add one line to
    :attr:`LoadReport.errors`; ``skipped`` counts the records known lost.
    Synchronous and blocking: from a coroutine, call it through
    ``asyncio.to_thread``.

    Format 3: a record whose expiry is at or before ``now`` (default: the
    current time) is left out (counted in :attr:`LoadReport.expired`; being
    the newest for its key, it removes an older one too), and the expiries of
    the rest are in :attr:`LoadReport.expires`. Tombstones are applied after
    every path is read, so segment order does not matter: a record written at
    or before a tombstone's time is left out (counted in
    :attr:`LoadReport.forgotten`), one written after it stays.

    ``parsl_keys``: also note whether the table holds a key made by Parsl
    (:attr:`LoadReport.parsl_keyed`, see :func:`aiomemo._records.note_parsl_keys`).
    """
    report = _load_paths(paths, now)
    return _records.note_parsl_keys(report) if parsl_keys else report


#: counts every reference a load made (next() is atomic): a load that made none
#: knows its table holds none without a scan of it
_refs_made = itertools.count()


_gc_lock = threading.Lock()
_gc_pausers = 0  # loads running now, in any thread
_gc_resume = False  # the collector was enabled when the first of them began


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while loads run (process-wide).

    A load makes a tuple per record (millions) that lives for one batch and
    holds no reference cycle; every few hundred of them would start a
    collection that finds nothing to free: ~0.5-1.5 s of a 10M-record load
    here. Concurrent loads nest (the last one to end resumes the collector);
    a collector that was disabled before the first load stays disabled; a
    child forked during a load gets it back at once (:func:`_gc_after_fork`).
    """
    global _gc_pausers, _gc_resume
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_resume:
                gc.enable()


def _gc_after_fork() -> None:
    """In a child forked while a load ran: that load's thread is gone, so it never ends there."""
    global _gc_lock, _gc_pausers
    _gc_lock = threading.Lock()  # it may have been held by a thread the child does not have
    if _gc_pausers:
        _gc_pausers = 0
        if _gc_resume:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_gc_after_fork)


def _load_paths(paths: Sequence[str | os.PathLike[str]], now: float | None) -> LoadReport:
    with _gc_paused():
        return _load_paths_now(paths, now)


def _load_paths_now(paths: Sequence[str | os.PathLike[str]], now: float | None) -> LoadReport:
    refs_before = next(_refs_made)
    report = LoadReport()
    sink = _Sink(report, _records.clock() if now is None else now)
    for p in paths:
        shown = os.fspath(p)
        try:
            r = resolve(p)
            report.errors.extend(r.notes)
            report.errors.extend(_pickle_skipped(pkl) for pkl in r.pickles)
            path = Path(p)
            if r.kind == "runinfo root" or (
                r.kind == "none" and path.is_dir() and _looks_like_runinfo(path)
            ):
                report.errors.append(
                    f"{shown}: looks like a runinfo root, not a run or checkpoint directory; "
                    "pass get_all_checkpoints() of it"
                )
                continue
            if r.kind == "none":
                if not path.exists():
                    report.errors.append(f"{shown}: no such checkpoint directory or file")
                elif path.is_file():
                    # named explicitly: read it (the reader reports what is wrong)
                    _load_segment(path, sink, report)
                elif not path.is_dir():
                    report.errors.append(f"{shown}: skipped: {r.problem}")
                # an empty directory holds nothing to load
                continue
            for seg in r.segments:
                _load_segment(seg, sink, report)
        except OSError as exc:
            report.errors.append(f"{shown}: cannot read: {exc.strerror or exc}")
    if sink.tombs:
        _apply_tombstones(sink, report)
    report.expired += sink.expired
    if next(_refs_made) - refs_before > 1:  # this load (or another thread's) made references
        report.bytes_on_disk = sum(
            v.length for v in list(report.table.values()) if type(v) is ValueRef
        )
    return report


def keys_of_funcs(
    paths: Sequence[str | os.PathLike[str]], funcs: set[str]
) -> tuple[dict[str, set[bytes]], set[str]]:
    """The keys of the records of each function in ``funcs``, and every function name seen.

    Reads the segments ``paths`` resolve to (as :func:`load_paths` does; no
    values read, tombstones not counted as records). Never raises for bad
    data or a missing path (they hold no names). Blocking: a worker thread's job.
    """
    wanted = {f.encode("utf-8", "surrogateescape"): f for f in funcs}
    out: dict[str, set[bytes]] = {f: set() for f in funcs}
    names: set[bytes] = set()
    for p in paths:
        try:
            r = resolve(p)
            segs = list(r.segments) if r.kind != "none" else [Path(p)] if Path(p).is_file() else []
        except OSError:
            continue
        for seg in segs:
            try:
                with _reading(seg) as (src, header, _problem):
                    if header is None:
                        continue
                    for kind, offset, item in _iter_batches(src, header.header_size):
                        if kind == "batch":
                            recs = _sound_records(offset, item[0], item[1])
                        elif kind == "record":
                            r2 = item.record
                            recs = [(r2.key, r2.value, r2.func.encode("utf-8", "surrogateescape"),
                                     r2.time, r2.digests, r2.expires, b"")]
                        else:
                            continue
                        for rec in recs:
                            exp = rec[5] if len(rec) == 7 else _INF
                            if exp == TOMBSTONE_EXPIRES and rec[1] in (FORGET_KEY, FORGET_FUNC):
                                continue  # a tombstone is no record of its function
                            names.add(rec[2])
                            f = wanted.get(rec[2])
                            if f is not None:
                                out[f].add(rec[0])
            except OSError:
                continue
    return out, {n.decode("utf-8", "surrogateescape") for n in names}
