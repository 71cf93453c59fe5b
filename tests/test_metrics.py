"""OpenTelemetry metrics (``aiomemo[otel]``), read with the SDK's in-memory reader."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from aiomemo import Memoizer, _metrics
from aiomemo.testing import FailingStore, MemoryLeaseStore
from helpers import mk, run

_READER: list[InMemoryMetricReader] = []


@pytest.fixture
def reader() -> InMemoryMetricReader:
    """One SDK provider for the process (OpenTelemetry allows setting it once)."""
    if not _READER:
        r = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[r]))
        _READER.append(r)
    return _READER[0]


def snapshot(reader: InMemoryMetricReader) -> dict[str, Any]:
    """name -> value (sum for counters, (count, sum, attributes) for histograms)."""
    out: dict[str, Any] = {}
    data = reader.get_metrics_data()
    if data is None:  # nothing made an instrument yet
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            if sm.scope.name != "aiomemo":
                continue
            for m in sm.metrics:
                pts = list(m.data.data_points)
                if hasattr(pts[0], "bucket_counts"):
                    out[m.name] = [(p.count, p.sum, dict(p.attributes or {})) for p in pts]
                else:
                    out[m.name] = sum(p.value for p in pts)
                out[m.name + ":unit"] = m.unit
                out[m.name + ":description"] = m.description
    return out


def hist(snap: dict[str, Any], name: str) -> tuple[int, float]:
    return sum(c for c, _, _ in snap.get(name, [])), sum(s for _, s, _ in snap.get(name, []))


async def test_counters_and_histograms(reader: InMemoryMetricReader, tmp_path: Path) -> None:
    """Hits, misses, collapsed, writes and loads show up under their names and units."""
    before = snapshot(reader)
    w0 = hist(before, "aiomemo.checkpoint.duration")
    l0 = hist(before, "aiomemo.load.duration")
    async with Memoizer(checkpoint_mode="task_exit", run_dir=tmp_path / "r1") as memo:
        for i in range(5):
            assert await run(memo, mk(i), i * 10) == i * 10  # 5 misses, 5 writes
        for i in range(3):
            assert await run(memo, mk(i), -1) == i * 10  # 3 hits
        leader = mk(99)
        assert await memo.check_memo(leader) is None
        follower = await memo.check_memo(mk(99))  # collapsed onto the leader
        assert follower is not None
        await memo.update_memo_result(leader, 990)
        assert await asyncio.wait_for(follower, 10) == 990
    mid = snapshot(reader)
    assert mid["aiomemo.hits"] - before.get("aiomemo.hits", 0) == 3
    assert mid["aiomemo.misses"] - before.get("aiomemo.misses", 0) == 6
    assert mid["aiomemo.collapsed"] - before.get("aiomemo.collapsed", 0) == 1
    assert mid["aiomemo.checkpoint.records"] - before.get("aiomemo.checkpoint.records", 0) == 6
    count, total = hist(mid, "aiomemo.checkpoint.duration")
    assert count - w0[0] >= 1 and total > w0[1]  # group commits: one or more writes
    sizes = mid["aiomemo.checkpoint.size"]
    assert any(a == {"aiomemo.store": "LogStore"} for _, _, a in sizes)
    assert hist(mid, "aiomemo.checkpoint.size")[1] > hist(before, "aiomemo.checkpoint.size")[1]
    assert mid["aiomemo.hits:unit"] == "{hit}"
    assert mid["aiomemo.checkpoint.duration:unit"] == "s"
    assert mid["aiomemo.checkpoint.size:unit"] == "By"
    assert "fsync" in mid["aiomemo.checkpoint.duration:description"]

    async with Memoizer(
        checkpoint_mode="dfk_exit", checkpoint_files=[tmp_path / "r1"], run_dir=tmp_path / "r2"
    ) as again:
        assert await run(again, mk(4), -1) == 40
    after = snapshot(reader)
    assert after["aiomemo.load.records"] - mid.get("aiomemo.load.records", 0) == 6
    assert hist(after, "aiomemo.load.duration")[0] > hist(mid, "aiomemo.load.duration")[0]
    assert hist(mid, "aiomemo.load.duration")[0] >= l0[0]
    assert after["aiomemo.load.duration:unit"] == "s"


async def test_remote_hits_and_store_errors(reader: InMemoryMetricReader, tmp_path: Path) -> None:
    """A shared store's hit counts as remote; a failed checkpoint write as an error."""
    before = snapshot(reader)
    shared = MemoryLeaseStore()
    async with Memoizer(checkpoint_mode=None, store=shared, run_dir=tmp_path / "a") as a:
        await run(a, mk(7), 70)
    async with Memoizer(checkpoint_mode=None, store=shared, run_dir=tmp_path / "b") as b:
        assert await run(b, mk(7), -1) == 70
    failing = FailingStore(failures=1)
    with pytest.warns(RuntimeWarning, match="injected"):
        async with Memoizer(checkpoint_mode="manual", store=failing, run_dir=tmp_path / "c") as c:
            await run(c, mk(8), 80)
            with pytest.raises(Exception, match="injected"):
                await c.checkpoint()
            assert await c.checkpoint() == 1
    after = snapshot(reader)
    assert after["aiomemo.remote_hits"] - before.get("aiomemo.remote_hits", 0) == 1
    assert after["aiomemo.checkpoint.errors"] - before.get("aiomemo.checkpoint.errors", 0) == 1


async def test_totals_survive_a_collected_memoizer(
    reader: InMemoryMetricReader, tmp_path: Path
) -> None:
    """Counters never go down: a garbage-collected Memoizer's counts stay in the totals."""
    import gc

    memo = Memoizer(checkpoint_mode=None, run_dir=tmp_path)
    await memo.start()
    await run(memo, mk(1), 1)
    await run(memo, mk(1), 1)
    await memo.close()
    mid = snapshot(reader)
    del memo
    gc.collect()
    after = snapshot(reader)
    assert after["aiomemo.hits"] >= mid["aiomemo.hits"]
    assert after["aiomemo.misses"] == mid["aiomemo.misses"]


def test_every_counter_names_a_counter_field() -> None:
    """The table of observable counters matches Counters' fields."""
    from aiomemo._counters import Counters

    names = {f for f in Counters.__dataclass_fields__}
    for name, attr, unit, desc in _metrics.COUNTERS:
        assert name.startswith("aiomemo.") and attr in names and unit and desc


def _run_script(code: str, tmp_path: Path) -> str:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_without_opentelemetry_installed(tmp_path: Path) -> None:
    """With opentelemetry missing, the Memoizer works and nothing imports it."""
    out = _run_script(
        """
        import asyncio, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "opentelemetry":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        from aiomemo import Memoizer, _metrics
        from helpers import mk, run
        async def main():
            async with Memoizer(checkpoint_mode="task_exit", run_dir="r") as memo:
                await run(memo, mk(1), 1)
                assert await run(memo, mk(1), 2) == 1
                print(memo.stats().hits)
        asyncio.run(main())
        assert _metrics._instruments is None and not _metrics.active()
        print(any(m.startswith("opentelemetry") for m in sys.modules))
        """,
        tmp_path,
    )
    assert out.split() == ["1", "False"]


def test_sdk_set_after_the_memoizer_started(tmp_path: Path) -> None:
    """API only at first (no-op); a provider set later reports the totals so far."""
    out = _run_script(
        """
        import asyncio
        from aiomemo import Memoizer
        from helpers import mk, run
        async def main(memo):
            await run(memo, mk(1), 1)
            await run(memo, mk(1), 1)
        memo = Memoizer(checkpoint_mode=None, run_dir="r")
        asyncio.run(main(memo))
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        data = reader.get_metrics_data()
        got = {m.name: sum(p.value for p in m.data.data_points)
               for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        print(got["aiomemo.hits"], got["aiomemo.misses"])
        """,
        tmp_path,
    )
    assert out.split() == ["1", "1"]


async def test_expired_and_forgotten(reader: InMemoryMetricReader, tmp_path: Path) -> None:
    """Entries dropped by expiry and by forget() are counted."""
    before = snapshot(reader)
    async with Memoizer(checkpoint_mode="task_exit", run_dir=tmp_path / "a", ttl=0.05) as memo:
        await run(memo, mk(1), 1)
        await asyncio.sleep(0.1)
        assert await memo.check_memo(mk(1)) is None  # expired: a miss
        await run(memo, mk(2), 2)
        assert await memo.forget(mk(2)) == 1
    after = snapshot(reader)
    assert after["aiomemo.expired"] - before.get("aiomemo.expired", 0) == 1
    assert after["aiomemo.forgotten"] - before.get("aiomemo.forgotten", 0) == 1


def test_writes_from_engine_threads_are_timed(reader: InMemoryMetricReader, tmp_path: Path) -> None:
    """ParslMemoizer's task_exit records, written by the completing threads, are timed too."""
    pytest.importorskip("parsl")
    from aiomemo.parsl import ParslMemoizer

    def task(i: int) -> dict[str, Any]:
        return {
            "id": i,
            "func": task,
            "args": (i,),
            "kwargs": {},
            "memoize": True,
            "ignore_for_cache": [],
            "hashsum": None,
        }

    before = snapshot(reader)
    w0 = hist(before, "aiomemo.checkpoint.duration")
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    memoizer.start(run_dir=str(tmp_path / "000"), config_run_dir=str(tmp_path))
    try:
        for i in range(4):
            t = task(i)
            assert memoizer.check_memo(t) is None  # type: ignore[arg-type]
            memoizer.update_memo_result(t, i)  # type: ignore[arg-type]
    finally:
        memoizer.close()
    after = snapshot(reader)
    count, total = hist(after, "aiomemo.checkpoint.duration")
    assert count - w0[0] >= 4 and total > w0[1]  # one durable write per completion here
    assert after["aiomemo.checkpoint.records"] - before.get("aiomemo.checkpoint.records", 0) == 4
