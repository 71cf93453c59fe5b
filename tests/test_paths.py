"""Path resolution and safe opening: non-regular files named like segments never hang a reader.

A FIFO opened for reading blocks until a writer comes: before, one named
``seg-*.amlog`` in a checkpoint dir hung Memoizer start, ``aiomemo inspect``,
``verify``, ``compact`` and ``explain`` forever. Every test here runs the
call in a thread with a deadline and, should it block, opens the FIFOs for
writing so the thread (and the test run) can finish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from aiomemo import CheckpointPathError, MaintenanceError, Memoizer, _cli, _codec
from aiomemo._checkpoint import is_segment_in_use, iter_segment, load_paths, read_segment_header
from aiomemo._explain import explain
from aiomemo._maintenance import compact, import_parsl
from aiomemo._paths import (
    STAMP_FORMAT,
    find_segments,
    list_segments,
    new_stamp,
    open_segment,
    resolve,
    segment_name,
    segment_stamp,
)
from aiomemo.stores import Record
from helpers import write_segment_file

T = TypeVar("T")
DEADLINE = 20.0


def rec(i: int) -> Record:
    return Record(bytes([i]) * 32, _codec.encode(i), "m.f", 1.7e9)


def _release(fifos: list[Path]) -> None:
    for f in fifos:
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)


def no_hang(fn: Callable[[], T], fifos: list[Path]) -> T:
    """``fn()`` in a thread; fail (after unblocking it) if it takes longer than DEADLINE."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(fn)
        try:
            return fut.result(timeout=DEADLINE)
        except concurrent.futures.TimeoutError:
            _release(fifos)
            raise AssertionError(f"blocked for {DEADLINE} s (opened a FIFO?)") from None


@pytest.fixture
def odd_dir(tmp_path: Path) -> Iterator[tuple[Path, list[Path]]]:
    """A checkpoint dir: two sound segments plus a FIFO, a socket, a directory
    and a dangling symlink, all named like segments (and sorting between them)."""
    d = tmp_path / "run" / "checkpoint"
    write_segment_file(d, [rec(1)], "seg-1.amlog")
    write_segment_file(d, [rec(2)], "seg-5.amlog")
    fifo = d / "seg-2.amlog"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock_path = d / "seg-3.amlog"
    try:
        sock.bind(os.fspath(sock_path))
    except OSError:  # a path too long for AF_UNIX: a second FIFO instead
        sock.close()
        os.mkfifo(sock_path)
    (d / "seg-4.amlog").mkdir()
    (d / "seg-0.amlog").symlink_to(d / "missing.amlog")
    try:
        yield d, [fifo, sock_path]
    finally:
        sock.close()
        _release([fifo, sock_path])


class TestNonRegularFiles:
    """FIFOs, sockets, directories and dangling links named like segments are skipped with a note."""

    def test_list_segments_skips_and_warns(self, odd_dir: tuple[Path, list[Path]]) -> None:
        """Only the regular files are listed; each skipped entry warns once, naming it and its kind."""
        d, fifos = odd_dir
        with pytest.warns(RuntimeWarning) as caught:
            segs = no_hang(lambda: list_segments(d), fifos)
        assert [s.name for s in segs] == ["seg-1.amlog", "seg-5.amlog"]
        text = "\n".join(str(w.message) for w in caught)
        for name, kind in [
            ("seg-2.amlog", "a FIFO"),
            ("seg-4.amlog", "a directory"),
            ("seg-0.amlog", "a dangling symlink"),
        ]:
            assert name in text and kind in text
        assert "seg-3.amlog" in text
        notes: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # with a notes list: no warning, lines instead
            assert list_segments(d, notes) == segs
        assert len(notes) == 4

    def test_load_paths(self, odd_dir: tuple[Path, list[Path]]) -> None:
        """Loading keeps every sound record and reports each skipped entry as an error line."""
        d, fifos = odd_dir
        for path in (d, d.parent):
            r = no_hang(lambda p=path: load_paths([p]), fifos)  # type: ignore[misc]
            assert r.table == {rec(1).key: rec(1).value, rec(2).key: rec(2).value}
            assert len(r.errors) == 4 and all("not a regular file" in e for e in r.errors)

    async def test_memoizer_start(self, odd_dir: tuple[Path, list[Path]], tmp_path: Path) -> None:
        """A Memoizer whose checkpoints hold a FIFO starts, warns, and hits what loaded."""
        d, fifos = odd_dir

        async def start() -> tuple[int, int]:
            async with Memoizer(checkpoint_files=[d], run_dir=tmp_path / "new") as memo:
                return memo.stats().entries, memo.stats().load_errors

        try:
            with pytest.warns(RuntimeWarning, match="not a regular file"):
                loaded, errors = await asyncio.wait_for(start(), DEADLINE)
        except TimeoutError:
            _release(fifos)
            raise AssertionError("Memoizer start blocked on a FIFO") from None
        assert loaded == 2 and errors == 4

    def test_log_store_default_run_dirs(self, odd_dir: tuple[Path, list[Path]]) -> None:
        """The default load (every run of a runinfo root) skips them too."""
        d, fifos = odd_dir
        runinfo = d.parent.parent
        os.rename(d.parent, runinfo / "000")

        async def start() -> int:
            async with Memoizer(checkpoint_mode="task_exit", config_run_dir=runinfo) as memo:
                return memo.stats().entries

        with pytest.warns(RuntimeWarning, match="not a regular file"):
            assert no_hang(lambda: asyncio.run(start()), fifos) == 2

    @pytest.mark.parametrize("command", ["inspect", "verify"])
    def test_inspect_and_verify(
        self, odd_dir: tuple[Path, list[Path]], command: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """inspect and verify finish, count the sound records, and list the skipped files."""
        d, fifos = odd_dir
        code = no_hang(lambda: _cli.main([command, str(d), "--json"]), fifos)
        out, err = capsys.readouterr()
        assert code == 0
        report = json.loads(out)
        assert report["records"] == 2 and len(report["skipped_files"]) == 4
        assert err.count("warning:") == 4 and "a FIFO" in err

    def test_compact(self, odd_dir: tuple[Path, list[Path]]) -> None:
        """compact rewrites the sound segments and leaves the odd entries alone."""
        d, fifos = odd_dir
        summary = no_hang(lambda: compact(d), fifos)
        assert summary["segments_in"] == 2 and summary["records_out"] == 2
        assert len(summary["skipped_files"]) == 4
        assert [s.name for s in list_segments(d, [])] == [Path(summary["output"]).name]
        assert (d / "seg-2.amlog").exists() and (d / "seg-4.amlog").is_dir()
        assert load_paths([d]).table == {rec(1).key: rec(1).value, rec(2).key: rec(2).value}

    def test_compact_skips_a_fifo_named_like_its_temp_file(self, tmp_path: Path) -> None:
        """The sweep of a dead compaction's temp files never opens a FIFO."""
        d = tmp_path / "ck"
        write_segment_file(d, [rec(1)])
        fifo = d / ".compact-0000.tmp"
        os.mkfifo(fifo)
        try:
            no_hang(lambda: compact(d), [fifo])
        finally:
            _release([fifo])
        assert fifo.exists()

    def test_explain(self, odd_dir: tuple[Path, list[Path]]) -> None:
        """explain reads the sound segments and skips the rest."""
        d, fifos = odd_dir
        with pytest.warns(RuntimeWarning):
            ex = no_hang(lambda: explain({"func": "m.f", "args": [1], "kwargs": {}}, [d]), fifos)
        assert not ex.hit and ex.records_scanned == 2 and ex.records_of_func == 2

    def test_fifo_given_directly(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A FIFO passed as the path itself is an input error, not a hang."""
        fifo = tmp_path / "seg-9.amlog"
        os.mkfifo(fifo)
        try:
            assert "a FIFO" in resolve(fifo).problem
            with pytest.raises(CheckpointPathError, match="a FIFO"):
                no_hang(lambda: find_segments(fifo), [fifo])
            ex = no_hang(lambda: explain({"func": "m.f"}, [fifo]), [fifo])
            assert ex.records_scanned == 0
            r = no_hang(lambda: load_paths([fifo]), [fifo])
            assert r.table == {} and "a FIFO" in r.errors[0]
            assert no_hang(lambda: _cli.main(["verify", str(fifo)]), [fifo]) == 2
            assert "a FIFO" in capsys.readouterr().err
        finally:
            _release([fifo])

    def test_swapped_for_a_fifo_after_listing(self, tmp_path: Path) -> None:
        """The open itself refuses a FIFO (O_NONBLOCK + fstat): no race with the listing."""
        fifo = tmp_path / "seg-1.amlog"
        os.mkfifo(fifo)
        try:
            with pytest.raises(OSError, match="not a regular file"):
                no_hang(lambda: open_segment(fifo), [fifo])
            with pytest.raises(OSError, match="not a regular file"):
                no_hang(lambda: list(iter_segment(fifo)), [fifo])
            with pytest.raises(OSError, match="not a regular file"):
                no_hang(lambda: read_segment_header(fifo), [fifo])
            assert no_hang(lambda: is_segment_in_use(fifo), [fifo]) is False
        finally:
            _release([fifo])

    def test_symlinks_to_segments_are_followed(self, tmp_path: Path) -> None:
        """A symlink to a regular segment loads like the segment (documented choice)."""
        real = write_segment_file(tmp_path / "elsewhere", [rec(7)])
        d = tmp_path / "ck"
        d.mkdir()
        (d / "seg-1.amlog").symlink_to(real)
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        (d / "seg-2.amlog").symlink_to(fifo)  # a link to a FIFO: skipped
        try:
            r = no_hang(lambda: load_paths([d]), [fifo])
        finally:
            _release([fifo])
        assert r.table == {rec(7).key: rec(7).value}
        assert len(r.errors) == 1 and "a FIFO" in r.errors[0]
        summary = no_hang(lambda: compact(d), [fifo])
        assert len(summary["skipped_files"]) == 1 and "a FIFO" in summary["skipped_files"][0]
        assert not (d / "seg-1.amlog").exists() and real.exists()  # the link went, not its target
        assert load_paths([d]).table == {rec(7).key: rec(7).value}


class TestResolve:
    """One resolver for loading, explain, the CLI and import-parsl."""

    def test_kinds(self, tmp_path: Path) -> None:
        """Segment, checkpoint dir, run dir, runinfo root, Parsl pickle and nothing."""
        s0 = write_segment_file(tmp_path / "000" / "checkpoint", [rec(1)])
        s1 = write_segment_file(tmp_path / "001" / "checkpoint", [rec(2)])
        (tmp_path / "001" / "checkpoint" / "tasks.pkl").write_bytes(b"")
        assert resolve(s0).kind == "segment" and resolve(s0).segments == (s0,)
        assert resolve(s0.parent).kind == "checkpoint dir"
        assert resolve(tmp_path / "000").kind == "run dir"
        root = resolve(tmp_path)
        assert root.kind == "runinfo root" and root.segments == (s0, s1)
        assert root.pickles == (tmp_path / "001" / "checkpoint" / "tasks.pkl",)
        pkl = resolve(tmp_path / "001" / "checkpoint" / "tasks.pkl")
        assert pkl.kind == "parsl pickle" and "import-parsl" in pkl.problem
        (tmp_path / "empty").mkdir()
        for p in (tmp_path / "empty", tmp_path / "nope"):
            r = resolve(p)
            assert r.kind == "none" and r.segments == () and r.problem

    def test_one_stamp_format(self) -> None:
        """Segment names carry new_stamp(), and segment_stamp reads it back."""
        stamp = new_stamp()
        assert len(stamp) == len("20260101T000000.000000Z") and stamp.endswith("Z")
        name = segment_name(stamp)
        assert segment_stamp(name) == stamp and name.endswith(".amlog")
        from datetime import datetime

        datetime.strptime(stamp, STAMP_FORMAT)  # parses with the one format


class TestImportParsl:
    """import-parsl reads only regular tasks.pkl files."""

    def test_import_parsl_never_opens_a_fifo(self, tmp_path: Path) -> None:
        """A FIFO named tasks.pkl is not a Parsl checkpoint: refused at once, not read."""
        d = tmp_path / "000" / "checkpoint"
        d.mkdir(parents=True)
        fifo = d / "tasks.pkl"
        os.mkfifo(fifo)
        try:
            with pytest.raises(MaintenanceError, match="no Parsl checkpoint"):
                no_hang(lambda: import_parsl(tmp_path, trust=True), [fifo])
        finally:
            _release([fifo])
