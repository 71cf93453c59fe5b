"""``Memoizer(retention=Retention(...))``: gc's policy at start, in the background."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from aiomemo import Memoizer, Retention
from aiomemo._checkpoint import load_paths
from aiomemo._rundir import get_all_checkpoints
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
        assert ticks > 1  # the loop kept turning while the thread worked
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
