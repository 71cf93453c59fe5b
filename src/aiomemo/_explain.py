"""Why did a task miss? Compare its inputs with the nearest recorded call.

Every checkpoint record keeps (unless the Memoizer was made with
``explain=False``) a short digest of each argument: ``msgpack([[d_arg0, ...],
{kwarg: d, ...}])`` with 8-byte blake3 digests (see
:func:`aiomemo._hashing.arg_digests`). :func:`explain` computes the same
digests for a task, finds the recorded calls of the same function, and names
the inputs that differ from the *nearest* one (the call with the most
matching inputs; the newest of equals)::

    >>> print(explain(task, get_all_checkpoints("runinfo")))
    kwargs['n'] differs from the nearest recorded call of mod.fn (2 of 3 inputs match)

Records of tasks keyed with ``track_code`` also keep an 8-byte digest of
every piece of the code fingerprint (``msgpack([pos, kw, pieces])``, 4 bytes
of id and 4 of digest a piece, see :mod:`aiomemo._fingerprint`); for such a
task :func:`explain` names the pieces that changed (``mypkg.helpers.scale changed since the recorded
call``). Records with the two-item form (older ones, or untracked tasks)
explain as before.

:func:`explain` is synchronous and only reads files: from a coroutine, call it
as ``await asyncio.to_thread(explain, task, paths)``. It is thread-safe.

Paths resolve through :func:`aiomemo._paths.find_segments` (re-exported
here with :class:`ResolvedPath` and :func:`func_name` for older callers).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgpack

from aiomemo import _records
from aiomemo._checkpoint import RecordInfo, iter_segment
from aiomemo._exceptions import CheckpointPathError, UnhashableInputError
from aiomemo._fingerprint import code_fingerprint, split_record
from aiomemo._hashing import arg_digests, hash_task
from aiomemo._naming import func_name
from aiomemo._paths import PathKind, ResolvedPath, find_segments, unique_segments
from aiomemo._records import Record, Tombstones

__all__ = [
    "CheckpointPathError",
    "Explanation",
    "InputMatch",
    "PathKind",
    "ResolvedPath",
    "explain",
    "find_segments",
    "func_name",
    "unique_segments",
]

Status = Literal["match", "differs", "missing", "extra", "unknown"]
# (positional digests, keyword digests, code pieces: id -> short digest, or None)
_Digests = tuple[list[bytes], dict[str, bytes], dict[bytes, bytes] | None]


def _all_segments(paths: Iterable[str | os.PathLike[str]], strict: bool) -> list[Path]:
    found = []
    for p in paths:
        r = find_segments(p, strict=strict)
        for note in r.notes if r is not None else ():  # e.g. a FIFO named like a segment
            warnings.warn(f"aiomemo: {note}", RuntimeWarning, stacklevel=3)
        found.append(r)
    return unique_segments(found)


# --------------------------------------------------------------------------
# Explanation
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputMatch:
    """How one input of the task compares with the nearest recorded call.

    Attributes:
        name: ``"args[0]"`` or ``"kwargs['n']"``.
        status: ``"match"``; ``"differs"``; ``"extra"`` (the task has it, the
            recorded call did not); ``"missing"`` (the recorded call had it,
            the task does not); ``"unknown"`` (a digest is empty on one side:
            the value could not be keyed).
    """

    name: str
    status: Status


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a task hits or misses the checkpoints (``str()`` says it in one sentence).

    Attributes:
        hit: the task's key is recorded.
        func: the function's ``"module.qualname"`` as records name it.
        key: the task's key (hex), or None when it could not be computed.
        nearest_time: when the nearest recorded call (the hit itself, on a
            hit) finished, seconds since the epoch; None when there is none.
        nearest_key: that record's key (hex), or None.
        inputs: one :class:`InputMatch` per argument position and keyword
            (the union of the task's and the nearest call's), empty when
            nothing could be compared.
        matched: inputs whose digests match.
        records_of_func: records of ``func`` found (duplicates included).
        records_with_digests: those of them that keep per-argument digests.
        records_scanned: every record read.
        similar_funcs: recorded function names close to ``func`` (when it
            has no record at all: a typo, or a renamed module).
        note: an extra remark (e.g. why the key could not be computed).
        code: for a task keyed with ``track_code``, one :class:`InputMatch`
            per piece of its code fingerprint (``"mypkg.helpers.scale"``)
            against the nearest recorded call: ``"differs"`` (changed),
            ``"extra"`` (newly reached), ``"missing"`` (no longer reached;
            records keep ids, not names, so these are named
            ``GONE_PIECE``); empty when either side has no code digests.
    """

    hit: bool
    func: str
    key: str | None
    nearest_time: float | None
    nearest_key: str | None
    inputs: tuple[InputMatch, ...]
    matched: int
    records_of_func: int
    records_with_digests: int
    records_scanned: int
    similar_funcs: tuple[str, ...] = ()
    note: str = ""
    code: tuple[InputMatch, ...] = ()

    @property
    def code_changed(self) -> tuple[str, ...]:
        """Code pieces that changed, appeared or disappeared since the nearest recorded call."""
        return tuple(i.name for i in self.code if i.status != "match")

    @property
    def differing(self) -> tuple[str, ...]:
        """Names of the inputs that are not a match (differs, extra, missing, unknown)."""
        return tuple(i.name for i in self.inputs if i.status != "match")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``aiomemo explain --json`` prints)."""
        return {
            "hit": self.hit,
            "func": self.func,
            "key": self.key,
            "nearest_time": self.nearest_time,
            "nearest_key": self.nearest_key,
            "inputs": [{"name": i.name, "status": i.status} for i in self.inputs],
            "matched": self.matched,
            "compared": len(self.inputs),
            "records_of_func": self.records_of_func,
            "records_with_digests": self.records_with_digests,
            "records_scanned": self.records_scanned,
            "similar_funcs": list(self.similar_funcs),
            "note": self.note,
            "code": [{"name": i.name, "status": i.status} for i in self.code],
            "message": str(self),
        }

    def __str__(self) -> str:
        f = self.func
        when = _when(self.nearest_time)
        if self.hit:
            return f"hit: {f} has a recorded result for these inputs (recorded {when})"
        if not self.records_of_func:
            msg = (
                f"no recorded call of {f} in the checkpoints ({self.records_scanned} records read)"
            )
            if self.similar_funcs:
                msg += "; recorded functions with similar names: " + ", ".join(self.similar_funcs)
            return _with_note(msg, self.note)
        if not self.records_with_digests:
            return _with_note(
                f"{self.records_of_func} recorded call(s) of {f}, but none keeps per-argument "
                "digests (written with Memoizer(explain=False)), so which input changed "
                "cannot be told",
                self.note,
            )
        total = len(self.inputs)
        tally = f"{self.matched} of {total} inputs match"
        by: dict[str, list[str]] = {}
        for i in self.inputs:
            by.setdefault(i.status, []).append(i.name)
        nearest = f"the nearest recorded call of {f}"
        code_clause = _code_clause(self.code)
        if code_clause and not self.differing:
            return _with_note(f"{code_clause} ({nearest}: {tally})", self.note)
        if not self.differing:
            return _with_note(
                f"all {total} inputs match {nearest} (recorded {when}), yet the key differs: "
                "the function's version, ignore_for_cache or output refs changed, or the "
                "content of a File or of a buffer over 2 MiB (digests keep a File's path "
                "and a large buffer's head and tail only)",
                self.note,
            )
        clauses: list[str] = []
        if "differs" in by:
            names = by["differs"]
            clauses.append(f"{_join(names)} {'differs' if len(names) == 1 else 'differ'}")
        if "extra" in by:
            names = by["extra"]
            clauses.append(f"{_join(names)} {'is' if len(names) == 1 else 'are'} new")
        if "missing" in by:
            names = by["missing"]
            clauses.append(
                f"{_join(names)} {'is' if len(names) == 1 else 'are'} not given (the recorded "
                "call had it)"
            )
        if "unknown" in by:
            names = by["unknown"]
            clauses.append(f"{_join(names)} cannot be compared (no digest)")
        head = "; ".join(clauses)
        link = "from" if len(clauses) == 1 and "differs" in by else "compared with"
        msg = f"{head} {link} {nearest} ({tally})"
        if code_clause:
            msg += f"; {code_clause}"
        return _with_note(msg, self.note)


def _code_clause(code: Sequence[InputMatch]) -> str:
    """``mypkg.helpers.scale changed since the recorded call`` (and what is new or gone)."""
    by: dict[str, list[str]] = {}
    for i in code:
        by.setdefault(i.status, []).append(i.name)
    parts: list[str] = []
    if "differs" in by:
        names = by["differs"]
        parts.append(f"{_join(names)} changed since the recorded call")
    if "extra" in by:
        names = by["extra"]
        verb = "is" if len(names) == 1 else "are"
        parts.append(f"{_join(names)} {verb} newly reached by the code")
    if "missing" in by:
        n = len(by["missing"])
        parts.append(
            f"{n} recorded piece{'' if n == 1 else 's'} of code {'is' if n == 1 else 'are'} "
            "no longer reached"
        )
    return "; ".join(parts)


def _with_note(msg: str, note: str) -> str:
    return f"{msg} ({note})" if note else msg


def _join(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _when(t: float | None) -> str:
    if t is None:
        return "at an unknown time"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _func_named(module: str, qualname: str) -> Callable[[], None]:
    """A function known only by its recorded ``module.qualname`` (keyed by that name)."""

    def shim() -> None:
        """Never called: only its name is keyed."""

    shim.__module__ = module
    shim.__qualname__ = qualname
    return shim


def _candidate_keys(task: Mapping[str, Any]) -> set[bytes]:
    """The task's possible keys (one per module/qualname split for a func given as str)."""
    func = task.get("func")
    if not isinstance(func, str):
        return {hash_task(task)}
    parts = func.split(".")
    keys: set[bytes] = set()
    for i in range(1, len(parts)):
        shim = _func_named(".".join(parts[:i]), ".".join(parts[i:]))
        keys.add(hash_task({**task, "func": shim}))
    return keys


def _unpack_digests(raw: bytes) -> _Digests | None:
    """``(pos, kw, code)`` of a record's digests; ``code`` None in the two-item form."""
    try:
        items = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=False)
    except Exception:
        return None
    if type(items) is not list or len(items) not in (2, 3):
        return None
    pos, kw = items[0], items[1]
    if type(pos) is not list or type(kw) is not dict:
        return None
    code = split_record(items[2]) if len(items) == 3 and type(items[2]) is bytes else None
    return pos, kw, code


#: the name given to a recorded piece the code does not reach now (records keep ids only)
GONE_PIECE = "(a piece not reached now)"


def _compare_code(
    mine: dict[bytes, tuple[str, bytes]] | None, theirs: dict[bytes, bytes] | None
) -> list[InputMatch]:
    if mine is None or theirs is None:
        return []
    out: list[InputMatch] = []
    for pid, (name, d) in sorted(mine.items(), key=lambda kv: kv[1][0]):
        b = theirs.get(pid)
        status: Status = "extra" if b is None else "match" if b == d else "differs"
        out.append(InputMatch(name, status))
    out += [InputMatch(GONE_PIECE, "missing") for pid in theirs if pid not in mine]
    return out


def _compare(mine: _Digests, theirs: _Digests) -> tuple[int, list[InputMatch]]:
    out: list[InputMatch] = []
    matched = 0

    def one(name: str, a: bytes | None, b: bytes | None) -> None:
        nonlocal matched
        status: Status
        if a is None:
            status = "missing"
        elif b is None:
            status = "extra"
        elif not a or not b or type(a) is not bytes or type(b) is not bytes:
            status = "unknown"
        elif a == b:
            status = "match"
            matched += 1
        else:
            status = "differs"
        out.append(InputMatch(name, status))

    pa, ka = mine[0], mine[1]
    pb, kb = theirs[0], theirs[1]
    for i in range(max(len(pa), len(pb))):
        one(f"args[{i}]", pa[i] if i < len(pa) else None, pb[i] if i < len(pb) else None)
    for name in sorted(set(ka) | set(kb), key=str):
        one(f"kwargs[{name!r}]", ka.get(name), kb.get(name))
    return matched, out


def explain(
    task: Mapping[str, Any],
    paths: Sequence[str | os.PathLike[str]],
    *,
    key: bytes | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Explanation:
    """Say whether ``task`` is recorded in the checkpoints at ``paths`` and, if not, why.

    Args:
        task: a task mapping as given to the Memoizer (``func``, ``args``,
            ``kwargs``, optionally ``ignore_for_cache`` and ``version``).
            ``func`` may also be the recorded ``"module.qualname"`` string (the
            CLI's way: the function need not be importable).
        paths: runinfo roots, run directories, checkpoint directories or
            segment files (e.g. ``get_all_checkpoints(...)``); paths that do
            not exist or hold no checkpoints are skipped.
        key: the task's key (raw or hex) when known; computed otherwise.
        progress: called now and then with (bytes read, total bytes).

    Returns:
        An :class:`Explanation`; ``str()`` of it is one human sentence.

    Synchronous: it reads every record of every segment once (about 3 s per
    million records), so from a coroutine call it via ``asyncio.to_thread``.
    Thread-safe; it only reads. It sees what is on disk, not results still
    queued in a Memoizer.
    Raises ``TypeError`` for a task without ``func``; ``OSError`` only when a
    segment cannot be read.
    """
    if "func" not in task:
        raise TypeError("task has no 'func'")
    mine = _mine(task, key)
    return _explanation(mine, _scan(mine, _all_segments(paths, strict=False), progress))


@dataclass(slots=True)
class _Mine:
    """The explained task's side: its function's name, candidate keys, digests, code."""

    name: str
    keys: set[bytes]
    digests: _Digests
    pieces: dict[bytes, tuple[str, bytes]] | None
    note: str = ""


def _mine(task: Mapping[str, Any], key: bytes | str | None) -> _Mine:
    note = ""
    keys: set[bytes]
    if key is not None:
        keys = {bytes.fromhex(key) if isinstance(key, str) else bytes(key)}
    else:
        try:
            keys = _candidate_keys(task)
        except (UnhashableInputError, TypeError) as exc:
            keys = set()
            note = f"the task's key cannot be computed: {exc}"
    digests = _unpack_digests(arg_digests(task))
    assert digests is not None  # arg_digests always packs [list, dict]
    pieces: dict[bytes, tuple[str, bytes]] | None = None
    if task.get("track_code") and not isinstance(task["func"], str):
        try:
            pieces = code_fingerprint(task["func"]).pieces_by_id()
        except UnhashableInputError as exc:
            note = note or f"the task's code fingerprint cannot be made: {exc}"
    return _Mine(func_name(task["func"]), keys, digests, pieces, note)


@dataclass(slots=True)
class _Scan:
    """What one pass over the records found for a task."""

    hit_recs: list[Record] = field(default_factory=list)  # the task's own, in load order
    tombs: Tombstones = field(default_factory=Tombstones)
    scanned: int = 0
    of_func: int = 0
    with_digests: int = 0
    nearest: Record | None = None
    nearest_digests: _Digests | None = None
    names: set[str] = field(default_factory=set)  # other functions (for "did you mean")


def _scan(
    mine: _Mine, segments: Sequence[Path], progress: Callable[[int, int], None] | None
) -> _Scan:
    """Read every record once: the task's own records, and the nearest call of its function.

    One long loop on purpose: it runs once per record (millions), and a call
    per record would cost more than the loop's work; its counters stay locals.
    """
    sizes = []
    for s in segments:
        try:
            sizes.append(s.stat().st_size)
        except OSError:
            sizes.append(0)
    total_bytes = sum(sizes)
    done_bytes = 0
    out = _Scan()
    names, hit_recs, tombs = out.names, out.hit_recs, out.tombs
    name, keys = mine.name, mine.keys
    scanned = of_func = with_digests = 0
    best: tuple[int, int, float] | None = None
    my_pos, my_kw = mine.digests[0], mine.digests[1]
    my_code = {pid: d for pid, (_, d) in mine.pieces.items()} if mine.pieces is not None else None
    for seg, size in zip(segments, sizes, strict=True):
        for item in iter_segment(seg, verify_records=False, values=False):
            if not isinstance(item, RecordInfo):
                continue
            rec = item.record
            scanned += 1
            if progress is not None and not scanned & 0x3FFF:
                progress(done_bytes + item.offset, total_bytes)
            if tombs.add(rec):
                continue  # a tombstone, not a recorded call
            if rec.key in keys:
                hit_recs.append(rec)
            if rec.func != name:
                if len(names) < 10_000:
                    names.add(rec.func)
                continue
            of_func += 1
            if not rec.digests:
                continue
            with_digests += 1
            theirs = _unpack_digests(rec.digests)
            if theirs is None:
                continue
            pos, kw, code = theirs
            # the hot loop: count matches only; the nearest call's details come at the end
            matched = sum(1 for a, b in zip(my_pos, pos, strict=False) if a and a == b)
            matched += sum(1 for k, v in kw.items() if v and my_kw.get(k) == v)
            same_code = 0
            if code is not None and my_code is not None:
                same_code = sum(1 for k, v in code.items() if my_code.get(k) == v)
            score = (matched, same_code, rec.time)
            if best is None or score >= best:
                best, out.nearest, out.nearest_digests = score, rec, theirs
        done_bytes += size
    if progress is not None:
        progress(total_bytes, total_bytes)
    out.scanned, out.of_func, out.with_digests = scanned, of_func, with_digests
    return out


def _explanation(mine: _Mine, scan: _Scan) -> Explanation:
    """The answer, from the task's side and what the scan found."""
    name, keys, note = mine.name, mine.keys, mine.note
    # a load would keep the last record of the key no tombstone forgets, unexpired
    now = _records.clock()
    live = [r for r in scan.hit_recs if not scan.tombs.forgets(r)]
    hit_rec = live[-1] if live and live[-1].expires > now else None
    if scan.hit_recs and hit_rec is None:
        gone = (
            f"the recorded call expired at {_when(live[-1].expires)}"
            if live
            else "the recorded call was forgotten (aiomemo forget / memo.forget)"
        )
        note = f"{note}; {gone}" if note else gone
    task_key = None
    if len(keys) == 1:
        task_key = next(iter(keys)).hex()
    elif hit_rec is not None:
        task_key = hit_rec.key.hex()
    similar: tuple[str, ...] = ()
    if not scan.of_func and scan.names:
        similar = tuple(difflib.get_close_matches(name, sorted(scan.names), n=3, cutoff=0.6))
    if hit_rec is not None:
        theirs_hit = _unpack_digests(hit_rec.digests) if hit_rec.digests else None
        inputs = _compare(mine.digests, theirs_hit)[1] if theirs_hit is not None else []
        code_hit = _compare_code(mine.pieces, theirs_hit[2]) if theirs_hit is not None else []
        return Explanation(
            hit=True,
            func=name,
            key=task_key,
            nearest_time=hit_rec.time,
            nearest_key=hit_rec.key.hex(),
            inputs=tuple(inputs),
            matched=sum(1 for i in inputs if i.status == "match"),
            records_of_func=scan.of_func,
            records_with_digests=scan.with_digests,
            records_scanned=scan.scanned,
            note=note,
            code=tuple(code_hit),
        )
    best_rec, best_theirs = scan.nearest, scan.nearest_digests
    best_matched, best_inputs = (
        _compare(mine.digests, best_theirs) if best_theirs is not None else (0, [])
    )
    best_code = _compare_code(mine.pieces, best_theirs[2]) if best_theirs is not None else []
    return Explanation(
        hit=False,
        func=name,
        key=task_key,
        nearest_time=best_rec.time if best_rec is not None else None,
        nearest_key=best_rec.key.hex() if best_rec is not None else None,
        inputs=tuple(best_inputs),
        matched=best_matched,
        records_of_func=scan.of_func,
        records_with_digests=scan.with_digests,
        records_scanned=scan.scanned,
        similar_funcs=similar,
        note=note,
        code=tuple(best_code),
    )
