"""Completions made in the engine's threads: GroupCommit, and ParslMemoizer's task_exit through it.

A ``task_exit`` completion returns only once its record is durable; the
threads that wait write and fsync for one another (one group at a time); a
failed write leaves the records queued for the drain, never lost.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from aiomemo import _checkpoint as ck
from aiomemo._checkpoint import load_paths
from aiomemo._threaded import GroupCommit
from aiomemo.stores import Record

parsl = pytest.importorskip("parsl")

from aiomemo.parsl import ParslMemoizer  # noqa: E402


def _rec(i: int) -> Record:
    return Record(i.to_bytes(32, "big"), b"v", "tests.f", 0.0)


# ---------------------------------------------------------------- GroupCommit


@pytest.mark.parametrize("threads", [1, 2, 7, 24])
def test_group_commit_returns_only_after_the_write_holding_the_record(threads: int) -> None:
    """Every record is written exactly once, before its commit returns; writes < records."""
    written: set[bytes] = set()
    writes: list[int] = []
    active = [0]
    overlap = [False]
    guard = threading.Lock()
    rng = random.Random(threads)

    def write(batch: list[Record]) -> None:
        with guard:
            active[0] += 1
            overlap[0] |= active[0] > 1
        time.sleep(rng.random() * 0.002)  # a disk of varying speed
        with guard:
            for r in batch:
                assert r.key not in written, "a record was written twice"
                written.add(r.key)
            writes.append(len(batch))
            active[0] -= 1

    gc = GroupCommit(write)
    late: list[int] = []
    per_thread = 40

    def worker(t: int) -> None:
        for j in range(per_thread):
            rec = _rec(t * 1000 + j)
            gc.commit(rec)
            if rec.key not in written:
                late.append(t)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not late, "a commit returned before its record was written"
    assert len(written) == threads * per_thread == sum(writes)
    assert not overlap[0], "two writes ran at once"
    assert gc.groups == len(writes)
    if threads >= 7:
        assert len(writes) < threads * per_thread * 0.7, writes  # groups, not one write each


def test_group_commit_survives_a_write_that_raises() -> None:
    """A write that raises releases the group: its waiters return, the next group is written."""
    calls = [0]

    def write(batch: list[Record]) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("boom")

    gc = GroupCommit(write)
    with pytest.raises(RuntimeError):
        gc.commit(_rec(1))
    gc.commit(_rec(2))
    assert calls[0] == 2


# ---------------------------------------------------------------- one call: append + sync


def test_append_synced_appends_at_the_end_and_moves_the_offset(tmp_path: Path) -> None:
    """Whatever the file position, the bytes go at the end; a plain write after it follows them."""
    fd = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"head")
        os.lseek(fd, 0, os.SEEK_SET)
        ck._append_synced_now(fd, b"-synced")
        os.write(fd, b"-plain")
    finally:
        os.close(fd)
    assert (tmp_path / "seg").read_bytes() == b"head-synced-plain"


def test_append_synced_without_the_flags_writes_and_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without RWF_APPEND/RWF_DSYNC: os.write + os.fsync, same bytes, errors as OSError."""
    monkeypatch.setattr(ck, "_APPEND_DSYNC", None)
    fsyncs = [0]
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    monkeypatch.setattr(ck.os, "fsync", counting)
    fd = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"a")
        ck._append_synced_now(fd, b"bc")
        assert fsyncs[0] == 1

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(ck.os, "fsync", failing)
        with pytest.raises(OSError):
            ck._append_synced_now(fd, b"d")
    finally:
        os.close(fd)
    assert (tmp_path / "seg").read_bytes().startswith(b"abc")


def _break_disk(monkeypatch: pytest.MonkeyPatch, broken: threading.Event) -> None:
    """While ``broken`` is set, every sync to a segment fails (the threads' and the loop's)."""
    real_append, real_fsync = ck._append_synced, os.fsync

    def append(fd: int, data: bytes) -> None:
        if broken.is_set():
            raise OSError(errno.EIO, "I/O error")
        real_append(fd, data)

    def fsync(fd: int) -> None:
        if broken.is_set():
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(ck, "_append_synced", append)
    monkeypatch.setattr(ck.os, "fsync", fsync)


# ---------------------------------------------------------------- ParslMemoizer task_exit


def _task(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "func": _task,
        "args": (i,),
        "kwargs": {},
        "memoize": True,
        "ignore_for_cache": [],
        "hashsum": None,
    }


@pytest.fixture
def task_exit(tmp_path: Path) -> Iterator[ParslMemoizer]:
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    memoizer.start(run_dir=str(tmp_path / "000"), config_run_dir=str(tmp_path))
    try:
        yield memoizer
    finally:
        memoizer.close()


def _on_disk(tmp_path: Path) -> set[bytes]:
    d = tmp_path / "000" / "checkpoint"
    return set(load_paths([d]).table) if d.is_dir() else set()


def _complete_all(memoizer: ParslMemoizer, tasks: list[dict[str, Any]], check: Any) -> None:
    errors: list[BaseException] = []
    # all at once (threads started one by one on a loaded machine would
    # otherwise complete one by one)
    start = threading.Barrier(len(tasks))

    def complete(task: dict[str, Any]) -> None:
        try:
            start.wait(30)
            memoizer.update_memo_result(task, task["args"][0] * 2)  # type: ignore[arg-type]
            check(task)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=complete, args=(t,)) for t in tasks]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors


def test_task_exit_each_completion_returns_with_its_own_record_on_disk(
    tmp_path: Path, task_exit: ParslMemoizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No loop round trip, fewer fsyncs than tasks, and each caller's record durable on return."""
    n = 48
    tasks = [_task(i) for i in range(n)]
    for task in tasks:
        assert task_exit.check_memo(task) is None  # type: ignore[arg-type]
    fsyncs = [0]
    real_append = ck._append_synced

    def slow_append(fd: int, data: bytes) -> None:
        fsyncs[0] += 1
        time.sleep(0.005)  # completions pile up behind a commit
        real_append(fd, data)

    monkeypatch.setattr(ck, "_append_synced", slow_append)
    missing: list[int] = []

    def check(task: dict[str, Any]) -> None:
        if bytes.fromhex(task["hashsum"]) not in _on_disk(tmp_path):
            missing.append(task["id"])

    _complete_all(task_exit, tasks, check)
    monkeypatch.undo()
    assert not missing, f"tasks {missing} returned before their record was durable"
    assert 1 <= fsyncs[0] <= n // 3, fsyncs[0]
    stats = task_exit.stats()
    assert stats is not None and stats.checkpointed == n
    for task in tasks:  # the table has them: hits now
        hit = task_exit.check_memo(_task(task["id"]))  # type: ignore[arg-type]
        assert hit is not None and hit.result(1) == task["id"] * 2


def test_task_exit_followers_complete_with_a_leader_recorded_in_its_thread(
    task_exit: ParslMemoizer,
) -> None:
    leader, twin = _task(5), _task(5)
    twin["id"] = 6
    assert task_exit.check_memo(leader) is None  # type: ignore[arg-type]
    follower = task_exit.check_memo(twin)  # type: ignore[arg-type]
    assert follower is not None and not follower.done()
    task_exit.update_memo_result(leader, 10)  # type: ignore[arg-type]
    assert follower.result(10) == 10
    task_exit.update_memo_result(twin, 10)  # type: ignore[arg-type]  # the DFK reports it too


def test_task_exit_failed_fsync_keeps_records_queued_until_written(
    tmp_path: Path, task_exit: ParslMemoizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync fails nobody's task; the drain writes the records once the disk works."""
    tasks = [_task(i) for i in range(12)]
    for task in tasks:
        assert task_exit.check_memo(task) is None  # type: ignore[arg-type]
    broken = threading.Event()
    broken.set()
    _break_disk(monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="stay queued"):
        _complete_all(task_exit, tasks, lambda task: None)
        deadline = time.monotonic() + 10
        memo = task_exit.memoizer
        assert memo is not None
        while memo.stats().pending < len(tasks) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert memo.stats().pending == len(tasks)  # queued for retry, not lost
    assert memo.stats().write_errors >= 1
    broken.clear()  # the disk works again: the drain's retry writes them
    deadline = time.monotonic() + 10
    while memo.stats().pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert memo.stats().pending == 0
    assert {bytes.fromhex(t["hashsum"]) for t in tasks} <= _on_disk(tmp_path)


def test_task_exit_close_reports_records_a_broken_disk_never_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that stays broken: completions return, close() logs how many were not saved."""
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    memoizer.start(run_dir=str(tmp_path / "000"), config_run_dir=str(tmp_path))
    tasks = [_task(i) for i in range(5)]
    for task in tasks:
        assert memoizer.check_memo(task) is None  # type: ignore[arg-type]

    broken = threading.Event()
    broken.set()
    _break_disk(monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="stay queued"):
        _complete_all(memoizer, tasks, lambda task: None)
        with caplog.at_level(logging.ERROR, logger="parsl.aiomemo"):
            memoizer.close()
    assert any("could not save 5 checkpoint record(s)" in r.getMessage() for r in caplog.records)


def test_close_waits_for_completions_being_written(
    tmp_path: Path, task_exit: ParslMemoizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() during a slow commit: the record lands, nothing is lost or raised."""
    task = _task(1)
    assert task_exit.check_memo(task) is None  # type: ignore[arg-type]
    real_append = ck._append_synced
    in_fsync = threading.Event()

    def slow_append(fd: int, data: bytes) -> None:
        in_fsync.set()
        time.sleep(0.3)
        real_append(fd, data)

    monkeypatch.setattr(ck, "_append_synced", slow_append)
    t = threading.Thread(target=task_exit.update_memo_result, args=(task, 2))
    t.start()
    assert in_fsync.wait(10)
    task_exit.close()
    t.join(10)
    assert bytes.fromhex(task["hashsum"]) in _on_disk(tmp_path)


def test_a_result_recorded_in_its_thread_keeps_the_ttl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ttl= through the thread path: the record on disk expires, and so does the memo entry."""
    from aiomemo import _expiry

    now = [1_000_000.0]
    monkeypatch.setattr(_expiry, "now", lambda: now[0])
    memoizer = ParslMemoizer(checkpoint_mode="task_exit", ttl=60)
    memoizer.start(run_dir=str(tmp_path / "000"), config_run_dir=str(tmp_path))
    try:
        task = _task(3)
        assert memoizer.check_memo(task) is None  # type: ignore[arg-type]
        memoizer.update_memo_result(task, 6)  # type: ignore[arg-type]
        [seg] = ck.list_segments(tmp_path / "000" / "checkpoint")
        [info] = [i for i in ck.iter_segment(seg) if isinstance(i, ck.RecordInfo)]
        assert info.record.expires == pytest.approx(now[0] + 60)
        hit = memoizer.check_memo(_task(3))  # type: ignore[arg-type]
        assert hit is not None and hit.result(1) == 6
        now[0] += 61
        assert memoizer.check_memo(_task(3)) is None  # type: ignore[arg-type]  # expired: runs again
    finally:
        memoizer.close()


# ---------------------------------------------------------------- GroupCommit.submit


def test_submit_returns_at_once_and_then_runs_after_the_write() -> None:
    """submit() does not wait for the disk; each then() runs once its group is written."""
    gate = threading.Event()
    written: list[bytes] = []
    seen: dict[bytes, bool] = {}

    def write(batch: list[Record]) -> None:
        gate.wait(10)
        written.extend(r.key for r in batch)

    gc = GroupCommit(write)
    recs = [_rec(i) for i in range(50)]
    done = threading.Event()

    def then_for(rec: Record) -> Any:
        def then(error: BaseException | None) -> None:
            assert error is None
            seen[rec.key] = rec.key in written
            if len(seen) == len(recs):
                done.set()

        return then

    t0 = time.monotonic()
    for rec in recs:
        gc.submit(rec, then_for(rec))
    assert time.monotonic() - t0 < 5 and not seen  # nobody waited for the held write
    gate.set()
    assert done.wait(10)
    assert all(seen.values()), "a then ran before its record was written"
    assert gc.groups < len(recs)  # the records gathered behind the held write went in one group
    gc.close()


def test_close_writes_what_was_submitted_and_later_records_go_inline() -> None:
    """close() returns once every queued record is written; after it, submit writes in the caller."""
    writes: list[tuple[str, int]] = []

    def write(batch: list[Record]) -> None:
        time.sleep(0.01)
        writes.append((threading.current_thread().name, len(batch)))

    gc = GroupCommit(write)
    thens: list[BaseException | None] = []
    for i in range(20):
        gc.submit(_rec(i), thens.append)
    gc.close()
    assert len(thens) == 20 and sum(n for _, n in writes) == 20
    gc.submit(_rec(99), thens.append)
    assert len(thens) == 21 and writes[-1] == (threading.current_thread().name, 1)


def test_commit_from_a_then_is_written_inline_not_deadlocked() -> None:
    """A then() that commits again (a callback that records) does not wait on its own thread."""
    written: list[bytes] = []
    gc = GroupCommit(lambda batch: written.extend(r.key for r in batch))
    inner = threading.Event()

    def then(error: BaseException | None) -> None:
        gc.commit(_rec(2))  # on the writer thread: written right here
        inner.set()

    gc.submit(_rec(1), then)
    assert inner.wait(10)
    assert written == [_rec(1).key, _rec(2).key]
    gc.close()


def test_submit_hands_a_failed_write_to_every_then() -> None:
    errors: list[BaseException | None] = []
    gc = GroupCommit(lambda batch: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    ev = threading.Event()
    gc.submit(_rec(1), lambda e: (errors.append(e), ev.set()))
    assert ev.wait(10)
    assert isinstance(errors[0], OSError)
    gc.close()


# ---------------------------------------------------------------- task_exit without blocking the caller


class _DFKFuture(Future):  # type: ignore[type-arg]
    """The part of Parsl's AppFuture the DataFlowKernel uses when a task completes."""

    def __init__(self) -> None:
        super().__init__()
        self._update_lock = threading.Lock()


def _dfk_completes(memoizer: ParslMemoizer, task: dict[str, Any], result: Any) -> None:
    """What DataFlowKernel._complete_task_result does: update_memo_result, then set_result."""
    memoizer.update_memo_result(task, result)  # type: ignore[arg-type]
    with task["app_fu"]._update_lock:
        task["app_fu"].set_result(result)


def test_task_exit_app_future_completes_only_once_its_record_is_on_disk(
    tmp_path: Path, task_exit: ParslMemoizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The completing thread returns while the sync is held; the Future waits for the disk."""
    task = _task(1)
    task["app_fu"] = _DFKFuture()
    assert task_exit.check_memo(task) is None  # type: ignore[arg-type]
    real_append = ck._append_synced
    gate, in_sync = threading.Event(), threading.Event()

    def held_append(fd: int, data: bytes) -> None:
        in_sync.set()
        gate.wait(10)
        real_append(fd, data)

    monkeypatch.setattr(ck, "_append_synced", held_append)
    on_disk_at_done: list[bool] = []
    called = threading.Event()

    def at_done(f: Future) -> None:  # type: ignore[type-arg]
        on_disk_at_done.append(bytes.fromhex(task["hashsum"]) in _on_disk(tmp_path))
        called.set()

    task["app_fu"].add_done_callback(at_done)
    _dfk_completes(task_exit, task, 2)  # returns although the sync is held
    assert in_sync.wait(10)
    assert not task["app_fu"].done()
    gate.set()
    assert task["app_fu"].result(10) == 2
    assert called.wait(10)
    assert on_disk_at_done == [True]
    assert "set_result" not in vars(task["app_fu"])  # the stand-in is gone


def test_task_exit_record_durable_before_set_result_completes_at_once(
    tmp_path: Path, task_exit: ParslMemoizer
) -> None:
    """When the group is written before the DataFlowKernel sets the result, it goes through then."""
    task = _task(2)
    task["app_fu"] = _DFKFuture()
    assert task_exit.check_memo(task) is None  # type: ignore[arg-type]
    task_exit.update_memo_result(task, 4)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while bytes.fromhex(task["hashsum"]) not in _on_disk(tmp_path):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)  # the writer has released it by now
    assert not task["app_fu"].done()
    with task["app_fu"]._update_lock:
        task["app_fu"].set_result(4)
    assert task["app_fu"].done() and task["app_fu"].result() == 4


@pytest.mark.parametrize("threads", [4, 32])
def test_task_exit_many_threads_each_future_sees_its_record(
    tmp_path: Path, task_exit: ParslMemoizer, threads: int
) -> None:
    """Hundreds of completions from many threads: every Future completes after its record lands."""
    per = 25
    tasks = [_task(i) for i in range(threads * per)]
    late: list[int] = []
    for task in tasks:
        task["app_fu"] = _DFKFuture()
        assert task_exit.check_memo(task) is None  # type: ignore[arg-type]

        def check(f: Future, task: dict[str, Any] = task) -> None:  # type: ignore[type-arg]
            # the segment, read back now, holds the record (its tail is complete)
            if bytes.fromhex(task["hashsum"]) not in _on_disk(tmp_path):
                late.append(task["id"])

        task["app_fu"].add_done_callback(check)
    fsyncs = [0]
    real_append = ck._append_synced

    def counting(fd: int, data: bytes) -> None:
        fsyncs[0] += 1
        time.sleep(0.002)  # a slow disk: the syncs are shared on any machine
        real_append(fd, data)

    ck._append_synced = counting
    try:

        def worker(mine: list[dict[str, Any]]) -> None:
            for task in mine:
                _dfk_completes(task_exit, task, task["id"] * 3)

        ts = [
            threading.Thread(target=worker, args=(tasks[t::threads],)) for t in range(threads)
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        for task in tasks:
            assert task["app_fu"].result(30) == task["id"] * 3
        task_exit.close()  # the writer has run every done callback once close returns
    finally:
        ck._append_synced = real_append
    assert not late, f"futures of tasks {late[:10]} completed before their record was on disk"
    assert fsyncs[0] < len(tasks)


def test_task_exit_close_releases_held_futures_after_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while records wait behind a slow sync: they land, then their Futures complete."""
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    memoizer.start(run_dir=str(tmp_path / "000"), config_run_dir=str(tmp_path))
    real_append = ck._append_synced

    def slow_append(fd: int, data: bytes) -> None:
        time.sleep(0.05)
        real_append(fd, data)

    monkeypatch.setattr(ck, "_append_synced", slow_append)
    tasks = [_task(i) for i in range(30)]
    for task in tasks:
        task["app_fu"] = _DFKFuture()
        assert memoizer.check_memo(task) is None  # type: ignore[arg-type]
        _dfk_completes(memoizer, task, task["id"])
    memoizer.close()
    assert all(t["app_fu"].done() for t in tasks)
    assert {bytes.fromhex(t["hashsum"]) for t in tasks} <= _on_disk(tmp_path)


def test_task_exit_a_failed_write_still_completes_the_future(
    tmp_path: Path, task_exit: ParslMemoizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken disk fails no task: the Future completes, the record stays queued for retry."""
    broken = threading.Event()
    broken.set()
    _break_disk(monkeypatch, broken)
    task = _task(7)
    task["app_fu"] = _DFKFuture()
    assert task_exit.check_memo(task) is None  # type: ignore[arg-type]
    with pytest.warns(RuntimeWarning, match="stay queued"):
        _dfk_completes(task_exit, task, 14)
        assert task["app_fu"].result(10) == 14
        memo = task_exit.memoizer
        assert memo is not None
        deadline = time.monotonic() + 10
        while memo.stats().pending < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert memo.stats().pending == 1
    broken.clear()


_KILLED_WORKFLOW = """
import os, sys, time
import parsl
from parsl.config import Config
from parsl.executors import ThreadPoolExecutor
from aiomemo.parsl import ParslMemoizer

@parsl.python_app(cache=True)
def square(x):
    time.sleep(0.0005 * (x % 7))
    return x * x

cfg = Config(executors=[ThreadPoolExecutor(max_threads=6)], run_dir=sys.argv[1],
             memoizer=ParslMemoizer(checkpoint_mode="task_exit"), initialize_logging=False)
out = os.fdopen(1, "w", buffering=1)
with parsl.load(cfg):
    def report(f, i):
        out.write(f"{i} {f.result()}\\n")  # seen by the workflow: must be on disk
    futs = []
    for i in range(100_000):
        fut = square(i)
        fut.add_done_callback(lambda f, i=i: report(f, i))
        futs.append(fut)
    for f in futs:
        f.result()
"""


@pytest.mark.parametrize("delay", [0.4, 1.2])
def test_task_exit_killed_workflow_has_every_result_it_saw(tmp_path: Path, delay: float) -> None:
    """A Parsl workflow killed with SIGKILL mid-run: every app result it saw loads afterwards.

    The workflow prints each result from its AppFuture's done callback; the
    results are unique (squares), so the values on disk must cover them.
    """
    import signal
    import subprocess
    import sys

    from aiomemo import _codec

    script = tmp_path / "wf.py"
    script.write_text(_KILLED_WORKFLOW)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "runinfo")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[int] = []
    start: float | None = None
    for line in proc.stdout:
        seen.append(int(line.split()[1]))
        start = start or time.monotonic()
        if time.monotonic() - start >= delay:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(60)
    seen.extend(int(line.split()[1]) for line in proc.stdout if line.strip())
    assert proc.returncode == -signal.SIGKILL, "the workflow ended before it was killed"
    assert len(seen) > 20, "the workflow did not get going"
    report = load_paths(list((tmp_path / "runinfo").glob("*/checkpoint")))
    on_disk = {_codec.decode(v) for v in report.table.values() if isinstance(v, bytes)}
    missing = sorted(set(seen) - on_disk)
    assert not missing, f"{len(missing)} of {len(seen)} results seen are not on disk: {missing[:10]}"
