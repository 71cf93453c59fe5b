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

    def complete(task: dict[str, Any]) -> None:
        try:
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
