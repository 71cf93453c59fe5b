"""Size and age budgets for checkpoints: the library behind ``aiomemo gc``.

Part of the format layer, beside :mod:`aiomemo._maintenance` (whose crash-safe
rewrite it reuses: temp segment, fsync, read back, rename, old segments
deleted oldest first). ``Memoizer(retention=...)`` runs the same policy.

What a run removes, in this order:

1. records loading would never return: older copies of a key (a later
   record wins), records a tombstone forgets, records that have expired;
2. records written before ``now - max_age``;
3. the least recently *written* records (by record time) until the segment
   files under the path take at most ``max_bytes``.

Tombstones are kept (the newest per key and per function), as ``compact``
keeps them: they may forget records in checkpoints this run does not see.

Crash safety: checkpoint dirs are rewritten one at a time in load order, each
as ``compact`` rewrites one. For every key the records still on disk at any
moment are those kept plus a load-order suffix of the ones it had, so a
kill -9 at any point loads to the table before the run or a step closer to
the one after it, never to an older value of a key.

Segments a writer holds: :func:`gc` refuses (the CLI), or with
``held="skip"`` (the Memoizer) leaves them, and every later segment of their
dir, as they are; a key with a record in such a segment keeps its newest
record. Segments in ``pinned`` are left the same way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from aiomemo import _records
from aiomemo._checkpoint import (
    FORMAT_VERSION,
    MAX_BATCH_PAYLOAD,
    SEGMENT_SUFFIX,
    BadSpan,
    RecordInfo,
    is_segment_in_use,
    read_segment_header,
)
from aiomemo._exceptions import CorruptCheckpointError, MaintenanceError
from aiomemo._maintenance import (
    ProgressFn,
    _check_and_publish,
    _compacted_name,
    _lock_segments,
    _remove_old,
    _remove_stale_temps,
    _write_temp_segment,
    scan_segments,
    total_size,
)
from aiomemo._paths import ResolvedPath, find_segments, unique_segments
from aiomemo._records import Record, Tombstones, ValueRef

__all__ = ["GcPlan", "apply_gc", "gc", "parse_age", "parse_size", "plan_gc"]

# --------------------------------------------------------------------------
# Sizes and ages
# --------------------------------------------------------------------------

#: decimal (kB, MB, GB, TB: powers of 1000) and binary (KiB, MiB, GiB, TiB: 1024) units
SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
#: seconds per unit of an age: s, m (minutes), h, d, w
AGE_UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_AGE_PART = re.compile(r"(\d+(?:\.\d+)?)([a-z]+)", re.IGNORECASE)


def parse_size(value: str | int, what: str = "max-bytes") -> int:
    """``"500MB"``, ``"10GiB"``, ``"1.5GB"`` or plain bytes (``"1000"``, an int) -> bytes.

    Raises :class:`~aiomemo.MaintenanceError` (code 2) naming ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise MaintenanceError(f"{what}: expected a size such as 500MB or 10GiB, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise MaintenanceError(f"{what}: a size cannot be negative ({value})")
        return value
    m = _SIZE.fullmatch(value)
    unit = m.group(2).lower() if m else ""
    if m is None or (unit not in SIZE_UNITS and unit != ""):
        hint = ""
        if m is not None and unit in ("k", "m", "g", "t"):
            hint = f" (say {m.group(1)}{unit.upper()}B for powers of 1000 or {m.group(1)}{unit.upper()}iB for 1024)"
        raise MaintenanceError(
            f"{what}: {value!r} is not a size; use bytes or a number with B, kB, MB, GB, TB "
            f"(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 500MB, 10GiB{hint}"
        )
    n = float(m.group(1)) * SIZE_UNITS[unit or "b"]
    if not math.isfinite(n):
        raise MaintenanceError(f"{what}: {value!r} is too large")
    return int(n)


def parse_age(value: str | float | _dt.timedelta, what: str = "max-age") -> float:
    """``"30d"``, ``"12h"``, ``"1d12h"``, ``"90m"``, ``"2w"``, seconds, or a timedelta -> seconds (> 0).

    Raises :class:`~aiomemo.MaintenanceError` (code 2) naming ``what``.
    """
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MaintenanceError(f"{what}: expected an age such as 30d or 12h, not {value!r}")
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _AGE_PART.findall(text)
            if (
                not parts
                or "".join(n + u for n, u in parts) != text.replace(" ", "")
                or any(u.lower() not in AGE_UNITS for _, u in parts)
            ):
                raise MaintenanceError(
                    f"{what}: {value!r} is not an age; use a number with s, m, h, d or w "
                    "(seconds, minutes, hours, days, weeks), e.g. 30d, 12h, 1d12h"
                ) from None
            seconds = sum(float(n) * AGE_UNITS[u.lower()] for n, u in parts)
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise MaintenanceError(f"{what}: an age must be a positive duration, not {value!r}")
    return seconds


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------

#: bytes a record of an older format may grow by when rewritten in the
#: current one, so estimates never fall short (format 4 with expiries: a
#: format-2 record gains its expiry, 9 bytes, and its tail's headers, 3-4)
_RECORD_SLACK = 16
_BATCH_OVERHEAD = 64  # batch header (40) + array header, rounded up
_FILE_HEADER = 16
_CHUNK_RECORDS = 10_000
_CHUNK_VALUE_BYTES = 64 * 1024 * 1024

Reason = Literal["superseded", "forgotten", "expired", "too_old", "over_budget"]
REASONS: tuple[Reason, ...] = ("superseded", "forgotten", "expired", "too_old", "over_budget")


#: a record as the plan keeps it, a plain tuple (the cyclic garbage collector
#: stops tracking a tuple of plain values, so a million cost no GC pauses; a
#: NamedTuple or a dataclass would be tracked, and every full collection
#: would walk them all):
#: (segment index, load order, bytes when rewritten (at most), packed length,
#:  key, value, func, time, digests, expires, ValueRef fields or None)
_Item = tuple[
    int, int, int, int, bytes, bytes, str, float, bytes, float,
    tuple[str, int, int, bytes] | ValueRef | None,
]  # fmt: skip
_I_SEG: Final = 0
_I_ORDER: Final = 1
_I_SIZE: Final = 2
_I_LEN: Final = 3
_I_KEY: Final = 4
_I_VALUE: Final = 5
_I_FUNC: Final = 6
_I_TIME: Final = 7
_I_DIGESTS: Final = 8
_I_EXPIRES: Final = 9
_I_REF: Final = 10


def _item(info: RecordInfo, seg: int, order: int, slack: int) -> _Item:
    r, ref = info.record, info.ref
    refs: tuple[str, int, int, bytes] | ValueRef | None = None
    if ref is not None:  # (a reference with fallbacks kept whole: rare, and read with them)
        refs = ref if ref.prev is not None else (ref.path, ref.offset, ref.length, ref.digest)
    return (
        seg, order, _size_of(info, slack), info.length,
        r.key, r.value, r.func, r.time, r.digests, r.expires, refs,
    )  # fmt: skip


def _ref_length(ref: tuple[str, int, int, bytes] | ValueRef | None) -> int:
    if ref is None:
        return 0
    return ref[2] if isinstance(ref, tuple) else ref.length


def _info(it: _Item) -> RecordInfo:
    """The record again, as the rewrite takes it (a value in a frame by reference)."""
    rec = Record(it[_I_KEY], it[_I_VALUE], it[_I_FUNC], it[_I_TIME], it[_I_DIGESTS], it[_I_EXPIRES])
    ref = it[_I_REF]
    if isinstance(ref, tuple):
        ref = ValueRef(*ref)
    return RecordInfo(rec, 0, it[_I_LEN], 0, ref=ref)


@dataclass(slots=True)
class _Dir:
    """One checkpoint dir: the segments rewritten (a prefix) and those left alone."""

    path: Path
    rewrite: list[Path] = field(default_factory=list)
    fixed: list[Path] = field(default_factory=list)
    keep: list[_Item] = field(default_factory=list)
    dropped: int = 0
    changed: bool = False  # rewritten by apply_gc
    seen: dict[Path, tuple[int, int]] = field(default_factory=dict)  # (inode, size) read


@dataclass(slots=True)
class GcPlan:
    """What a gc run removes and keeps (:func:`plan_gc`), applied by :func:`apply_gc`.

    ``evicted`` holds the raw keys whose live record is removed (too old,
    over budget or expired): a Memoizer drops those from its table first.
    """

    path: str
    now: float
    max_bytes: int | None
    max_age: float | None
    dirs: list[_Dir]
    segments: list[Path]
    removed: dict[str, int]
    evicted: set[bytes]
    records_in: int
    records_out: int
    tombstones: int
    bytes_in: int
    bytes_estimate: int
    held: list[str]
    notes: list[str]

    def summary(self, *, dry_run: bool, bytes_out: int | None = None) -> dict[str, Any]:
        """A JSON-ready account of the run (``bytes_out``: measured after applying)."""
        out = self.bytes_estimate if bytes_out is None else bytes_out
        return {
            "input": self.path,
            "dry_run": dry_run,
            "max_bytes": self.max_bytes,
            "max_age": self.max_age,
            "segments_in": len(self.segments),
            "records_in": self.records_in,
            "bytes_in": self.bytes_in,
            "removed": dict(self.removed),
            "records_removed": sum(self.removed.values()),
            "records_out": self.records_out,
            "tombstones_kept": self.tombstones,
            "bytes_out": out,
            "bytes_out_estimated": bytes_out is None,
            "bytes_freed": self.bytes_in - out,
            "budget_met": self.max_bytes is None or out <= self.max_bytes,
            "dirs_rewritten": [os.fspath(d.path) for d in self.dirs if d.changed],
            "segments_held": list(self.held),
            "skipped_files": list(self.notes),
        }


def _size_of(info: RecordInfo, slack: int) -> int:
    n = info.length + slack
    if info.ref is not None:
        n += 40 + info.ref.length  # its value frame
    return n


def _slack(seg: Path) -> int:
    try:
        version = read_segment_header(seg).version
    except (OSError, CorruptCheckpointError):
        return _RECORD_SLACK
    return 0 if version >= FORMAT_VERSION else _RECORD_SLACK


def _segment_bytes(items: Sequence[_Item]) -> int:
    """An upper bound on the bytes of one segment holding ``items``."""
    if not items:
        return 0
    values = sum(_ref_length(i[_I_REF]) for i in items)
    inline = sum(i[_I_LEN] for i in items)
    batches = (
        2
        + len(items) // _CHUNK_RECORDS
        + values // _CHUNK_VALUE_BYTES
        + inline // MAX_BATCH_PAYLOAD
    )
    return _FILE_HEADER + batches * _BATCH_OVERHEAD + sum(i[_I_SIZE] for i in items)


def _dirs_of(
    segments: Sequence[Path], held: Literal["refuse", "skip"], pinned: Collection[str]
) -> tuple[list[_Dir], set[int], list[str]]:
    """Group segments by dir (load order); the fixed ones: held, pinned, or after those."""
    dirs: dict[Path, _Dir] = {}
    fixed: set[int] = set()
    held_names: list[str] = []
    pins = {os.path.realpath(p) for p in pinned}
    for i, seg in enumerate(segments):
        d = dirs.setdefault(seg.parent, _Dir(seg.parent))
        in_use = is_segment_in_use(seg)
        if in_use:
            if held == "refuse":
                raise MaintenanceError(
                    f"{seg}: a writer holds this segment open (a run is still checkpointing "
                    "here); run gc once it has finished"
                )
            held_names.append(os.fspath(seg))
        if d.fixed or in_use or os.path.realpath(seg) in pins:
            d.fixed.append(seg)
            fixed.add(i)
        else:
            d.rewrite.append(seg)
            with contextlib.suppress(OSError):
                st = seg.stat()
                d.seen[seg] = (st.st_ino, st.st_size)
    return list(dirs.values()), fixed, held_names


def _resolve_one(path: str | os.PathLike[str]) -> ResolvedPath:
    resolved = find_segments(path, strict=False)
    if resolved is None:
        if not Path(path).is_dir():
            find_segments(path, strict=True)  # raises, naming what is wrong
        resolved = ResolvedPath(Path(path), "none")  # a dir gc emptied: nothing to do
    return resolved


def plan_gc(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    max_bytes: int | str | None = None,
    max_age: float | str | _dt.timedelta | None = None,
    now: float | None = None,
    held: Literal["refuse", "skip"] = "refuse",
    pinned: Collection[str] = (),
    progress: ProgressFn | None = None,
    verify: bool = True,
) -> GcPlan:
    """Decide what a gc run removes (reads only; nothing is changed).

    Raises :class:`~aiomemo.MaintenanceError`: bad budgets (code 2), a
    segment a writer holds (with ``held="refuse"``, code 2), damaged spans
    in a segment it would rewrite (code 1: see ``aiomemo verify``).
    ``verify``: check every record's own checksum too (as ``compact`` does),
    not only each batch's digest (as loading does).
    """
    budget = None if max_bytes is None else parse_size(max_bytes)
    age = None if max_age is None else parse_age(max_age)
    shown, resolved = _resolve(path)
    when = _records.clock() if now is None else now
    segments = list(resolved.segments)
    dirs, fixed, held_names = _dirs_of(segments, held, pinned)
    dir_no = [next(n for n, d in enumerate(dirs) if d.path == s.parent) for s in segments]
    scan = _scan(shown, segments, dir_no, fixed, verify, progress)
    removed: dict[str, int] = dict.fromkeys(REASONS, 0)
    if scan.tombs:
        removed["forgotten"] = _unforget(scan, segments, fixed, verify)
    winners, evicted = _by_reason(scan, fixed, when, age, removed)
    tomb_keep = [it for it in scan.newest_tomb.values() if it[_I_SEG] not in fixed]
    fixed_bytes = total_size([segments[i] for i in sorted(fixed)])
    movable = [it for it in winners if it[_I_SEG] not in fixed]
    if budget is not None:
        movable = _fit_budget(
            movable, tomb_keep, scan.fixed_keys, fixed_bytes, dir_no, budget, evicted, removed
        )
    total = fixed_bytes + _keep_per_dir(dirs, dir_no, [*movable, *tomb_keep], scan, budget)
    dropped = sum(d.dropped for d in dirs)
    removed["superseded"] = max(0, dropped - sum(removed.values()))
    return GcPlan(
        path=shown,
        now=when,
        max_bytes=budget,
        max_age=age,
        dirs=dirs,
        segments=segments,
        removed=removed,
        evicted=evicted,
        records_in=scan.records_in,
        records_out=scan.records_in - dropped,
        tombstones=len(scan.newest_tomb),
        bytes_in=total_size(segments),
        bytes_estimate=total,
        held=held_names,
        notes=list(resolved.notes),
    )


def _resolve(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> tuple[str, ResolvedPath]:
    """``path`` as shown in messages, and its segments (of each path, each once)."""
    if isinstance(path, str | os.PathLike):
        shown = os.fspath(path)
        resolved = _resolve_one(path)
    else:  # several paths (the Memoizer's): the segments of each, each once
        shown = ", ".join(os.fspath(p) for p in path)
        found = [_resolve_one(p) for p in path if Path(p).exists()]
        # a single segment file is left out: rewriting its dir would need the
        # dir's other segments, which were not asked for
        notes = [f"{r.path}: a segment file, left as it is" for r in found if r.kind == "segment"]
        found = [r for r in found if r.kind != "segment"]
        resolved = ResolvedPath(
            Path(shown),
            "checkpoint dir",
            tuple(unique_segments(found)),
            notes=(*notes, *(n for r in found for n in r.notes)),
        )
    if resolved.kind == "segment":
        raise MaintenanceError(
            f"{shown}: is a segment file; gc works on a checkpoint dir, a run dir or a runinfo root"
        )
    return shown, resolved


@dataclass(slots=True)
class _Scan:
    """What one pass over every record (no values) found."""

    slack: list[int]  # per segment: bytes a record may grow by when rewritten
    last: dict[bytes, _Item] = field(default_factory=dict)  # last record per key, load order
    tombs: Tombstones = field(default_factory=Tombstones)
    newest_tomb: dict[tuple[str | None, bytes | str], _Item] = field(default_factory=dict)
    fixed_keys: set[bytes] = field(default_factory=set)  # keys with a record left alone
    in_rewritten: list[int] = field(default_factory=list)  # per dir: records rewritten
    records_in: int = 0


def _scan(
    shown: str,
    segments: Sequence[Path],
    dir_no: Sequence[int],
    fixed: set[int],
    verify: bool,
    progress: ProgressFn | None,
) -> _Scan:
    """Read every record (no values): the last per key, tombstones, the keys left alone.

    Damaged spans in a segment it would rewrite: MaintenanceError (code 1).
    """
    out = _Scan([_slack(s) for s in segments], in_rewritten=[0] * (max(dir_no, default=-1) + 1))
    last, newest_tomb, slack, in_rewritten = out.last, out.newest_tomb, out.slack, out.in_rewritten
    bad: list[str] = []
    records_in = 0
    for seg, i, item in scan_segments(
        segments, verify_records=verify, progress=progress, values=False
    ):
        if isinstance(item, BadSpan):
            if i not in fixed:
                bad.append(f"{seg}: offset {item.offset}: {item.reason}")
            continue
        records_in += 1
        rec = item.record
        if i in fixed:
            out.fixed_keys.add(rec.key)
        else:
            in_rewritten[dir_no[i]] += 1
        if out.tombs.add(rec):
            slot = (rec.tombstone, rec.key if rec.tombstone == "key" else rec.func)
            prev = newest_tomb.get(slot)
            if prev is None or rec.time > prev[_I_TIME]:
                newest_tomb[slot] = _item(item, i, records_in, slack[i])
        else:
            last[rec.key] = _item(item, i, records_in, slack[i])
    if bad:
        raise MaintenanceError(
            f"{shown}: {len(bad)} damaged span(s) found (first: {bad[0]}); nothing removed; "
            "see `aiomemo verify`, then `aiomemo compact --drop-damaged`",
            code=1,
        )
    out.records_in = records_in
    return out


def _unforget(scan: _Scan, segments: Sequence[Path], fixed: set[int], verify: bool) -> int:
    """Per key whose last record is forgotten, the last one no tombstone forgets (if any).

    Loading's rule: an earlier record no tombstone forgets may stand. A second
    pass (no values) finds those; returns the forgotten records it removes.
    """
    last, tombs, slack = scan.last, scan.tombs, scan.slack
    redo = {k for k, it in last.items() if tombs.covers(k, it[_I_FUNC], it[_I_TIME])}
    for k in redo:
        del last[k]
    n = forgotten = 0
    for _seg, i, item in scan_segments(segments, verify_records=verify, values=False):
        if not isinstance(item, RecordInfo):
            continue
        n += 1
        rec = item.record
        if rec.tombstone is not None or not tombs.forgets(rec):
            if rec.key in redo and rec.tombstone is None:
                last[rec.key] = _item(item, i, n, slack[i])
        elif i not in fixed:
            forgotten += 1
    return forgotten


def _by_reason(
    scan: _Scan, fixed: set[int], when: float, age: float | None, removed: dict[str, int]
) -> tuple[list[_Item], set[bytes]]:
    """The live records kept, and the keys evicted as expired or too old (counted)."""
    winners: list[_Item] = []
    evicted: set[bytes] = set()
    fixed_keys = scan.fixed_keys
    for k, it in scan.last.items():
        if it[_I_SEG] in fixed or k in fixed_keys:
            winners.append(it)  # left as it is: a record of its key stays put
        elif it[_I_EXPIRES] <= when:
            removed["expired"] += 1
            evicted.add(k)
        elif age is not None and it[_I_TIME] < when - age:
            removed["too_old"] += 1
            evicted.add(k)
        else:
            winners.append(it)
    return winners, evicted


def _fit_budget(
    movable: list[_Item],
    tomb_keep: list[_Item],
    fixed_keys: set[bytes],
    fixed_bytes: int,
    dir_no: Sequence[int],
    budget: int,
    evicted: set[bytes],
    removed: dict[str, int],
) -> list[_Item]:
    """``movable`` without the least recently written records that take it over ``budget``."""
    total = fixed_bytes + _estimate(dir_no, [*movable, *tomb_keep])
    if total <= budget:
        return movable
    candidates = sorted(
        [it for it in movable if it[_I_KEY] not in fixed_keys],
        key=lambda it: (it[_I_TIME], it[_I_ORDER]),
    )
    over, j = total - budget, 0
    while j < len(candidates) and over > 0:  # by record size first (cheap) ...
        over -= candidates[j][_I_SIZE]
        j += 1
    gone = {id(it) for it in candidates[:j]}
    rest = [it for it in movable if id(it) not in gone]
    total = fixed_bytes + _estimate(dir_no, [*rest, *tomb_keep])
    while j < len(candidates) and total > budget:  # ... then on the estimate
        gone.add(id(candidates[j]))
        total -= candidates[j][_I_SIZE]
        j += 1
    for it in candidates[:j]:
        evicted.add(it[_I_KEY])
    removed["over_budget"] = j
    return [it for it in movable if id(it) not in gone]


def _keep_per_dir(
    dirs: list[_Dir], dir_no: Sequence[int], kept: list[_Item], scan: _Scan, budget: int | None
) -> int:
    """Give each rewritten dir the records it keeps (load order); its bytes after the run."""
    for it in sorted(kept, key=lambda it: it[_I_ORDER]):
        dirs[dir_no[it[_I_SEG]]].keep.append(it)
    for n, d in enumerate(dirs):
        d.dropped = scan.in_rewritten[n] - len(d.keep)
        # with a budget, a dir that drops nothing is still rewritten when that
        # makes it smaller (one batch per commit takes more than one per 10,000)
        d.changed = d.dropped > 0 or (
            budget is not None
            and bool(d.rewrite)
            and total_size(d.rewrite) > _segment_bytes(d.keep)
        )
    return sum(_segment_bytes(d.keep) if d.changed else total_size(d.rewrite) for d in dirs)


def _estimate(dir_no: Sequence[int], items: Sequence[_Item]) -> int:
    """Upper bound on the bytes of the rewritten segments (one per dir) holding ``items``."""
    by_dir: dict[int, list[_Item]] = {}
    for it in items:
        by_dir.setdefault(dir_no[it[_I_SEG]], []).append(it)
    return sum(_segment_bytes(v) for v in by_dir.values())


# --------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------


def apply_gc(plan: GcPlan, *, held: Literal["refuse", "skip"] = "refuse") -> int:
    """Rewrite the dirs of ``plan`` one at a time in load order; return the bytes left.

    Each dir as ``compact`` rewrites one: lock its segments (refusing if a
    writer or another compaction holds one), write the kept records to a temp
    segment, fsync, read it back, rename it over the dir's first rewritten
    segment, fsync the dir, delete the other rewritten segments oldest first.
    A dir that keeps nothing just loses its rewritten segments, oldest first.
    """
    for d in plan.dirs:
        if not d.changed:
            continue
        _remove_stale_temps(d.path)
        rewrite = d.rewrite
        if held == "skip":
            # a writer may have opened one since the plan: it is never ours
            rewrite = [s for s in rewrite if s.exists()]
            if any(is_segment_in_use(s) for s in rewrite):
                continue
        try:
            fds = _lock_segments(rewrite)
        except FileNotFoundError as exc:
            raise MaintenanceError(
                f"{exc.filename}: gone since gc read it (another gc or compact ran); "
                "nothing more removed: run gc again"
            ) from None
        try:
            for seg, fd in zip(rewrite, fds, strict=True):
                st = os.fstat(fd)
                if d.seen.get(seg) != (st.st_ino, st.st_size):
                    raise MaintenanceError(
                        f"{seg}: changed since gc read it (another gc or compact ran); "
                        "nothing more removed: run gc again"
                    )
            if not d.keep:
                _remove_old(rewrite, d.path)
                continue
            tmp = _write_temp_segment(d.path, [_info(it) for it in d.keep])
            try:
                final = d.path / _compacted_name(rewrite)
                _check_and_publish(tmp, final)
                _remove_old([s for s in rewrite if s != final], d.path)
            finally:
                os.close(tmp.fd)
        finally:
            for fd in fds:
                os.close(fd)
    left = {s.parent for s in plan.segments}
    return total_size([s for d in left for s in d.glob("*" + SEGMENT_SUFFIX)])


def gc(
    path: str | os.PathLike[str],
    *,
    max_bytes: int | str | None = None,
    max_age: float | str | _dt.timedelta | None = None,
    dry_run: bool = False,
    now: float | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Remove expired, forgotten and superseded records, then apply the budgets.

    ``max_age``: records written longer ago than this go (``"30d"``, seconds,
    a timedelta). ``max_bytes``: then the least recently written records go
    until the segment files under ``path`` take at most this many bytes
    (``"10GiB"``, ``"500MB"``, an int). ``dry_run``: only say what would go.
    ``now`` defaults to the current time.

    Refuses (:class:`~aiomemo.MaintenanceError`, code 2, nothing removed) bad
    budgets, a segment file as ``path``, and any segment a writer holds (a
    dry run lists those in ``segments_held`` instead);
    damaged spans make it refuse with code 1. Returns a JSON-ready summary:
    ``removed`` counts by reason (superseded, forgotten, expired, too_old,
    over_budget), ``records_out``, ``bytes_in``/``bytes_out``, ``budget_met``.
    """
    # a dry run only reads: it reports the segments a writer holds instead of refusing
    held: Literal["refuse", "skip"] = "skip" if dry_run else "refuse"
    plan = plan_gc(
        path, max_bytes=max_bytes, max_age=max_age, now=now, held=held, progress=progress
    )
    if dry_run:
        return plan.summary(dry_run=True)
    return plan.summary(dry_run=False, bytes_out=apply_gc(plan))
