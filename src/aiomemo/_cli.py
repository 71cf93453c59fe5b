"""The ``aiomemo`` command (also ``python -m aiomemo``).

Subcommands: ``demo``, ``inspect``, ``verify``, ``compact``, ``gc``, ``explain`` and
``import-parsl``; ``aiomemo SUBCOMMAND --help`` describes each. A PATH may be
a runinfo root (numbered run dirs), a run dir (holding ``checkpoint/``), a
checkpoint dir or a segment file.

Exit codes: 0 success; 1 a finding (damaged records, or data that could not
be converted); 2 a usage or input error (a missing path, a directory with no
checkpoints, a file that is not aiomemo's, a refused operation). Errors are
one line on stderr. ``--json`` prints one JSON document on stdout. Progress
bars go to stderr, only when it is a terminal.

This module only parses arguments, calls library functions (``compact`` and
``import_parsl`` live in :mod:`aiomemo._maintenance`, path resolution in
:mod:`aiomemo._paths`) and prints. Everything is synchronous (plain file
I/O) except ``demo``, which runs its workflow with :func:`asyncio.run`. :func:`main` takes an argv list and
returns the exit code, so tests and other programs can call it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from aiomemo import _codec
from aiomemo._checkpoint import BadSpan, RecordInfo, is_segment_in_use
from aiomemo._exceptions import MaintenanceError, MemoError
from aiomemo._explain import explain
from aiomemo._gc import gc
from aiomemo._maintenance import (
    ProgressFn,
    compact,
    forget,
    import_parsl,
    scan_segments,
    total_size,
)
from aiomemo._paths import ResolvedPath, find_segments, unique_segments

__all__ = ["CliError", "Progress", "main"]

_PROG = "aiomemo"


class CliError(MemoError):
    """An error the command reports as one line on stderr, with exit ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------
# Progress and formatting
# --------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, drawn only on a terminal.

    Nothing is drawn during the first 0.3 s (short jobs stay silent) and at
    most 10 times a second; :meth:`close` erases the line.
    """

    def __init__(self, label: str, *, stream: IO[str] | None = None) -> None:
        """``label`` starts the line; ``stream`` defaults to ``sys.stderr``."""
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self._start = time.monotonic()
        self._last = 0.0
        self._shown = False

    def update(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` bytes."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._start < 0.3 or now - self._last < 0.1:
            return
        self._last = now
        frac = min(1.0, done / total) if total else 1.0
        bar = "#" * int(frac * 30)
        self.stream.write(
            f"\r{self.label} [{bar:<30}] {frac:4.0%} {_size(done)} / {_size(total)}\x1b[K"
        )
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Erase the bar (if it was drawn)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    try:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def _with_progress(label: str, job: Callable[[ProgressFn], dict[str, Any]]) -> dict[str, Any]:
    """Run a library function with a progress bar on stderr (erased afterwards)."""
    progress = Progress(label)
    try:
        return job(progress.update)
    finally:
        progress.close()


def _emit_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _resolve(paths: Sequence[str]) -> list[ResolvedPath]:
    out = []
    for p in paths:
        r = find_segments(p, strict=True)
        assert r is not None  # strict: raises instead
        for note in r.notes:  # e.g. a FIFO named like a segment: never opened
            print(f"{_PROG}: warning: {note}", file=sys.stderr)
        out.append(r)
    return out


def _skipped_files(resolved: Sequence[ResolvedPath]) -> list[str]:
    return [n for r in resolved for n in r.notes]


# --------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _SegStats:
    path: Path
    size: int = 0
    records: int = 0
    recovered: int = 0
    bad_spans: int = 0
    lost: int = 0
    first: float | None = None
    last: float | None = None
    in_use: bool = False


@dataclass(slots=True)
class _FuncStats:
    records: int = 0
    value_bytes: int = 0
    record_bytes: int = 0
    keys: set[bytes] = field(default_factory=set)


@dataclass(slots=True)
class _Tally:
    """What ``inspect`` counts over the records and bad spans of its segments."""

    segs: list[_SegStats]
    funcs: dict[str, _FuncStats] = field(default_factory=dict)
    keys: set[bytes] = field(default_factory=set)
    problems: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0
    recovered: int = 0
    with_digests: int = 0
    parsl: int = 0
    tombstones: int = 0
    expiring: int = 0
    expired: int = 0
    now: float = field(default_factory=time.time)

    def add(self, seg: Path, i: int, item: RecordInfo | BadSpan) -> None:
        st = self.segs[i]
        if isinstance(item, BadSpan):
            st.bad_spans += 1
            st.lost += item.lost
            self.problems.append(_span_dict(seg, item, st.in_use))
            return
        rec = item.record
        self.records += 1
        st.records += 1
        if item.recovered:
            self.recovered += 1
            st.recovered += 1
        if rec.tombstone is not None:
            self.tombstones += 1  # not a result: counted apart, in no function's stats
            return
        if rec.expires < math.inf:
            self.expiring += 1
            self.expired += rec.expires <= self.now
        self.keys.add(rec.key)
        f = self.funcs.get(rec.func)
        if f is None:
            f = self.funcs[rec.func] = _FuncStats()
        f.records += 1
        # a value in a value frame is not read: its length is in the index
        f.value_bytes += item.ref.length if item.ref is not None else len(rec.value)
        f.record_bytes += item.length + (item.ref.length if item.ref is not None else 0)
        f.keys.add(rec.key)
        if rec.digests:
            self.with_digests += 1
        if len(rec.key) == 16:
            self.parsl += 1
        t = rec.time
        if st.first is None or t < st.first:
            st.first = t
        if st.last is None or t > st.last:
            st.last = t


def _cmd_inspect(args: argparse.Namespace) -> int:
    resolved = _resolve(args.paths)
    segments = unique_segments(resolved)
    tally = _Tally([_SegStats(s, total_size([s]), in_use=is_segment_in_use(s)) for s in segments])
    progress = Progress("inspect")
    try:
        for seg, i, item in scan_segments(
            segments, verify_records=False, progress=progress.update, values=False
        ):
            tally.add(seg, i, item)
    finally:
        progress.close()
    report = _inspect_report(resolved, tally)
    if args.json:
        _emit_json(report)
    else:
        _print_inspect(report)
    return 0


def _inspect_report(resolved: Sequence[ResolvedPath], tally: _Tally) -> dict[str, Any]:
    segs = tally.segs
    firsts = [s.first for s in segs if s.first is not None]
    lasts = [s.last for s in segs if s.last is not None]
    first = min(firsts) if firsts else None
    last = max(lasts) if lasts else None
    return {
        "paths": [{"path": os.fspath(r.path), "kind": r.kind} for r in resolved],
        "checkpoint_dirs": sorted({os.fspath(d) for r in resolved for d in r.checkpoint_dirs}),
        "segments": len(segs),
        "segments_in_use": sum(s.in_use for s in segs),
        "bytes": sum(s.size for s in segs),
        "records": tally.records,
        "unique_keys": len(tally.keys),
        "recovered_records": tally.recovered,
        "records_with_digests": tally.with_digests,
        "tombstones": tally.tombstones,
        "records_with_expiry": tally.expiring,
        "records_expired": tally.expired,
        "parsl_records": tally.parsl,
        "first_time": first,
        "last_time": last,
        "first_time_iso": _iso(first),
        "last_time_iso": _iso(last),
        "bad_spans": sum(s.bad_spans for s in segs),
        "skipped_records": sum(s.lost for s in segs),
        "problems": tally.problems,
        "skipped_files": _skipped_files(resolved),
        "functions": {
            name: {
                "records": f.records,
                "unique_keys": len(f.keys),
                "value_bytes": f.value_bytes,
                "record_bytes": f.record_bytes,
            }
            for name, f in sorted(tally.funcs.items(), key=lambda kv: (-kv[1].records, kv[0]))
        },
        "segment_list": [
            {
                "path": os.fspath(s.path),
                "bytes": s.size,
                "records": s.records,
                "recovered_records": s.recovered,
                "bad_spans": s.bad_spans,
                "skipped_records": s.lost,
                "in_use": s.in_use,
                "first_time": s.first,
                "last_time": s.last,
            }
            for s in segs
        ],
    }


def _print_inspect(r: dict[str, Any]) -> None:
    for p in r["paths"]:
        print(f"{p['path']} ({p['kind']})")
    in_use = f" ({r['segments_in_use']} open in a writer)" if r["segments_in_use"] else ""
    rows = [
        ("segments", f"{r['segments']:,}{in_use} in {len(r['checkpoint_dirs'])} checkpoint dir(s)"),
        ("bytes", f"{r['bytes']:,} ({_size(r['bytes'])})"),
        ("records", f"{r['records']:,}"),
        ("unique keys", f"{r['unique_keys']:,}"),
        ("with digests", f"{r['records_with_digests']:,} (explain can name changed inputs)"),
        (
            "expiry",
            f"{r['records_with_expiry']:,} record(s) expire, {r['records_expired']:,} expired",
        ),
        ("tombstones", f"{r['tombstones']:,} (aiomemo forget / memo.forget)"),
    ]
    if r["parsl_records"]:
        rows.append(("parsl keys", f"{r['parsl_records']:,} (imported from Parsl)"))
    if r["first_time_iso"]:
        rows.append(("time range", f"{r['first_time_iso']} .. {r['last_time_iso']}"))
    rows.append(
        (
            "damaged",
            f"{r['bad_spans']} span(s), {r['skipped_records']} record(s) skipped, "
            f"{r['recovered_records']} recovered from damaged batches",
        )
    )
    for k, v in rows:
        print(f"  {k:<13} {v}")
    if r["functions"]:
        print(f"  {'records':>10} {'unique':>10} {'value bytes':>12}  function")
        for name, f in r["functions"].items():
            print(f"  {f['records']:>10,} {f['unique_keys']:>10,} {f['value_bytes']:>12,}  {name}")
    for p in r["problems"][:20]:
        print(f"  ! {p['path']}: offset {p['offset']}: {p['reason']}")
    if len(r["problems"]) > 20:
        print(f"  ! ... {len(r['problems']) - 20} more (see `aiomemo verify`)")


def _span_dict(seg: Path, span: BadSpan, in_use: bool) -> dict[str, Any]:
    return {
        "path": os.fspath(seg),
        "offset": span.offset,
        "length": span.length,
        "reason": span.reason,
        "lost": span.lost,
        "torn": span.torn,
        # a torn tail in a segment a writer holds open is a write in flight
        "in_flight": bool(span.torn and in_use),
    }


# --------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    resolved = _resolve(args.paths)
    segments = unique_segments(resolved)
    in_use = {s: is_segment_in_use(s) for s in segments}
    bad: list[dict[str, Any]] = []
    in_flight: list[dict[str, Any]] = []
    records = 0
    progress = Progress("verify")
    try:
        for seg, _i, item in scan_segments(segments, verify_records=True, progress=progress.update):
            if isinstance(item, BadSpan):
                d = _span_dict(seg, item, in_use[seg])
                (in_flight if d["in_flight"] else bad).append(d)
                continue
            records += 1
            if args.decode and item.record.tombstone is None:
                try:
                    _codec.decode(item.record.value)
                except _codec.CodecError as exc:
                    bad.append(
                        {
                            "path": os.fspath(seg),
                            "offset": item.offset,
                            "length": item.length,
                            "reason": f"record {item.record.key.hex()}: value does not decode: "
                            f"{exc}",
                            "lost": 1,
                            "torn": False,
                            "in_flight": False,
                        }
                    )
    finally:
        progress.close()
    report = {
        "ok": not bad,
        "segments": len(segments),
        "records": records,
        "bad": bad,
        "in_flight": in_flight,
        "lost_records": sum(b["lost"] for b in bad),
        "skipped_files": _skipped_files(resolved),
    }
    if args.json:
        _emit_json(report)
    else:
        for b in bad:
            print(f"{b['path']}: offset {b['offset']} ({b['length']} bytes): {b['reason']}")
        for b in in_flight:
            print(
                f"{b['path']}: offset {b['offset']}: tail still being written "
                "(the segment is open in a writer); not counted"
            )
        verdict = "OK" if not bad else f"BAD: {len(bad)} damaged span(s)"
        print(f"{verdict}: {records:,} sound records in {len(segments)} segment(s)")
    return 0 if not bad else 1


# --------------------------------------------------------------------------
# compact
# --------------------------------------------------------------------------


def _cmd_compact(args: argparse.Namespace) -> int:
    summary = _with_progress(
        "compact",
        lambda bar: compact(args.path, args.output, drop_damaged=args.drop_damaged, progress=bar),
    )
    for note in summary["skipped_files"]:
        print(f"{_PROG}: warning: {note}", file=sys.stderr)
    if args.json:
        _emit_json(summary)
    else:
        print(
            f"compacted {summary['records_in']:,} records in {summary['segments_in']} segment(s) "
            f"({_size(summary['bytes_in'])}) into {summary['records_out']:,} records "
            f"({_size(summary['bytes_out'])}): {summary['output']}"
        )
        if summary["damaged_spans_dropped"]:
            print(f"dropped {summary['damaged_spans_dropped']} damaged span(s)")
        if summary["segments_in_use"]:
            print(
                f"{summary['segments_in_use']} segment(s) are open in a writer: "
                "records written from now on are not in the copy"
            )
    return 0


# --------------------------------------------------------------------------
# gc
# --------------------------------------------------------------------------


def _age(seconds: float) -> str:
    for unit, n in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds // n:.0f}{unit}"
    return f"{seconds:g}s"


def _cmd_gc(args: argparse.Namespace) -> int:
    summary = _with_progress(
        "gc",
        lambda bar: gc(
            args.path,
            max_bytes=args.max_bytes,
            max_age=args.max_age,
            dry_run=args.dry_run,
            progress=bar,
        ),
    )
    for note in summary["skipped_files"]:
        print(f"{_PROG}: warning: {note}", file=sys.stderr)
    if args.json:
        _emit_json(summary)
        return 0 if summary["budget_met"] else 1
    r = summary["removed"]
    verb = "would remove" if summary["dry_run"] else "removed"
    why = ", ".join(
        f"{r[k]:,} {label}"
        for k, label in (
            ("expired", "expired"),
            ("forgotten", "forgotten"),
            ("superseded", "superseded"),
            ("too_old", f"older than {_age(summary['max_age'])}" if summary["max_age"] else ""),
            ("over_budget", "least recently written, over the budget"),
        )
        if r[k]
    )
    freed = summary["bytes_freed"]
    print(
        f"{verb} {summary['records_removed']:,} records ({_size(freed)})"
        + (f": {why}" if why else "")
    )
    left = "would keep" if summary["dry_run"] else "kept"
    budget = (
        f" of a {_size(summary['max_bytes'])} budget" if summary["max_bytes"] is not None else ""
    )
    print(
        f"{left} {summary['records_out'] - summary['tombstones_kept']:,} records and "
        f"{summary['tombstones_kept']:,} tombstone(s), "
        f"{_size(summary['bytes_out'])}{budget}"
    )
    if not summary["budget_met"]:
        print(
            f"{_PROG}: the budget is not met: tombstones (and segments a writer holds) "
            "are never removed to meet it",
            file=sys.stderr,
        )
        return 1
    return 0


# --------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------


def _json_arg(text: str | None, what: str, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--{what}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if type(value) is not kind:
        want = "a JSON array, e.g. '[1, \"a\"]'" if kind is list else "a JSON object"
        raise CliError(f"--{what}: must be {want}, not {type(value).__name__}")
    return value


def _cmd_explain(args: argparse.Namespace) -> int:
    resolved = _resolve(args.paths)
    fargs = _json_arg(args.args, "args", list)
    fkwargs = _json_arg(args.kwargs, "kwargs", dict)
    key: bytes | None = None
    if args.key is not None:
        try:
            key = bytes.fromhex(args.key)
        except ValueError:
            raise CliError(f"--key: not a hex string: {args.key!r}") from None
        if len(key) not in (16, 32):
            raise CliError(f"--key: a key is 64 hex digits (32 for a Parsl key), not {len(key)}")
    task: dict[str, Any] = {"func": args.func, "args": fargs, "kwargs": fkwargs}
    if args.ignore:
        task["ignore_for_cache"] = list(args.ignore)
    if args.func_version is not None:
        try:
            task["version"] = json.loads(args.func_version)
        except json.JSONDecodeError:
            task["version"] = args.func_version  # a plain string, e.g. --func-version v2
    if args.track_code:
        task["func"] = _import_func(args.func)
        task["track_code"] = True
    progress = Progress("explain")
    try:
        ex = explain(task, [r.path for r in resolved], key=key, progress=progress.update)
    finally:
        progress.close()
    if args.json:
        _emit_json(ex.to_dict())
    else:
        print(ex)
        for i in ex.inputs:
            print(f"  {i.name:<24} {i.status}")
        for i in ex.code:
            if i.status != "match":
                status = {"differs": "changed", "extra": "newly reached", "missing": "gone"}
                print(f"  {i.name:<24} {status.get(i.status, i.status)}")
    return 0


def _import_func(name: str) -> Any:
    """The function recorded as ``module.qualname``, imported (for ``--track-code``).

    The current directory is searched first, as ``python -m`` does. A
    ``memo.cached`` wrapper gives the function it wraps, a Parsl app its
    ``func``.
    """
    import importlib

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parts = name.split(".")
    if "<locals>" in parts:
        raise CliError(f"--track-code: {name} is a nested function; it cannot be imported")
    for i in range(len(parts) - 1, 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and (modname == exc.name or modname.startswith(exc.name + ".")):
                continue
            raise CliError(f"--track-code: importing {modname} failed: {exc}") from None
        except Exception as exc:  # the user's module raised while importing
            raise CliError(f"--track-code: importing {modname} failed: {exc!r}") from None
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise CliError(f"--track-code: {modname} has no {'.'.join(parts[i:])}") from None
        inner = getattr(obj, "_aiomemo_func", None)  # a memo.cached wrapper
        if inner is not None:
            return inner
        if not callable(obj) or not hasattr(obj, "__code__"):
            func = getattr(obj, "func", None)  # a Parsl app
            if callable(func):
                return func
        return obj
    raise CliError(f"--track-code: no importable module in {name!r} (run from the project dir?)")


# --------------------------------------------------------------------------
# import-parsl
# --------------------------------------------------------------------------


def _cmd_import_parsl(args: argparse.Namespace) -> int:
    summary = _with_progress(
        "import-parsl",
        lambda bar: import_parsl(args.runinfo, args.output, trust=args.trust, progress=bar),
    )
    if args.json:
        _emit_json(summary)
    else:
        where = summary["output_dir"] or "nothing written"
        print(
            f"imported {summary['imported']:,} records ({summary['entries']:,} entries in "
            f"{len(summary['input'])} tasks.pkl): {where}"
        )
        if summary["skipped_unencodable"]:
            types = ", ".join(f"{t} x{n}" for t, n in summary["unencodable_types"].items())
            print(f"skipped {summary['skipped_unencodable']} result(s) the codec refuses: {types}")
        if summary["skipped_malformed"]:
            print(f"skipped {summary['skipped_malformed']} malformed entries")
        for line in summary["unreadable"]:
            print(f"! {line}")
        print("load them with Memoizer(parsl_keys=True) (ParslMemoizer does so by itself)")
    return 1 if summary["unreadable"] else 0


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from aiomemo._demo import format_report, run_demo

    if args.tasks < 4:
        raise CliError(f"--tasks: at least 4, not {args.tasks}")
    if args.dir is None:
        directory = tempfile.mkdtemp(prefix="aiomemo-demo-")
    else:
        directory = os.fspath(args.dir)
        p = Path(directory)
        if p.exists() and not p.is_dir():
            raise CliError(f"{directory}: exists and is not a directory")
    if not args.json:
        print(f"runinfo directory: {directory}")
        sys.stdout.flush()
    result = asyncio.run(run_demo(directory, tasks=args.tasks))
    if args.json:
        _emit_json(result)
    else:
        print(format_report(result))
        print(f"look at it: aiomemo inspect {directory}")
    return 0


# --------------------------------------------------------------------------
# forget
# --------------------------------------------------------------------------


def _parse_date(text: str) -> float:
    """Unix seconds from ``2026-12-01``, ``2026-12-01T12:00[:00][Z|+02:00]`` or a number."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"--before: not a date: {text!r} (e.g. 2026-12-01, 2026-12-01T12:00Z, or unix seconds)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # a date without a zone is UTC, as inspect prints
    return when.timestamp()


def _cmd_forget(args: argparse.Namespace) -> int:
    from aiomemo._forget import unknown_function
    from aiomemo._hashing import arg_digests

    before = _parse_date(args.before) if args.before is not None else None
    keys: set[bytes] | None = None
    digests: bytes | None = None
    if args.args is not None or args.kwargs is not None:
        from aiomemo._explain import _candidate_keys

        task: dict[str, Any] = {
            "func": args.func,
            "args": _json_arg(args.args, "args", list),
            "kwargs": _json_arg(args.kwargs, "kwargs", dict),
        }
        try:
            keys = _candidate_keys(task)
            digests = arg_digests(task)
        except MemoError as exc:
            raise CliError(f"--args/--kwargs: {exc}") from None
    summary = forget(
        args.path,
        func=args.func,
        keys=keys,
        arg_digests=digests,
        before=before,
        dry_run=args.dry_run,
        unknown=lambda name, known: unknown_function(name, known, f"in {args.path}"),
    )
    if args.json:
        _emit_json(summary)
        return 0
    what = "would remove" if args.dry_run else "removed"
    cut = datetime.fromtimestamp(summary["before"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"{what} {summary['removed']:,} record(s) of {args.func} written up to {cut}")
    for seg in summary["segments_written"]:
        print(f"tombstone: {seg}")
    return 0


# --------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------

_PATH_HELP = (
    "a runinfo root (numbered run dirs), a run dir (holding checkpoint/), "
    "a checkpoint dir or a segment file"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line (plus the usage line argparse always gives), exit 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


#: ``add(name, handler, help, description)``: a subcommand's parser (with ``--json``)
_Add = Callable[[str, Callable[[argparse.Namespace], int], str, str], argparse.ArgumentParser]


def _demo_parser(add: _Add) -> None:
    p = add(
        "demo",
        _cmd_demo,
        "run a small workflow twice against one runinfo dir",
        "Run a small async workflow (a few hundred tasks in a DAG, with duplicates) twice "
        "against one runinfo directory: the first run computes and checkpoints on a 0.2 s "
        "timer, the second loads the checkpoints and finishes from the memo.",
    )
    p.add_argument("--tasks", type=int, default=300, help="task calls per run (default 300)")
    p.add_argument(
        "--dir",
        help="runinfo directory (default: a fresh temp dir); runs already in it are loaded too",
    )


def _inspect_parser(add: _Add) -> None:
    p = add(
        "inspect",
        _cmd_inspect,
        "summarise checkpoints",
        "Segments, records, unique keys, bytes, per-function counts and sizes, time range, "
        "and skipped (damaged) records.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help=_PATH_HELP)


def _verify_parser(add: _Add) -> None:
    p = add(
        "verify",
        _cmd_verify,
        "check every record",
        "Check every record's checksum (and that its value decodes). Exit 0 when all are "
        "sound, 1 listing the file and offset of each damaged span.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help=_PATH_HELP)
    p.add_argument(
        "--no-decode",
        dest="decode",
        action="store_false",
        help="check checksums only (skip decoding every value)",
    )


def _compact_parser(add: _Add) -> None:
    p = add(
        "compact",
        _cmd_compact,
        "rewrite into one segment, newest record per key",
        "Rewrite a checkpoint dir into one segment holding the newest record per key, "
        "atomically: the new segment is written to a temp file, fsynced, renamed into place "
        "and the dir fsynced before the old segments are deleted. Refuses while a writer "
        "holds a segment open.",
    )
    p.add_argument("path", metavar="PATH", help=_PATH_HELP)
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="write the compacted segment into checkpoint dir OUT and leave PATH alone",
    )
    p.add_argument(
        "--drop-damaged",
        action="store_true",
        help="compact even when damaged spans are found (keeps what loads today)",
    )


def _gc_parser(add: _Add) -> None:
    p = add(
        "gc",
        _cmd_gc,
        "remove expired, forgotten and old records; keep within a size budget",
        "Remove expired records, records forgotten by tombstones, superseded copies, "
        "records written longer ago than --max-age, then the least recently written "
        "records until the segments take at most --max-bytes. Crash-safe like compact "
        "(each checkpoint dir rewritten atomically, in load order). Refuses while a writer "
        "holds a segment. Sizes: plain bytes, or kB/MB/GB/TB (powers of 1000) and "
        "KiB/MiB/GiB/TiB (powers of 1024). Ages: s, m, h, d, w (e.g. 30d, 12h, 1d12h).",
    )
    p.add_argument("path", metavar="PATH", help=_PATH_HELP)
    p.add_argument("--max-bytes", metavar="SIZE", help="e.g. 10GiB, 500MB, 1000000")
    p.add_argument("--max-age", metavar="AGE", help="e.g. 30d, 12h")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def _explain_parser(add: _Add) -> None:
    p = add(
        "explain",
        _cmd_explain,
        "why did a task miss? name the inputs that differ",
        "Compare a call with the nearest recorded call of the same function and name the "
        "inputs that differ. Arguments are JSON (ints, floats, strings, lists, objects, "
        "null, booleans digest as the same Python values would; a Python tuple argument "
        "is not a JSON list).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help=_PATH_HELP)
    p.add_argument("--func", required=True, help='the function as recorded: "module.qualname"')
    p.add_argument("--args", help="positional arguments as a JSON array, e.g. '[1, \"a\"]'")
    p.add_argument("--kwargs", help="keyword arguments as a JSON object, e.g. '{\"n\": 3}'")
    p.add_argument("--key", help="the task's key (hex), if known: decides hit or miss")
    p.add_argument(
        "--track-code",
        action="store_true",
        help="the calls were keyed with track_code: import --func (from the current "
        "directory) and name the code that changed since the recorded call",
    )
    p.add_argument(
        "--func-version",
        metavar="VERSION",
        help="the version= given to memo.cached (JSON, or else taken as a string)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        metavar="NAME",
        help="a kwarg left out of the key (ignore_for_cache); repeat for more",
    )


def _import_parsl_parser(add: _Add) -> None:
    p = add(
        "import-parsl",
        _cmd_import_parsl,
        "convert Parsl tasks.pkl checkpoints (needs --trust)",
        "Convert Parsl's pickled checkpoints (RUNINFO/NNN/checkpoint/tasks.pkl) into an "
        "aiomemo segment keyed by Parsl's hashes (load with Memoizer(parsl_keys=True)). "
        "Reading pickle runs code from the file, so this refuses without --trust.",
    )
    p.add_argument("runinfo", metavar="RUNINFO", help="Parsl's runinfo dir (or a run dir)")
    p.add_argument(
        "--trust", action="store_true", help="I trust these files: unpickling runs their code"
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="checkpoint dir to write (default: a new numbered run dir under RUNINFO)",
    )


def _forget_parser(add: _Add) -> None:
    p = add(
        "forget",
        _cmd_forget,
        "forget the records of a function (or of some calls of it)",
        "Forget every record of --func written up to --before (default: now), or only the "
        "calls given by --args/--kwargs (JSON, as explain takes them). Adds a tombstone "
        "segment (written to a temp file, fsynced, renamed into place) to each checkpoint "
        "dir holding such records: a later load misses them; compact removes them from "
        "disk. Refuses while a writer holds a segment.",
    )
    p.add_argument("path", metavar="PATH", help=_PATH_HELP)
    p.add_argument("--func", required=True, help='the function as recorded: "module.qualname"')
    p.add_argument("--args", help="only this call: positional arguments as a JSON array")
    p.add_argument("--kwargs", help="only this call: keyword arguments as a JSON object")
    p.add_argument(
        "--before",
        metavar="DATE",
        help="only records written up to DATE (2026-12-01, 2026-12-01T12:00Z, unix seconds)",
    )
    p.add_argument("--dry-run", action="store_true", help="only count; write nothing")


#: the subcommands, in the order ``--help`` lists them: one function each
#: (a new command is a ``_cmd_x`` handler, an ``_x_parser`` and a line here)
_SUBCOMMANDS: tuple[Callable[[_Add], None], ...] = (
    _demo_parser,
    _inspect_parser,
    _verify_parser,
    _compact_parser,
    _gc_parser,
    _explain_parser,
    _forget_parser,
    _import_parsl_parser,
)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="Look after aiomemo checkpoints: inspect, verify, compact, explain "
        "misses, import Parsl checkpoints, or run the demo.",
        epilog="Exit codes: 0 success, 1 a finding (damaged records), 2 usage or input error.",
    )
    from aiomemo import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help: str, desc: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=desc)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return p

    for define in _SUBCOMMANDS:
        define(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``aiomemo`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
        return code
    except MemoError as exc:  # CliError, MaintenanceError, CheckpointPathError, ...
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return exc.code if isinstance(exc, CliError | MaintenanceError) else 2
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{_PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
