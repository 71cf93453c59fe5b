"""The on-disk checkpoint log (format version 1): framing, writer, reader, recovery.

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
      8   2  format version   1
      10  2  header size      16 (a reader skips any extra header bytes)
      12  4  header digest    blake3(bytes 0..12), first 4 bytes
    batch, repeated to the end of the file
      0   8  batch magic      b"\\x8dAMBTCH\\n"
      8   4  payload length   bytes
      12  4  record count
      16  16 payload digest   blake3(payload), first 16 bytes
      32  8  header digest    blake3(bytes 0..32 of this header), first 8 bytes
      40  .. payload          one msgpack array of ``count`` records
    record (a msgpack array of 6, so it starts 0x96 0xc4: fixarray 6, bin 8 key)
      [key: bin 8 (1..255 bytes: 32 blake3, 16 imported Parsl md5),
       value: bin, func: str, time: float64 (0xcb), digests: bin,
       checksum: bin 16 = blake3(every byte of the packed record before the
       checksum's own 16 bytes, i.e. including its 0xc4 0x10 bin header)]

Loading a sound batch costs one blake3 call and one ``msgpack.unpackb`` (C);
the per-record checksums are read only to recover what a damaged batch still
holds: the record walk keeps every record whose own checksum verifies and
resynchronises on the next ``0x96 0xc4`` after garbage (candidates are parsed
by hand, every declared length checked before anything is hashed, so garbage
costs linear time), and the batch walk resynchronises on the next batch magic
whose header digest verifies. A damaged *file* header is read on as format 1
(every batch carries its own digests); only a sound header of another version
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
import io
import operator
import os
import struct
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import aiofiles
import aiofiles.os
import msgpack
from blake3 import blake3

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
from aiomemo._records import LoadReport, Record
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
    "encode_batch",
    "file_header",
    "fsync_dir",
    "is_segment_in_use",
    "iter_segment",
    "list_segments",
    "load_paths",
    "read_segment_header",
    "segment_stamp",
]

FORMAT_VERSION: Final = 1
FILE_HEADER_SIZE: Final = 16
_FILE_HEADER = struct.Struct("<8sHH")  # the 12 bytes the file header digest covers

BATCH_MAGIC: Final = b"\x8dAMBTCH\n"
BATCH_HEADER_SIZE: Final = 40
_BATCH_FIXED = struct.Struct("<8sII16s")  # the 32 bytes the header digest covers
_PAYLOAD_DIGEST_SIZE: Final = 16
_HEADER_DIGEST_SIZE: Final = 8

RECORD_CHECKSUM_SIZE: Final = 16
# Every record starts with these two bytes: fixarray of 6, then the key as bin 8.
_RECORD_START: Final = b"\x96\xc4"
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
_READ_BUFFER: Final = 1024 * 1024
_SCAN_CHUNK: Final = 1024 * 1024

_get_key = operator.itemgetter(0)
_get_value = operator.itemgetter(1)


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
    """

    record: Record
    offset: int
    length: int
    batch_offset: int
    recovered: bool = False


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


def _record_bytes(packer: msgpack.Packer, rec: Record) -> bytes:
    key, value, digests, func = rec.key, rec.value, rec.digests, rec.func
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
    body: bytes = packer.pack((key, value, func, float(rec.time), digests, _ZERO_CHECKSUM))
    signed = memoryview(body)[:-RECORD_CHECKSUM_SIZE]
    return b"".join((signed, blake3(signed).digest(RECORD_CHECKSUM_SIZE)))


def _frame(packer: msgpack.Packer, parts: list[bytes]) -> bytes:
    payload = b"".join([packer.pack_array_header(len(parts)), *parts])
    if len(payload) > _MAX_PAYLOAD_FIELD:
        raise ValueError(f"a record of {len(payload)} bytes is too large for one batch")
    fixed = _BATCH_FIXED.pack(
        BATCH_MAGIC, len(payload), len(parts), blake3(payload).digest(_PAYLOAD_DIGEST_SIZE)
    )
    return b"".join((fixed, blake3(fixed).digest(_HEADER_DIGEST_SIZE), payload))


def encode_batch(records: Sequence[Record]) -> bytes:
    """Frame ``records`` as they go to disk: one batch (several when very large).

    Pure and thread-safe, so callers may run it in a worker thread for large
    values. Raises ``TypeError`` for a record whose fields have the wrong types
    and ``ValueError`` for a single record too large for a batch (4 GiB).
    Returns ``b""`` for no records.
    """
    packer = msgpack.Packer(use_bin_type=True)  # one per call: Packer is not thread-safe
    return _frame_all(packer, [_record_bytes(packer, rec) for rec in records])


def _frame_all(packer: msgpack.Packer, raws: list[bytes]) -> bytes:
    """Packed records framed as batches, a new batch whenever one would pass the limit."""
    out: list[bytes] = []
    parts: list[bytes] = []
    size = 0
    for raw in raws:
        if parts and size + len(raw) > MAX_BATCH_PAYLOAD:
            out.append(_frame(packer, parts))
            parts, size = [], 0
        parts.append(raw)
        size += len(raw)
    if parts:
        out.append(_frame(packer, parts))
    return b"".join(out)


def file_header() -> bytes:
    """The 16-byte file header every segment starts with."""
    fixed = _FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, FILE_HEADER_SIZE)
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
    disk until the first :meth:`write_batch`, which creates the directory (and
    parents) and a new segment (``O_EXCL``, exclusively ``flock``-ed for as long
    as the writer keeps it open). Every call is safe to make from the event
    loop: file work runs in worker threads (aiofiles / ``asyncio.to_thread``).
    Concurrent calls are serialised; a cancelled call finishes its write in the
    background before the next one starts, so the file is never left in an
    unknown state.

    When a write fails, :meth:`write_batch` raises :class:`CheckpointError`
    (``unsaved`` = the batch's record count, chained from the ``OSError``) after
    cutting the segment back to its last complete batch (or, when even that
    fails, or when ``fsync`` failed, abandoning the segment: the next write
    starts a fresh one). Retrying the same records is therefore always correct.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Prefer :meth:`create`; this does no I/O either."""
        self._dir = Path(directory)
        self._file: Any = None  # aiofiles' AsyncFileIO (unbuffered) once opened
        self._path: Path | None = None
        self._offset = 0  # end of the last complete batch
        self._lock = asyncio.Lock()
        self._closed = False
        self._synced_dirs = False
        self._created_dirs: list[Path] = []
        self._stamp: str | None = None
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
            async with self._lock:
                try:
                    await self._open()
                except OSError as exc:
                    raise CheckpointError(
                        f"could not create a checkpoint segment in {self._dir}: {exc}"
                    ) from exc
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

    async def _open(self) -> None:
        created = await asyncio.to_thread(ensure_dir, self._dir)
        self._created_dirs.extend(created)
        for _ in range(5):
            name = segment_name(self._stamp)
            tmp = self._dir / f".{name}.tmp"
            try:
                f = await aiofiles.open(tmp, "xb", buffering=0)
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - five random 32-bit collisions in a row
            raise FileExistsError(errno.EEXIST, "could not pick a fresh segment name", str(tmp))
        try:
            # Lock before the file gets its real name: a compaction tool that
            # sees a ``seg-*.amlog`` name can trust ``flock`` to say it is live.
            await asyncio.to_thread(_lock_exclusive, f.fileno())
            await _write_and_sync(f.fileno(), file_header(), False)
            final = self._dir / name
            await aiofiles.os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                await f.close()
            with contextlib.suppress(Exception):
                await aiofiles.os.unlink(tmp)
            raise
        self._file, self._path, self._offset = f, final, FILE_HEADER_SIZE
        self._synced_dirs = False

    async def _abandon(self) -> None:
        f, self._file, self._path = self._file, None, None
        self._offset = 0
        if f is not None:
            with contextlib.suppress(Exception):
                await f.close()  # releases the flock; the segment stays readable

    async def _roll_back(self, offset: int, *, abandon: bool) -> None:
        f = self._file
        if f is None:
            return
        try:
            await asyncio.to_thread(os.ftruncate, f.fileno(), offset)
            await f.seek(offset)
        except OSError:
            abandon = True
        if abandon:
            await self._abandon()

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
        # big ones (many records or large values) go to a worker thread.
        total = sum(len(r.value) for r in records)
        if total > _INLINE_ENCODE_LIMIT or len(records) > _INLINE_ENCODE_RECORDS:
            data = await asyncio.to_thread(encode_batch, records)
        else:
            data = encode_batch(records)
        return await self.write_encoded(data, len(records), fsync=fsync)

    async def write_encoded(self, data: bytes, count: int, *, fsync: bool) -> int:
        """Append bytes made by :func:`encode_batch` (``count`` records); see :meth:`write_batch`."""
        if not data:
            return 0
        task = asyncio.ensure_future(self._write_locked(data, count, fsync))
        try:
            # Shielded: if our caller is cancelled, the write still completes
            # (or rolls back) under the lock before anything else touches the file.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_consume_result)
            raise

    async def _write_locked(self, data: bytes, count: int, fsync: bool) -> int:
        async with self._lock:
            if self._closed:
                raise CheckpointError(f"segment writer for {self._dir} is closed", unsaved=count)
            if self._file is None:
                try:
                    await self._open()
                except OSError as exc:
                    raise CheckpointError(
                        f"could not create a checkpoint segment in {self._dir}: {exc}",
                        unsaved=count,
                    ) from exc
            start = self._offset
            path = self._path
            try:
                # One trip to a worker thread for write + fsync (aiofiles' wrap):
                # a group commit's latency is what its callers wait for.
                await _write_and_sync(self._file.fileno(), data, fsync)
            except _FsyncFailed as exc:
                # After a failed fsync the kernel may have dropped dirty pages
                # and a later fsync can "succeed" without them: never trust
                # this segment again.
                await self._roll_back(start, abandon=True)
                raise CheckpointError(
                    f"could not fsync {count} records to {path}: {exc.__cause__}", unsaved=count
                ) from exc.__cause__
            except OSError as exc:
                await self._roll_back(start, abandon=False)
                raise CheckpointError(
                    f"could not write {count} records to {path}: {exc}", unsaved=count
                ) from exc
            if fsync and not self._synced_dirs:
                try:
                    await asyncio.to_thread(self._sync_dirs)
                    self._synced_dirs = True
                except OSError as exc:
                    await self._roll_back(start, abandon=True)
                    raise CheckpointError(
                        f"could not fsync {count} records to {path}: {exc}", unsaved=count
                    ) from exc
            self._offset = start + len(data)
            self.batches_written += 1
            self.records_written += count
            self.bytes_written += len(data)
            return len(data)

    def _sync_dirs(self) -> None:
        # The segment's directory entry, and the entries of every directory we
        # created on the way (each lives in its parent).
        fsync_dir(self._dir)
        for d in self._created_dirs:
            fsync_dir(d.parent)
        self._created_dirs.clear()

    async def sync(self) -> None:
        """fsync the current segment (for callers that wrote with ``fsync=False``)."""
        async with self._lock:
            if self._file is None:
                return
            try:
                await asyncio.to_thread(os.fsync, self._file.fileno())
                if not self._synced_dirs:
                    await asyncio.to_thread(self._sync_dirs)
                    self._synced_dirs = True
            except OSError as exc:
                await self._roll_back(self._offset, abandon=True)
                raise CheckpointError(f"could not fsync {self._dir}: {exc}") from exc

    async def close(self) -> None:
        """Close the segment (releasing its lock). Idempotent; later writes raise."""
        async with self._lock:
            self._closed = True
            f, self._file = self._file, None
            if f is not None:
                try:
                    await f.close()
                except OSError as exc:  # e.g. NFS reporting a deferred write error
                    raise CheckpointError(f"error closing {self._path}: {exc}") from exc


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


_write_and_sync = aiofiles.os.wrap(_write_then_sync)


def _consume_result(task: asyncio.Future[int]) -> None:
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
        if version != FORMAT_VERSION:
            return None, (
                f"unsupported checkpoint format version {version} (this is version {FORMAT_VERSION})"
            )
        if size >= FILE_HEADER_SIZE:
            return SegmentHeader(version, size), ""
    why = "damaged file header" if magic == FILE_MAGIC else "bad magic: not an aiomemo segment?"
    return SegmentHeader(FORMAT_VERSION, FILE_HEADER_SIZE), f"{why} (reading on as format 1)"


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
        """Offset of the next batch header at or after ``start`` whose digest verifies; size if none."""
        pos = start
        keep = BATCH_HEADER_SIZE - 1
        while pos < self.size:
            chunk = self.read(pos, _SCAN_CHUNK + keep)
            i = chunk.find(BATCH_MAGIC)
            while i != -1:
                if i + BATCH_HEADER_SIZE > len(chunk):
                    if pos + len(chunk) >= self.size:
                        return self.size  # a magic too close to the end: no header
                    break  # re-read it from the next window
                if _header_ok(chunk[i : i + BATCH_HEADER_SIZE]):
                    return pos + i
                i = chunk.find(BATCH_MAGIC, i + 1)
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


def _header_within(src: _Source, start: int, end: int) -> int:
    """Offset of the first sound batch header that starts in ``[start, end)``, or -1."""
    window = src.read(start, end - start + BATCH_HEADER_SIZE - 1)
    i = window.find(BATCH_MAGIC)
    while i != -1 and start + i < end:
        if _header_ok(window[i : i + BATCH_HEADER_SIZE]):
            return start + i
        i = window.find(BATCH_MAGIC, i + 1)
    return -1


def _check_record(obj: Any, raw: memoryview) -> Record | None:
    """The record ``obj`` unpacked from ``raw`` if it is well-formed and its checksum verifies."""
    if type(obj) is not tuple or len(obj) != 6:
        return None
    key, value, func, when, digests, checksum = obj
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
    return Record(key=key, value=value, func=func, time=when, digests=digests)


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

    Parses the six msgpack headers by hand, so a candidate made of garbage
    costs O(1) (every declared length is checked against ``limit`` before
    anything is read or hashed) and only a well-formed one is hashed.
    """
    if pos + 2 > limit or data[pos] != 0x96:
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
    After garbage it resynchronises on every later ``0x96 0xc4`` (the first
    two bytes of any record: a 6-array whose key is a bin 8), so one damaged
    record costs only itself.
    """
    view = memoryview(data)
    n = len(data)
    pos = 0
    if skip_array_header and n:
        # the payload's array header: fixarray, array 16 or array 32
        tag = data[0]
        pos = 1 if 0x90 <= tag <= 0x9F else 3 if tag == 0xDC else 5 if tag == 0xDD else 0
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
        pos = data.find(_RECORD_START, pos + 1)
        if pos == -1:
            break
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
                return
            why = (
                f"damaged batch at offset {pos} (payload checksum mismatch); "
                f"recovered {recovered} of {count} records"
            )
            first = spans[0][0] if spans else pos
            last = spans[-1][1] if spans else end
            yield ("bad", first, BadSpan(first, last - first, why, lost))
            pos = end
            continue
        # No trustworthy header here: a cut-short header at the end, or damage.
        if len(raw) < BATCH_HEADER_SIZE and BATCH_MAGIC.startswith(raw[:8][: len(raw)]):
            why = f"torn tail: batch header at offset {pos} cut short ({len(raw)} bytes)"
            yield ("bad", pos, BadSpan(pos, size - pos, why, 1, torn=True))
            return
        nxt = src.next_header(pos + 1)
        region = src.read(pos, nxt - pos)
        recovered, spans = yield from _recover(region, pos, pos, skip_array_header=False)
        # A damaged header alone (its records all verified) loses nothing; any
        # other stretch no header vouches for counts as one lost record.
        lost = sum(
            1 for a, b in spans if not (a == pos and b - a <= BATCH_HEADER_SIZE + 5 and recovered)
        )
        torn = nxt >= size and bool(spans) and spans[-1][1] >= size
        why = (
            f"{'torn tail' if torn and not recovered else 'damaged data'} at offset {pos} "
            f"({nxt - pos} bytes with no sound batch header); recovered {recovered} records"
        )
        first = spans[0][0] if spans else pos
        last = spans[-1][1] if spans else nxt
        yield ("bad", first, BadSpan(first, last - first, why, lost, torn=torn))
        pos = nxt


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
    path: str | os.PathLike[str], *, verify_records: bool = True
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
    """
    with _reading(path) as (src, header, problem):
        size = src.size
        if header is None:
            if problem:
                yield BadSpan(0, size, problem, 0, torn=size < FILE_HEADER_SIZE)
            return
        if problem:
            yield BadSpan(0, FILE_HEADER_SIZE, problem, 0)
        for kind, offset, item in _iter_batches(src, header.header_size):
            if kind == "batch":
                count, payload = item
                yield from _records_of_sound_batch(
                    offset, count, payload, verify_records=verify_records
                )
            else:
                yield item


def _records_of_sound_batch(
    offset: int, count: int, payload: bytes, *, verify_records: bool
) -> Iterator[RecordInfo | BadSpan]:
    body_at = offset + BATCH_HEADER_SIZE
    view = memoryview(payload)
    up = _unpacker(io.BytesIO(payload), len(payload))
    try:
        n = up.read_array_header()
    except Exception:
        n = -1
    if n != count:
        yield BadSpan(
            offset,
            BATCH_HEADER_SIZE + len(payload),
            f"batch at offset {offset}: record count mismatch ({n} != {count})",
            count,
        )
        return
    for _ in range(n):
        start = up.tell()
        try:
            obj = up.unpack()
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
    if type(obj) is not tuple or len(obj) != 6:
        return None
    key, value, func, when, digests, _ = obj
    if not (
        type(key) is bytes
        and type(value) is bytes
        and type(func) is str
        and type(when) is float
        and type(digests) is bytes
    ):
        return None
    return Record(key=key, value=value, func=func, time=when, digests=digests)


def _load_segment(path: Path, report: LoadReport) -> None:
    """Add segment ``path``'s records to ``report`` (later records override)."""
    table = report.table
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
            pos, n = _load_run(f, size, header.header_size, table)
            report.records += n
            if pos >= size:
                return
            # Something irregular at `pos`: the careful reader takes over.
            for kind, _offset, item in _iter_batches(src, pos):
                if kind == "batch":
                    count, payload = item
                    if _load_sound_batch(table, count, payload):
                        report.records += count
                    else:  # digest fine, contents not: a foreign or buggy writer
                        for rec in _records_of_sound_batch(
                            _offset, count, payload, verify_records=True
                        ):
                            if isinstance(rec, RecordInfo):
                                table[rec.record.key] = rec.record.value
                                report.records += 1
                            else:
                                report.skipped += rec.lost
                                report.errors.append(f"{shown}: {rec.reason}")
                elif kind == "record":
                    table[item.record.key] = item.record.value
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


def _load_run(f: IO[bytes], size: int, start: int, table: dict[bytes, bytes]) -> tuple[int, int]:
    """Load sound batches from ``start`` on, as fast as possible; stop at the first irregularity.

    Returns (offset reached, records loaded). Reads the file in big chunks and
    works on memoryview slices (no per-batch reads or copies). Anything
    irregular (bad magic, a digest mismatch, a torn tail, an odd payload)
    ends the run at that batch for :func:`_iter_batches` to handle.
    """
    fields = _BATCH_FIXED.unpack_from
    hsize = BATCH_HEADER_SIZE
    magic_expected = BATCH_MAGIC
    loaded = 0
    pos = start
    buf = b""
    view = memoryview(buf)
    base = pos  # file offset of buf[0]
    while pos < size:
        off = pos - base
        if off + hsize > len(buf):
            f.seek(pos)
            buf = f.read(min(_READ_BUFFER * 4, size - pos))
            view, base, off = memoryview(buf), pos, 0
            if len(buf) < hsize:
                break
        magic, length, count, digest = fields(buf, off)
        if magic != magic_expected:
            break
        body, end = off + hsize, off + hsize + length
        if end > len(buf):
            if pos + hsize + length > size:
                break  # torn tail
            f.seek(pos)
            buf = f.read(max(_READ_BUFFER * 4, hsize + length))
            view, base, off = memoryview(buf), pos, 0
            body, end = hsize, hsize + length
        payload = view[body:end]
        if (
            blake3(payload).digest(_PAYLOAD_DIGEST_SIZE) != digest
            or blake3(view[off : off + 32]).digest(_HEADER_DIGEST_SIZE)
            != buf[off + 32 : off + hsize]
        ):
            break
        if count == 1:
            # A batch of one (task_exit with little concurrency): skip the
            # list/map/set machinery, it costs more than the record.
            try:
                recs = _unpackb(payload, use_list=False, raw=True)
                rec = recs[0]
                ok = (
                    len(recs) == 1
                    and type(rec) is tuple
                    and len(rec) == 6
                    and type(rec[0]) is bytes
                    and type(rec[1]) is bytes
                )
            except Exception:
                ok = False
            if not ok:
                break
            table[rec[0]] = rec[1]
        elif not _load_sound_batch(table, count, payload):
            break
        loaded += count
        pos += hsize + length
    return pos, loaded


def _load_sound_batch(table: dict[bytes, bytes], count: int, payload: bytes | memoryview) -> bool:
    # The hot path: one C call to unpack, C-level maps to pull keys and values
    # out, one dict.update. raw=True leaves func names as bytes (never decoded).
    try:
        recs = msgpack.unpackb(payload, use_list=False, raw=True, strict_map_key=False)
        if type(recs) is not tuple or len(recs) != count:
            return False
        keys = list(map(_get_key, recs))
        values = list(map(_get_value, recs))
    except Exception:
        return False
    # Shape check at C speed: a wrong type here would put a non-bytes value
    # in the table (only a foreign writer could produce such a sound batch).
    if set(map(type, recs)) != {tuple} or set(map(len, recs)) != {6}:
        return False
    if set(map(type, keys)) != {bytes} or set(map(type, values)) != {bytes}:
        return False
    table.update(zip(keys, values, strict=True))
    return True


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


def load_paths(paths: Sequence[str | os.PathLike[str]]) -> LoadReport:
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
    """
    report = LoadReport()
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
                    _load_segment(path, report)
                elif not path.is_dir():
                    report.errors.append(f"{shown}: skipped: {r.problem}")
                # an empty directory holds nothing to load
                continue
            for seg in r.segments:
                _load_segment(seg, report)
        except OSError as exc:
            report.errors.append(f"{shown}: cannot read: {exc.strerror or exc}")
    return report
