"""LogStore and MemoryStore beyond the shared store contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiomemo import CheckpointError
from aiomemo._checkpoint import list_segments, load_paths
from aiomemo.stores import LogStore, MemoryStore, Record


def rec(i: int, value: bytes | None = None) -> Record:
    """A record with key bytes([i]) * 32."""
    return Record(bytes([i]) * 32, value if value is not None else b"r%d" % i, "tests.f", 1.7e9 + i)


async def test_log_store_binds_run_dir_lazily(tmp_path: Path) -> None:
    """Without a directory, open(run_dir) binds run_dir/checkpoint and creates nothing before a put."""
    run_dir = tmp_path / "runinfo" / "000"
    store = LogStore()
    assert store.directory is None
    await store.open(run_dir=run_dir)
    assert store.directory == run_dir / "checkpoint"
    assert (await store.load()).table == {}
    assert not (tmp_path / "runinfo").exists()
    await store.put_many([rec(1), rec(2)])
    assert store.segment is not None and store.segment.parent == run_dir / "checkpoint"
    await store.aclose()
    assert load_paths([run_dir]).table == {rec(1).key: b"r1", rec(2).key: b"r2"}


async def test_log_store_given_directory_wins(tmp_path: Path) -> None:
    """A directory given to the constructor is kept even when open() is told a run dir."""
    store = LogStore(tmp_path / "mine", fsync=False)
    await store.open(run_dir=tmp_path / "run")
    assert store.directory == tmp_path / "mine" and store.fsync is False
    await store.put_many([rec(3)])
    await store.aclose()
    assert not (tmp_path / "run").exists()
    assert list_segments(tmp_path / "mine")


async def test_log_store_load_sees_earlier_segments(tmp_path: Path) -> None:
    """Each open/close cycle writes its own segment and a later load sees them all, newest winning."""
    for value in (b"first", b"second"):
        async with LogStore(tmp_path) as store:
            await store.put_many([rec(1, value)])
    assert len(list_segments(tmp_path)) == 2
    async with LogStore(tmp_path) as store:
        report = await store.load()
    assert report.table == {rec(1).key: b"second"} and report.files == 2


async def test_log_store_without_directory_refuses(tmp_path: Path) -> None:
    """put_many on a LogStore that never got a directory raises CheckpointError with the count."""
    async with LogStore() as store:
        with pytest.raises(CheckpointError) as info:
            await store.put_many([rec(1), rec(2)])
    assert info.value.unsaved == 2


async def test_log_store_reports_damage(tmp_path: Path) -> None:
    """load() keeps intact records of a damaged directory and reports the damage."""
    async with LogStore(tmp_path) as store:
        await store.put_many([rec(1)])
        await store.put_many([rec(2)])
        seg = store.segment
    assert seg is not None
    seg.write_bytes(seg.read_bytes()[:-5])
    report = await LogStore(tmp_path).load()
    assert report.table == {rec(1).key: b"r1"} and report.skipped == 1 and len(report.errors) == 1


async def test_memory_store_basics() -> None:
    """MemoryStore keeps the newest record per key and serves load(), get() and get_many()."""
    store = MemoryStore()
    await store.put_many([rec(1), rec(2), rec(1, b"newer")])
    assert len(store) == 2 and store.records[rec(1).key].value == b"newer"
    assert await store.get(rec(1).key) == b"newer"
    assert await store.get(rec(9).key) is None
    assert dict(await store.get_many([rec(2).key, rec(9).key])) == {rec(2).key: b"r2"}
    report = await store.load()
    assert report.table == {rec(1).key: b"newer", rec(2).key: b"r2"} and report.records == 2
    report.table.clear()  # a copy: the store is unaffected
    assert len(store) == 2
