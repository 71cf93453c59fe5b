"""Library functions behind ``aiomemo compact`` and ``aiomemo import-parsl``.

Part of the format layer: built on :mod:`aiomemo._checkpoint` (framing,
reader) and :mod:`aiomemo._paths` (the one path resolver, segment names,
opening without blocking on a FIFO), never on the stores or the Memoizer.
The ``aiomemo`` command only parses arguments, calls these and prints.

Both are synchronous (plain, blocking file I/O): from a coroutine, call them
through ``asyncio.to_thread``. Refusals and failures raise
:class:`~aiomemo.MaintenanceError` (``code`` 1 for a finding, 2 otherwise) or
:class:`~aiomemo.CheckpointPathError` for a path that holds no checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import mmap
import os
import pickle
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from blake3 import blake3

from aiomemo import _codec, _records
from aiomemo._checkpoint import (
    BadSpan,
    RecordInfo,
    encode_batch,
    file_header,
    fsync_dir,
    is_segment_in_use,
    iter_segment,
    read_value,
    segment_stamp,
)
from aiomemo._exceptions import CorruptCheckpointError, MaintenanceError
from aiomemo._paths import (
    PARSL_PICKLE,
    SEGMENT_SUFFIX,
    ResolvedPath,
    find_segments,
    new_stamp,
    open_fd,
    resolve,
    segment_name,
)
from aiomemo._records import Record, Tombstones, func_tombstone, key_tombstone
from aiomemo._rundir import ensure_dir, make_run_dir

__all__ = ["ProgressFn", "compact", "forget", "import_parsl", "scan_segments", "total_size"]

#: ``progress(done, total)`` in bytes; the CLI draws a bar from it
ProgressFn = Callable[[int, int], None]

_WRITE_CHUNK = 10_000  # records per batch when rewriting segments
_TMP_PREFIX = ".compact-"


# --------------------------------------------------------------------------
# Reading many segments
# --------------------------------------------------------------------------


def total_size(paths: Sequence[Path]) -> int:
    """Bytes the files take together (files that vanished count 0)."""
    total = 0
    for s in paths:
        with contextlib.suppress(OSError):
            total += s.stat().st_size
    return total


def scan_segments(
    segments: Sequence[Path],
    *,
    verify_records: bool,
    progress: ProgressFn | None = None,
    values: bool = True,
) -> Iterator[tuple[Path, int, RecordInfo | BadSpan]]:
    """(segment, its index, item) for every record and bad span, in load order.

    ``progress(done, total)`` is called now and then with bytes read so far.
    """
    total = total_size(segments) if progress is not None else 0
    base = 0
    n = 0
    for i, seg in enumerate(segments):
        for item in iter_segment(seg, verify_records=verify_records, values=values):
            n += 1
            if progress is not None and not n & 0x3FFF:
                progress(base + item.offset, total)
            yield seg, i, item
        if progress is not None:
            base += total_size([seg])
            progress(base, total)


# --------------------------------------------------------------------------
# compact
# --------------------------------------------------------------------------


def _compacted_name(segments: Sequence[Path]) -> str:
    """A name that sorts where the replaced segments did.

    The first replaced segment's stamp: every segment not replaced (one a
    writer starts during or after the compaction) has a later stamp, so it
    still sorts, and overrides, after the compacted one. While old and new
    segments coexist (a crash before the old ones are deleted), the old ones
    load after the new one and give the same values. Segments with names not
    made by aiomemo: right after the last one instead ("~" sorts after ".").
    """
    stamp = segment_stamp(segments[0])
    if stamp is not None:
        return segment_name(stamp)
    base = segments[-1].name[: -len(SEGMENT_SUFFIX)].split("~", 1)[0]
    return f"{base}~compacted-{new_stamp()}{SEGMENT_SUFFIX}"


@dataclass(frozen=True, slots=True)
class _Temp:
    path: Path
    fd: int  # holds an exclusive flock on the file until closed
    size: int
    digest: bytes  # blake3 of every byte written


#: value bytes read per batch when rewriting values left on disk (streaming)
_WRITE_BYTES = 64 * 1024 * 1024


def _chunks(records: Sequence[Record | RecordInfo], drop_damaged: bool) -> Iterator[list[Record]]:
    """``records`` in batches of at most 10,000 records and ~64 MiB of values.

    A :class:`RecordInfo` with a ``ref`` has its value read back here, one
    batch at a time, so a rewrite never holds more than a batch of values.
    A value that no longer reads back raises :class:`MaintenanceError`, or
    is left out with ``drop_damaged``.
    """
    batch: list[Record] = []
    size = 0
    for item in records:
        if isinstance(item, RecordInfo):
            rec = item.record
            if item.ref is not None:
                try:
                    value = read_value(item.ref)
                except CorruptCheckpointError as exc:
                    if drop_damaged:
                        continue
                    raise MaintenanceError(
                        f"{exc}; see `aiomemo verify`; pass --drop-damaged to compact "
                        "what still loads",
                        code=1,
                    ) from exc
                rec = Record(rec.key, value, rec.func, rec.time, rec.digests, rec.expires)
        else:
            rec = item
        batch.append(rec)
        size += len(rec.value)
        if len(batch) >= _WRITE_CHUNK or size >= _WRITE_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_temp_segment(
    directory: Path, records: Sequence[Record | RecordInfo], *, drop_damaged: bool = False
) -> _Temp:
    """Write ``records`` as one segment to a temp file in ``directory``; fsync it.

    The temp name starts with a dot, so loaders never read it; the returned
    fd keeps an exclusive flock on it (a later compaction sweeps only temp
    files nobody holds). Batches of 10,000 records.
    """
    tmp = directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    h = blake3()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with os.fdopen(os.dup(fd), "wb") as f:
            header = file_header()
            f.write(header)
            h.update(header)
            for chunk in _chunks(records, drop_damaged):
                data = encode_batch(chunk)
                del chunk
                f.write(data)
                h.update(data)
                del data
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return _Temp(tmp, fd, size, h.digest())


def _check_written(tmp: _Temp) -> None:
    """Read the fsynced temp segment back: the same bytes as were written."""
    h = blake3()
    n = 0
    with open(tmp.path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    if n != tmp.size or h.digest() != tmp.digest:
        raise MaintenanceError(
            f"{tmp.path}: the new segment does not read back as written; nothing replaced"
        )


def _publish(tmp: Path, final: Path) -> None:
    """Give the temp segment its real name, durably."""
    os.rename(tmp, final)
    fsync_dir(final.parent)


def _remove_old(segments: Sequence[Path], directory: Path) -> None:
    """Delete the segments the compacted one replaces, oldest first, each durably.

    The order matters: the compacted segment sorts where the oldest one did,
    so the segments still present after a crash must be the newest ones (a
    stale value left in an old segment is then always overridden by a later
    one). The directory is fsynced after each unlink so a power cut cannot
    persist the deletions out of order.
    """
    for s in segments:
        with contextlib.suppress(FileNotFoundError):
            s.unlink()
        fsync_dir(directory)


def _remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files of compactions that died (no process holds their lock)."""
    removed = []
    for p in directory.glob(f"{_TMP_PREFIX}*.tmp"):
        try:
            fd = open_fd(p)
        except OSError:
            continue  # vanished, or not a regular file: not ours to remove
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a compaction in progress
        else:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
        finally:
            os.close(fd)
    return removed


def _lock_segments(segments: Sequence[Path]) -> list[int]:
    """Take an exclusive flock on every segment (so no writer holds one); refuse otherwise."""
    fds: list[int] = []
    try:
        for s in segments:
            if is_segment_in_use(s):
                raise MaintenanceError(
                    f"{s}: a writer holds this segment open (a run is still checkpointing "
                    "here); compact once it has finished, or use -o OUT to write a copy"
                )
            fd = open_fd(s)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MaintenanceError(
                    f"{s}: another process holds this segment (a writer or another "
                    "compaction); try again later"
                ) from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def compact(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    drop_damaged: bool = False,
    progress: ProgressFn | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Rewrite the segments under ``path`` as one segment, newest record per key.

    "Newest" is load order: a later segment's record for a key wins, exactly
    as loading picks it, so the compacted segment loads to the same table.
    Records expired at ``now`` (default: the current time) and records a
    tombstone forgets are left out, as loading leaves them out. Tombstones are
    kept, always (the newest one per key and per function): they may forget
    records in checkpoint dirs this compaction does not see (other runs,
    copies), and each costs about a hundred bytes.

    In place (``out`` None; ``path`` must resolve to one checkpoint dir):
    refuses (:class:`~aiomemo.MaintenanceError`, code 2) while any segment is open in a writer,
    then locks every segment, writes the new segment to a temp file in the
    same dir, fsyncs it, reads it back, renames it into place (named with the
    first replaced segment's stamp, so segments started meanwhile still load
    after it), fsyncs the dir, and only then deletes the old segments, oldest
    first, fsyncing the dir after each. A crash at any step leaves either the
    old segments alone (plus an ignored temp file, removed by the next
    compaction) or the new segment and the newest old ones, which load to the
    same table.

    With ``out`` (a checkpoint dir, created if missing) the new segment is
    written there the same atomic way and the input is left alone; segments
    open in a writer are copied as they are now (a batch still being written
    is left out, not counted as damage).

    Damaged spans make it refuse (code 1) unless ``drop_damaged``: the
    compacted segment then holds what loads today, and the damaged bytes are
    gone with the old segments. Returns a JSON-ready summary.
    """
    resolved = find_segments(path, strict=True)
    assert resolved is not None  # strict: raises instead
    segments = list(resolved.segments)
    shown = os.fspath(path)
    target, fds = _compact_target(resolved, shown, out)
    try:
        live = {s for s in segments if out is not None and is_segment_in_use(s)}
        scan = _newest(segments, live, progress)
        if scan.bad and not drop_damaged:
            raise _damaged(shown, scan.bad)
        kept, dropped = _live_records(segments, scan.table, scan.tombs, now)
        records: list[Record | RecordInfo] = [*scan.newest_tombstones.values(), *kept]
        bytes_in = total_size(segments)
        tmp = _write_temp_segment(target, records, drop_damaged=drop_damaged)
        try:
            final = target / (segment_name() if out is not None else _compacted_name(segments))
            removed = _replace(tmp, final, segments if out is None else [])
        finally:
            os.close(tmp.fd)
    finally:
        for fd in fds:
            os.close(fd)
    return {
        "input": shown,
        "output": os.fspath(final),
        "in_place": out is None,
        "segments_in": len(segments),
        "records_in": scan.records_in,
        "records_out": len(records),
        "expired_dropped": dropped["expired"],
        "forgotten_dropped": dropped["forgotten"],
        "tombstones_kept": len(scan.tombs),
        "bytes_in": bytes_in,
        "bytes_out": tmp.size,
        "damaged_spans_dropped": len(scan.bad),
        "segments_in_use": len(live),
        "tails_in_flight": scan.in_flight,
        "removed": [os.fspath(p) for p in removed],
        "skipped_files": list(resolved.notes),  # non-regular entries named like segments
    }


def _compact_target(
    resolved: ResolvedPath, shown: str, out: str | os.PathLike[str] | None
) -> tuple[Path, list[int]]:
    """Where the compacted segment goes, and the locks held on the segments it replaces.

    In place: the one checkpoint dir, every segment locked (refused while a
    writer holds one). With ``out``: that dir (created), nothing locked.
    """
    if out is None:
        if resolved.kind == "segment" or len(resolved.checkpoint_dirs) != 1:
            what = "a segment file" if resolved.kind == "segment" else "several checkpoint dirs"
            raise MaintenanceError(
                f"{shown}: is {what}; compacting in place needs one checkpoint dir "
                "(or run dir): pass it, or write a copy with -o OUT"
            )
        target = resolved.checkpoint_dirs[0]
        _remove_stale_temps(target)
        return target, _lock_segments(resolved.segments)
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise MaintenanceError(f"{os.fspath(out)}: exists and is not a directory")
    if target.is_dir() and any(
        os.path.samefile(target, d) for d in resolved.checkpoint_dirs if d.is_dir()
    ):
        raise MaintenanceError(
            f"{os.fspath(out)}: is the input's own checkpoint dir; to compact in place, "
            "leave out -o"
        )
    ensure_dir(target)
    return target, []


@dataclass(slots=True)
class _Newest:
    """The newest record per key of some segments (values left on disk as references).

    Tombstones go apart: every one is noted, the newest per key / function kept.
    """

    table: dict[bytes, RecordInfo] = field(default_factory=dict)
    tombs: Tombstones = field(default_factory=Tombstones)
    newest_tombstones: dict[tuple[str | None, bytes | str], Record] = field(default_factory=dict)
    bad: list[BadSpan] = field(default_factory=list)
    records_in: int = 0
    in_flight: int = 0  # torn tails of segments a writer holds: batches being written


def _newest(segments: Sequence[Path], live: set[Path], progress: ProgressFn | None) -> _Newest:
    # values left on disk are kept as references and read back while
    # writing, a batch at a time: compacting never holds them all
    out = _Newest()
    for seg, _i, item in scan_segments(
        segments, verify_records=True, progress=progress, values=False
    ):
        if isinstance(item, BadSpan):
            if item.torn and seg in live:
                out.in_flight += 1  # a writer's batch still being written: not damage
            else:
                out.bad.append(item)
        else:
            out.records_in += 1
            rec = item.record
            if out.tombs.add(rec):  # the newest tombstone per key / function is kept
                slot = (rec.tombstone, rec.key if rec.tombstone == "key" else rec.func)
                prev = out.newest_tombstones.get(slot)
                if prev is None or rec.time > prev.time:
                    out.newest_tombstones[slot] = rec
            else:
                out.table[rec.key] = item
    return out


def _damaged(shown: str, bad: Sequence[BadSpan]) -> MaintenanceError:
    """compact's refusal (code 1) of damaged spans."""
    lost = sum(b.lost for b in bad)
    return MaintenanceError(
        f"{shown}: {len(bad)} damaged span(s) ({lost} record(s) lost) found; "
        "see `aiomemo verify`; pass --drop-damaged to compact what still loads",
        code=1,
    )


def _check_and_publish(tmp: _Temp, final: Path) -> None:
    """Read the temp segment back (deleted if it does not read back), then name it ``final``."""
    try:
        _check_written(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.path.unlink()
        raise
    _publish(tmp.path, final)


def _replace(tmp: _Temp, final: Path, old: Sequence[Path]) -> list[Path]:
    """Check the temp segment, give it its ``final`` name, then delete the ``old`` segments."""
    _check_and_publish(tmp, final)
    removed = [s for s in old if s != final]
    _remove_old(removed, final.parent)
    return removed


def _live_records(
    segments: Sequence[Path],
    table: dict[bytes, RecordInfo],
    tombs: Tombstones,
    now: float | None,
) -> tuple[list[RecordInfo], dict[str, int]]:
    """What loading keeps: per key the last record (load order) no tombstone forgets, if unexpired.

    ``table`` holds the last record per key; when a tombstone forgets it, an
    earlier record of the key that it does not forget may still stand, so the
    segments are read again (no values) for those keys only.
    """
    when = _records.clock() if now is None else now
    dropped = {"expired": 0, "forgotten": 0}
    if tombs:
        redo = {k for k, info in table.items() if tombs.forgets(info.record)}
        if redo:
            for k in redo:
                del table[k]
            for _seg, _i, item in scan_segments(segments, verify_records=True, values=False):
                if isinstance(item, RecordInfo) and item.record.key in redo:
                    rec = item.record
                    if rec.tombstone is None:
                        if tombs.forgets(rec):
                            dropped["forgotten"] += 1
                        else:
                            table[rec.key] = item
    out = []
    for info in table.values():
        if info.record.expires <= when:
            dropped["expired"] += 1
        else:
            out.append(info)
    return out, dropped


# --------------------------------------------------------------------------
# import-parsl
# --------------------------------------------------------------------------


def _import_sources(
    runinfo: str | os.PathLike[str], out: str | os.PathLike[str] | None, *, trust: bool
) -> tuple[list[Path], Path | None]:
    """The pickles to import and the runinfo root; refused without ``trust`` or a destination."""
    root = Path(runinfo)
    if not root.exists():
        raise MaintenanceError(f"{os.fspath(runinfo)}: no such file or directory")
    pickles, runinfo_root = _find_pickles(root)
    if not pickles:
        raise MaintenanceError(
            f"{os.fspath(runinfo)}: no Parsl checkpoint ({PARSL_PICKLE}) found here"
        )
    if not trust:
        raise MaintenanceError(
            f"refusing to read {len(pickles)} Parsl pickle file(s) without --trust: unpickling "
            "runs code stored in the file, so only import checkpoints you (or someone you "
            "trust) wrote"
        )
    if out is None and runinfo_root is None:
        raise MaintenanceError(
            f"{os.fspath(runinfo)}: is not a runinfo root; say where the converted "
            "checkpoint goes with -o OUT"
        )
    return pickles, runinfo_root


def _write_import(
    records: Sequence[Record], out: str | os.PathLike[str] | None, runinfo_root: Path | None
) -> tuple[Path | None, Path | None]:
    """Write the imported records as one segment (atomically): (its dir, its path).

    Into ``out``, or a new numbered run under ``runinfo_root``; (None, None)
    when there is nothing to write.
    """
    target: Path | None = None
    if out is not None:
        target = Path(out)
        if target.exists() and not target.is_dir():
            raise MaintenanceError(f"{os.fspath(out)}: exists and is not a directory")
    if not records:
        return None, None
    if target is None:
        assert runinfo_root is not None
        target = make_run_dir(runinfo_root) / "checkpoint"
    ensure_dir(target)
    tmp = _write_temp_segment(target, records)
    try:
        _check_written(tmp)
        final = target / segment_name()
        _publish(tmp.path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.path.unlink()
        raise
    finally:
        os.close(tmp.fd)
    return target, final


def _find_pickles(path: Path) -> tuple[list[Path], Path | None]:
    """The ``tasks.pkl`` files under ``path`` and the runinfo root (None if not a root)."""
    r = resolve(path)
    if r.kind == "segment" or (r.kind == "none" and path.is_file()):
        raise MaintenanceError(f"{path}: not a Parsl checkpoint (expected {PARSL_PICKLE})")
    return list(r.pickles), (path if r.kind == "runinfo root" else None)


@dataclass(slots=True)
class _ImportCounts:
    entries: int = 0
    unencodable: int = 0
    malformed: int = 0
    unreadable: list[str] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)


def _next_pickle(mm: mmap.mmap, marker: bytes, start: int) -> int:
    """Offset of the next pickle that starts like the file's first one, or -1."""
    return mm.find(marker, start) if marker else -1


def _read_pickle_stream(
    pkl: Path,
    counts: _ImportCounts,
    into: dict[bytes, Record],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Add the entries of one ``tasks.pkl`` (a stream of pickled dicts) to ``into``.

    An entry that cannot be unpickled (e.g. its result's class is not
    importable here) is reported with its offset and skipped: reading goes on
    at the next offset where a pickle of the same protocol starts.
    """
    st = pkl.stat()
    when, size = st.st_mtime, st.st_size
    if not size:
        return
    # open_fd: a FIFO swapped in after the listing fails instead of blocking
    with (
        os.fdopen(open_fd(pkl), "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
    ):
        head = mm[:3]
        # protocol >= 4 dumps start with PROTO n, FRAME; 2 and 3 with PROTO n
        marker = head if head[:1] == b"\x80" and head[2:3] == b"\x95" else head[:2]
        if marker[:1] != b"\x80":
            marker = b""
        at = 0
        while at < size:
            f.seek(at)
            try:
                entry = pickle.load(f)  # the user passed --trust
            except EOFError:
                counts.unreadable.append(f"{pkl}: offset {at}: cut short (torn tail)")
                return
            except Exception as exc:
                nxt = _next_pickle(mm, marker, at + 1)
                skipped = "the rest of the file" if nxt < 0 else f"{nxt - at} bytes"
                counts.unreadable.append(
                    f"{pkl}: offset {at}: cannot unpickle ({type(exc).__name__}: {exc}); "
                    f"skipped {skipped}"
                )
                if nxt < 0:
                    return
                at = nxt
                continue
            at = f.tell()
            counts.entries += 1
            _add_entry(entry, when, counts, into)
            if progress is not None:
                progress(at)


def _offset_progress(progress: ProgressFn, base: int, total: int, offset: int) -> None:
    progress(base + offset, total)


def _add_entry(entry: Any, when: float, counts: _ImportCounts, into: dict[bytes, Record]) -> None:
    h = entry.get("hash") if isinstance(entry, dict) else None
    if (
        not isinstance(h, str)
        or len(h) != 32
        or entry.get("exception") is not None
        or "result" not in entry
    ):
        counts.malformed += 1
        return
    try:
        key = bytes.fromhex(h)
    except ValueError:
        counts.malformed += 1
        return
    try:
        value = _codec.encode(entry["result"])
    except _codec.UnencodableResultError as exc:
        counts.unencodable += 1
        tname = exc.type_name or type(entry["result"]).__name__
        counts.types[tname] = counts.types.get(tname, 0) + 1
        return
    into.pop(key, None)  # keep file order: the newest entry last
    into[key] = Record(key=key, value=value, func="parsl:?", time=when)


def import_parsl(
    runinfo: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    trust: bool,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Convert Parsl's pickled ``tasks.pkl`` checkpoints into one aiomemo segment.

    ``runinfo`` is a runinfo root (every ``NNN/checkpoint/tasks.pkl``, oldest
    run first), a run or checkpoint dir, or a ``tasks.pkl``. Each entry
    becomes a record keyed by Parsl's md5 (16 bytes; a Memoizer made with
    ``parsl_keys=True`` looks misses up under it) with func ``"parsl:?"``
    (Parsl does not record it) and the file's mtime as its time; a later
    entry for a key replaces an earlier one, as Parsl's loader does. Results
    aiomemo's codec refuses are skipped and counted by type.

    Output: ``out`` (a checkpoint dir), or by default a new numbered run
    ``<runinfo>/NNN/checkpoint`` so the Memoizer's default
    ``get_all_checkpoints`` finds it. Written atomically (temp, fsync, rename).

    Unpickling runs code from the file: without ``trust`` this raises
    :class:`~aiomemo.MaintenanceError` before opening any pickle.
    """
    pickles, runinfo_root = _import_sources(runinfo, out, trust=trust)
    counts = _ImportCounts()
    table: dict[bytes, Record] = {}
    total = total_size(pickles)
    base = 0
    for pkl in pickles:
        report = None
        if progress is not None:
            report = functools.partial(_offset_progress, progress, base, total)
        _read_pickle_stream(pkl, counts, table, report)
        base += total_size([pkl])
    records = list(table.values())
    target, final = _write_import(records, out, runinfo_root)
    return {
        "input": [os.fspath(p) for p in pickles],
        "output_dir": os.fspath(target) if target is not None else None,
        "segment": os.fspath(final) if final is not None else None,
        "entries": counts.entries,
        "imported": len(records),
        "skipped_unencodable": counts.unencodable,
        "unencodable_types": counts.types,
        "skipped_malformed": counts.malformed,
        "unreadable": counts.unreadable,
    }


# --------------------------------------------------------------------------
# forget
# --------------------------------------------------------------------------


def _same_args(recorded: bytes, wanted: bytes) -> bool:
    """The argument digests of a record (its ``digests``) match ``wanted`` (``arg_digests``)."""
    try:
        a = msgpack.unpackb(recorded, raw=False, strict_map_key=False)
        b = msgpack.unpackb(wanted, raw=False, strict_map_key=False)
    except Exception:
        return False
    return (
        isinstance(a, list) and isinstance(b, list) and len(a) >= 2 and len(b) >= 2
        and a[:2] == b[:2]
    )


def forget(
    path: str | os.PathLike[str],
    *,
    func: str,
    keys: set[bytes] | None = None,
    arg_digests: bytes | None = None,
    before: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
    unknown: Callable[[str, set[str]], Exception] | None = None,
) -> dict[str, Any]:
    """Forget the records of function ``func`` under ``path`` (offline); return a summary.

    Every record of ``func`` written at or before ``before`` (default: now)
    is forgotten; with ``keys`` / ``arg_digests`` only the calls with one of
    those keys or those argument digests (``--args``/``--kwargs``). Nothing
    is rewritten: a tombstone segment (see :mod:`aiomemo._records`) is added
    to each checkpoint dir that holds such records, written to a temp file,
    fsynced, read back, renamed into place and the dir fsynced; a crash at
    any point leaves either no tombstone or the whole segment, and every
    checkpoint loads (the forgotten records drop out at load; ``compact``
    removes them from disk).

    Refuses (:class:`~aiomemo.MaintenanceError`, code 2; nothing written)
    while a writer holds a segment, and when ``func`` has no records at all
    (``unknown(name, known_names)`` makes that error: the CLI's names a
    close match). ``removed`` counts the records a load gives today that it
    would no longer give (one per key); ``dry_run`` only counts.
    """
    resolved = find_segments(path, strict=True)
    assert resolved is not None
    segments = list(resolved.segments)
    shown = os.fspath(path)
    for s in segments:
        if is_segment_in_use(s):
            raise MaintenanceError(
                f"{s}: a writer holds this segment open (a run is still checkpointing here); "
                "forget once it has finished"
            )
    when = _records.clock() if now is None else now
    upto = when if before is None else before
    tombs, names, last = _last_of_func(segments, func)
    if func not in names:
        if unknown is not None:
            raise unknown(func, names)
        raise MaintenanceError(f"{shown}: no records of {func}")
    hits: dict[Path, set[bytes]] = {}
    for key, (directory, rec) in last.items():
        if tombs.forgets(rec) or rec.expires <= when or rec.time > upto:
            continue  # not live today, or written after the cut-off
        if keys is not None or arg_digests is not None:
            by_key = keys is not None and key in keys
            by_args = arg_digests is not None and _same_args(rec.digests, arg_digests)
            if not (by_key or by_args):
                continue
        hits.setdefault(directory, set()).add(key)
    removed = sum(len(v) for v in hits.values())
    written: list[str] = []
    if not dry_run:
        for directory, ks in hits.items():
            if keys is None and arg_digests is None:
                recs = [func_tombstone(func, upto)]
            else:
                recs = [key_tombstone(k, func, upto) for k in sorted(ks)]
            written.append(os.fspath(_write_tombstones(directory, recs)))
    return {
        "input": shown,
        "func": func,
        "before": upto,
        "removed": removed,
        "dry_run": dry_run,
        "segments_written": written,
        "checkpoint_dirs": len(hits),
    }


def _last_of_func(
    segments: Sequence[Path], func: str
) -> tuple[Tombstones, set[str], dict[bytes, tuple[Path, Record]]]:
    """Every tombstone, every function named, and ``func``'s last record per key (and its dir)."""
    tombs = Tombstones()
    names: set[str] = set()
    last: dict[bytes, tuple[Path, Record]] = {}  # key -> last record of func (load order)
    for seg, _i, item in scan_segments(segments, verify_records=True, values=False):
        if not isinstance(item, RecordInfo):
            continue
        rec = item.record
        if tombs.add(rec):
            continue
        names.add(rec.func)
        if rec.func == func:
            last[rec.key] = (seg.parent, rec)
    return tombs, names, last


def _write_tombstones(directory: Path, records: list[Record]) -> Path:
    """A new segment holding ``records`` in ``directory``, atomically and durably."""
    tmp = _write_temp_segment(directory, records)
    try:
        final = directory / segment_name()
        _check_and_publish(tmp, final)
    finally:
        os.close(tmp.fd)
    return final
