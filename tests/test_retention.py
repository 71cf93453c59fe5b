"""``Memoizer(retention=Retention(...))``: gc's policy at start, in the background."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiomemo import Memoizer, Retention, _retention
from aiomemo._checkpoint import load_paths
from aiomemo._retention_wire import pack_keys, unpack_keys
from aiomemo._rundir import get_all_checkpoints
from aiomemo._table import MemoTable
from helpers import mk, run


def size(root: Path, skip: Path | None = None) -> int:
    return sum(
        p.stat().st_size for p in root.rglob("*.amlog") if skip is None or skip not in p.parents
    )


async def _runs(root: Path, n: int = 3, per: int = 200, big: bool = False) -> None:
    """``n`` earlier runs, each recording ``per`` results (later runs later in time)."""
    for r in range(n):
        async with Memoizer(checkpoint_mode="dfk_exit", config_run_dir=root) as memo:
            for i in range(per):
                value: Any = (b"%03d" % i) * 7000 if big else (b"%d" % i) * 20
                await run(memo, mk(r * per + i), value)
        await asyncio.sleep(0.01)  # record times grow from run to run


@pytest.mark.parametrize(
    ("kw", "err"),
    [({"max_bytes": "10XB"}, ValueError), ({"max_age": "soon"}, ValueError),
     ({"max_age": -1}, ValueError), ({"max_bytes": [1]}, TypeError),
     ({"max_age": object()}, TypeError), ({"max_bytes": True}, TypeError)],
)  # fmt: skip
def test_bad_retention(kw: dict[str, Any], err: type[Exception]) -> None:
    with pytest.raises(err, match="Retention"):
        Retention(**kw)


def test_retention_argument() -> None:
    with pytest.raises(TypeError, match="Retention"):
        Memoizer(retention={"max_bytes": "1GB"})  # type: ignore[arg-type]
    Memoizer(retention=Retention(max_bytes="10GiB", max_age=dt.timedelta(days=30)))


async def test_budget_at_start(tmp_path: Path) -> None:
    """The oldest runs' records go, the memo misses them, the rest hit; the budget holds."""
    root = tmp_path / "ri"
    await _runs(root)
    budget = size(root) // 2
    async with Memoizer(
        checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=budget)
    ) as memo:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        report = await memo.retention_report()
        ticker.cancel()
        assert ticks > 1  # the loop kept turning while the child worked
        assert report is not None and report["removed"]["over_budget"] > 0
        assert report["budget_met"] and size(root) <= budget
        gone = 0
        for i in range(600):
            task = mk(i)
            fut = await memo.check_memo(task)
            if fut is None:
                gone += 1
                await memo.update_memo_result(task, (b"%d" % (i % 200)) * 20)
            else:
                assert await fut == (b"%d" % (i % 200)) * 20
        assert gone == report["removed"]["over_budget"]
        assert memo.stats().load_errors == 0
        own = memo.run_dir
    assert own is not None
    # what the next run loads: everything, the recomputed results in this run's segment
    rep = load_paths(get_all_checkpoints(str(root)))
    assert len(rep.table) == 600 and not rep.errors


async def test_large_values_loaded_stay_readable(tmp_path: Path) -> None:
    """Segments holding large values the memo left on disk are not rewritten under it."""
    root = tmp_path / "ri"
    await _runs(root, n=2, per=30, big=True)  # 21 KB values: value frames
    async with Memoizer(
        checkpoint_mode="task_exit",
        config_run_dir=root,
        memory_limit=0,
        retention=Retention(max_bytes=1),
    ) as memo:
        report = await memo.retention_report()
        assert report is not None and report["removed"]["over_budget"] == 0
        assert not report["budget_met"]
        for i in range(60):
            fut = await memo.check_memo(mk(i))
            assert fut is not None and await fut == (b"%03d" % (i % 30)) * 7000
        assert memo.stats().load_errors == 0


async def test_age_and_no_loaded_paths(tmp_path: Path) -> None:
    """max_age drops old runs' records; with nothing loaded the report is None."""
    root = tmp_path / "ri"
    async with Memoizer(
        checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_age="1h")
    ) as memo:
        assert await memo.retention_report() is None
        await run(memo, mk(1), 1)
    await asyncio.sleep(0.05)
    async with Memoizer(
        checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_age=0.01)
    ) as memo:
        report = await memo.retention_report()
        assert report is not None and report["removed"]["too_old"] == 1
        task = mk(1)
        assert await memo.check_memo(task) is None  # dropped from the memo too
        await memo.update_memo_result(task, 1)


async def test_segments_a_writer_holds_are_left(tmp_path: Path) -> None:
    """Another run still writing: its segment (and its records) stay as they are."""
    root = tmp_path / "ri"
    await _runs(root, n=1)
    async with Memoizer(checkpoint_mode="task_exit", config_run_dir=root) as writer:
        for i in range(1000, 1100):
            await run(writer, mk(i), i)
        held = next(writer.run_dir.rglob("*.amlog"))  # type: ignore[union-attr]
        before = held.read_bytes()
        async with Memoizer(
            checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=1)
        ) as memo:
            report = await memo.retention_report()
            assert report is not None and report["segments_held"] == [str(held)]
            assert report["removed"]["over_budget"] == 200  # the finished run's records
            assert held.read_bytes() == before
            for i in (1000, 1099):
                fut = await memo.check_memo(mk(i))
                assert fut is not None and await fut == i


async def test_a_segment_file_given_is_left_alone(tmp_path: Path) -> None:
    """checkpoint_files naming one segment: retention does not rewrite its dir."""
    root = tmp_path / "ri"
    await _runs(root, n=1, per=20)
    seg = next(root.rglob("*.amlog"))
    before = seg.read_bytes()
    async with Memoizer(
        checkpoint_mode=None,
        checkpoint_files=[seg],
        config_run_dir=tmp_path / "other",
        retention=Retention(max_bytes=1),
    ) as memo:
        report = await memo.retention_report()
        assert report is not None and report["records_removed"] == 0
        assert report["skipped_files"] and "segment file" in report["skipped_files"][0]
    assert seg.read_bytes() == before


# ---------------------------------------------------------------- the child process


def _value(i: int) -> bytes:
    return (b"%d" % (i % 200)) * 20


async def _check_correct(root: Path, n: int = 600) -> int:
    """A fresh Memoizer loads only correct values; how many of the ``n`` tasks hit."""
    files = [f for f in get_all_checkpoints(str(root)) if any(Path(f).glob("*.amlog"))]
    if not files:
        return 0
    async with Memoizer(checkpoint_mode=None, checkpoint_files=files, config_run_dir=root) as memo:
        hits = 0
        for i in range(n):
            fut = await memo.check_memo(mk(i))
            if fut is not None:
                assert await fut == _value(i)
                hits += 1
        assert memo.stats().load_errors == 0
    return hits


def _tree(root: Path) -> dict[str, bytes]:
    return {os.fspath(p): p.read_bytes() for p in sorted(root.rglob("*.amlog"))}


async def _until(cond: Any, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0)


@given(st.lists(st.binary(max_size=300), max_size=50))
def test_key_frames_round_trip(keys: list[bytes]) -> None:
    assert unpack_keys(pack_keys(keys)) == keys


@pytest.mark.parametrize("payload", [b"\x00", b"\x00\x05abc"])
def test_truncated_key_frames_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="key frame ends"):
        unpack_keys(payload)


async def test_the_run_is_a_child_process(tmp_path: Path) -> None:
    """The plan and the rewrite run in another process, not in this one's threads."""
    root = tmp_path / "ri"
    await _runs(root, n=2)
    async with Memoizer(
        checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=1)
    ) as memo:
        ret = memo._retention
        assert ret is not None
        await _until(lambda: ret.pid is not None)
        assert ret.pid != os.getpid()
        report = await memo.retention_report()
        assert report is not None and report["removed"]["over_budget"] == 400
        assert ret.pid is None  # reaped
    assert await _check_correct(root) == 0


@pytest.mark.parametrize("when", ["started", "dropping", "applying", 0.05, 0.15, 0.3])
async def test_child_killed_mid_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str | float
) -> None:
    """kill -9 of the child at any point: a warning, the memo serves only what stays, a
    later run loads a correct checkpoint."""
    root = tmp_path / "ri"
    await _runs(root)
    budget = size(root) // 2
    runs: list[_retention.RetentionRun] = []
    if when == "dropping":  # kill it while the parent drops the evicted keys
        remove = MemoTable.remove

        def kill_then_remove(self: MemoTable, key: str, raw: bytes) -> bool:
            pid = runs[0].pid if runs else None
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return remove(self, key, raw)

        monkeypatch.setattr(MemoTable, "remove", kill_then_remove)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with Memoizer(
            checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=budget)
        ) as memo:
            ret = memo._retention
            assert ret is not None
            runs.append(ret)
            if when != "dropping":
                await _until(lambda: ret.pid is not None)
                if when == "applying":
                    await _until(lambda: ret._applying or ret.pid is None)
                elif not isinstance(when, str):
                    await asyncio.sleep(when)
                pid = ret.pid
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            report = await memo.retention_report()
            if report is None:
                assert any("retention failed" in str(w.message) for w in caught)
            # what the memo still serves is correct, and a miss can be recomputed
            hits = 0
            for i in range(600):
                fut = await memo.check_memo(mk(i))
                if fut is not None:
                    assert await fut == _value(i)
                    hits += 1
            assert memo.stats().load_errors == 0
    monkeypatch.undo()
    if when == "dropping":
        assert report is None and hits < 600  # killed before the rewrite: files unchanged
        assert await _check_correct(root) == 600
    else:
        floor = 0 if report is None else 600 - report["records_removed"]
        assert await _check_correct(root) >= floor


async def test_child_failure_is_a_warning(tmp_path: Path) -> None:
    """A damaged span the child would rewrite: it refuses, the parent warns, nothing is removed."""
    root = tmp_path / "ri"
    await _runs(root, n=2)
    seg = sorted(root.rglob("*.amlog"))[0]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    before = _tree(root)
    with pytest.warns(RuntimeWarning) as caught:
        async with Memoizer(
            checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=1)
        ) as memo:
            assert await memo.retention_report() is None
            fut = await memo.check_memo(mk(399))  # the undamaged run still hits
            assert fut is not None and await fut == _value(399)
    msgs = [str(w.message) for w in caught]
    assert any("retention failed" in m and "damaged span" in m for m in msgs), msgs
    assert {k: v for k, v in _tree(root).items() if k in before} == before


async def test_child_that_cannot_start_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ri"
    await _runs(root, n=1)
    before = _tree(root)
    monkeypatch.setattr(_retention, "CHILD", "aiomemo._no_such_module")
    with pytest.warns(RuntimeWarning, match="retention failed .*exit status 1"):
        async with Memoizer(
            checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=1)
        ) as memo:
            assert await memo.retention_report() is None
            fut = await memo.check_memo(mk(5))
            assert fut is not None and await fut == _value(5)
    assert {k: v for k, v in _tree(root).items() if k in before} == before


async def test_close_while_planning_stops_the_child(tmp_path: Path) -> None:
    """close() before the rewrite: the child is ended, no warning, no file changed."""
    root = tmp_path / "ri"
    await _runs(root)
    before = _tree(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memo = Memoizer(
            checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=1)
        )
        await memo.start()
        ret = memo._retention
        assert ret is not None
        await _until(lambda: ret.pid is not None)
        pid = ret.pid
        await memo.close()
        assert ret.pid is None and await memo.retention_report() is None
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped
    assert {k: v for k, v in _tree(root).items() if k in before} == before
    assert await _check_correct(root) == 600


async def test_close_right_after_start(tmp_path: Path) -> None:
    """close() before the child even started: no child, no warning, nothing changed."""
    root = tmp_path / "ri"
    await _runs(root, n=1)
    before = _tree(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memo = Memoizer(
            checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=1)
        )
        await memo.start()
        await memo.close()
        assert await memo.retention_report() is None
    assert {k: v for k, v in _tree(root).items() if k in before} == before


async def test_close_while_rewriting_waits(tmp_path: Path) -> None:
    """close() once the child rewrites: it waits for the rewrite; the budget holds."""
    root = tmp_path / "ri"
    await _runs(root)
    budget = size(root) // 2
    memo = Memoizer(
        checkpoint_mode="task_exit", config_run_dir=root, retention=Retention(max_bytes=budget)
    )
    await memo.start()
    ret = memo._retention
    assert ret is not None
    await _until(lambda: ret._applying)
    await memo.close()
    report = await memo.retention_report()
    assert report is not None and report["budget_met"] and ret.pid is None
    assert size(root) <= budget
    assert await _check_correct(root) == 600 - report["removed"]["over_budget"]
