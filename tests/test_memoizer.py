"""The asyncio Memoizer: configuration, lookup, collapse, cancellation, checkpoints."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import os
import pathlib
import pickle
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

import aiomemo
from aiomemo import (
    CheckpointError,
    LeaderCancelledError,
    Memoizer,
    MemoizerClosedError,
    UnhashableInputError,
)
from aiomemo.stores import MemoryStore, Record, Store
from helpers import add, mk, run


class FlakyStore(Store):
    """A store whose put_many fails while ``failing`` is positive (counts down)."""

    def __init__(self, failing: int = 0) -> None:
        self.failing = failing
        self.records: dict[bytes, bytes] = {}
        self.calls: list[int] = []

    async def put_many(self, records: Sequence[Record]) -> None:
        self.calls.append(len(records))
        if self.failing:
            self.failing -= 1
            raise aiomemo.StoreError("injected: disk full")
        for r in records:
            self.records[r.key] = r.value


class TestConfiguration:
    """Bad configuration fails at construction with a clear message."""

    @pytest.mark.parametrize("mode", ["always", "TASK_EXIT", "", 1])
    def test_unknown_mode(self, mode: Any) -> None:
        """An unknown checkpoint_mode is a ValueError naming the choices."""
        with pytest.raises(ValueError, match="task_exit"):
            Memoizer(checkpoint_mode=mode)

    @pytest.mark.parametrize("period", ["5", "1:2:3:4", "-1:00:00", "00:00:00", "a:b:c", -5, 0])
    def test_bad_period(self, period: Any) -> None:
        """Malformed, zero or negative periods are rejected."""
        with pytest.raises(ValueError, match="checkpoint_period"):
            Memoizer(checkpoint_mode="periodic", checkpoint_period=period)

    def test_period_required(self) -> None:
        """'periodic' without a period is rejected."""
        with pytest.raises(ValueError, match="checkpoint_period"):
            Memoizer(checkpoint_mode="periodic")

    @pytest.mark.parametrize(
        ("period", "seconds"),
        [("00:01:05", 65.0), (2, 2.0), (0.5, 0.5), (dt.timedelta(minutes=1), 60.0)],
    )
    def test_period_forms(self, period: Any, seconds: float) -> None:
        """'HH:MM:SS', numbers and timedeltas are accepted."""
        m = Memoizer(checkpoint_mode="periodic", checkpoint_period=period)
        assert m.checkpoint_period == seconds

    def test_missing_checkpoint_file(self, tmp_path: pathlib.Path) -> None:
        """A checkpoint file that does not exist is named in the error."""
        with pytest.raises(ValueError, match=r"checkpoint_files\[1\]"):
            Memoizer(checkpoint_files=[str(tmp_path), str(tmp_path / "nope")])

    def test_bad_store(self) -> None:
        """A store that is not a Store is a TypeError."""
        with pytest.raises(TypeError, match="Store"):
            Memoizer(store=[object()])  # type: ignore[list-item]


class TestLifecycle:
    """start/close, async with, run dirs."""

    async def test_close_idempotent_and_closed_calls(self, tmp_path: pathlib.Path) -> None:
        """close() twice is fine; calls after close raise MemoizerClosedError."""
        memo = Memoizer(run_dir=tmp_path / "r")
        await memo.start()
        await memo.close()
        await memo.close()
        with pytest.raises(MemoizerClosedError):
            await memo.check_memo(mk(1))
        with pytest.raises(MemoizerClosedError):
            await memo.start()

    async def test_mode_none_creates_nothing(self, tmp_path: pathlib.Path) -> None:
        """With no checkpoint mode nothing is written anywhere."""
        async with Memoizer(config_run_dir=tmp_path / "runinfo") as memo:
            await run(memo, mk(1), 1)
        assert not (tmp_path / "runinfo").exists()

    async def test_run_dir_created_on_first_write(self, tmp_path: pathlib.Path) -> None:
        """The numbered run dir appears only once something is written."""
        root = tmp_path / "runinfo"
        async with Memoizer(checkpoint_mode="manual", config_run_dir=root) as memo:
            assert memo.run_dir == root / "000"
            assert not root.exists()
            await run(memo, mk(1), 1)
            assert await memo.checkpoint() == 1
            assert (root / "000" / "checkpoint").is_dir()
        async with Memoizer(checkpoint_mode="manual", config_run_dir=root) as memo2:
            assert memo2.run_dir == root / "001"

    async def test_lazy_start(self, tmp_path: pathlib.Path) -> None:
        """check_memo before start() starts the Memoizer."""
        memo = Memoizer(run_dir=tmp_path)
        assert await memo.check_memo(mk(1)) is None
        await memo.close()


class TestLookup:
    """Hits, misses, collapse, exceptions, cancellation."""

    async def test_hit_after_result(self, tmp_path: pathlib.Path) -> None:
        """A finished task is a hit: a done Future with the result; hashsum is set."""
        async with Memoizer(run_dir=tmp_path) as memo:
            t = mk(1, b=2)
            assert await memo.check_memo(t) is None
            assert isinstance(t["hashsum"], str) and len(t["hashsum"]) == 64
            await memo.update_memo_result(t, 3)
            t2 = mk(1, b=2)
            fut = await memo.check_memo(t2)
            assert fut is not None and fut.done() and fut.result() == 3
            assert t2["hashsum"] == t["hashsum"] == await memo.make_hash(mk(1, b=2))
            s = memo.stats()
            assert (s.hits, s.misses, s.entries) == (1, 1, 1)

    async def test_memoize_off(self, tmp_path: pathlib.Path) -> None:
        """memoize=False (globally or per task) always misses and sets hashsum None."""
        async with Memoizer(run_dir=tmp_path, memoize=False) as memo:
            t = mk(1)
            assert await memo.check_memo(t) is None
            assert t["hashsum"] is None
            await memo.update_memo_result(t, 1)
            assert await memo.check_memo(mk(1)) is None
        async with Memoizer(run_dir=tmp_path) as memo:
            t = mk(1) | {"memoize": False}
            assert await memo.check_memo(t) is None
            await memo.update_memo_result(t, 1)
            assert await memo.check_memo(mk(1) | {"memoize": False}) is None

    async def test_collapse_1000(self, tmp_path: pathlib.Path) -> None:
        """1,000 concurrent identical calls run once."""
        runs = 0
        async with Memoizer(run_dir=tmp_path) as memo:

            @memo.cached
            async def slow(x: int) -> int:
                nonlocal runs
                runs += 1
                await asyncio.sleep(0.05)
                return x * 2

            results = await asyncio.gather(*(slow(21) for _ in range(1000)))
            assert results == [42] * 1000
            assert runs == 1
            s = memo.stats()
            assert s.collapsed == 999 and s.misses == 1

    async def test_collapse_off(self, tmp_path: pathlib.Path) -> None:
        """collapse=False: concurrent identical calls all miss (Parsl's behaviour)."""
        async with Memoizer(run_dir=tmp_path, collapse=False) as memo:
            futs = [await memo.check_memo(mk(1)) for _ in range(3)]
            assert futs == [None, None, None]

    async def test_exception_same_object(self, tmp_path: pathlib.Path) -> None:
        """A memoized exception comes back as the same object, to followers too."""
        async with Memoizer(run_dir=tmp_path) as memo:
            leader = mk(1)
            assert await memo.check_memo(leader) is None
            follower = await memo.check_memo(mk(1))
            assert follower is not None and not follower.done()
            err = ValueError("boom")
            await memo.update_memo_exception(leader, err)
            await asyncio.sleep(0)  # done callbacks run on the next loop turn
            assert follower.exception() is err
            later = await memo.check_memo(mk(1))
            assert later is not None and later.exception() is err

    async def test_exceptions_not_checkpointed(self, tmp_path: pathlib.Path) -> None:
        """Exceptions are never written to checkpoints."""
        async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit") as memo:
            t = mk(1)
            await memo.check_memo(t)
            await memo.update_memo_exception(t, ValueError("x"))
        memo = Memoizer(checkpoint_files=[tmp_path], run_dir=tmp_path / "b")
        with pytest.warns(RuntimeWarning, match="holds no checkpoints"):
            await memo.start()
        async with memo:
            assert await memo.check_memo(mk(1)) is None

    async def test_leader_cancelled(self, tmp_path: pathlib.Path) -> None:
        """A cancelled leader: entry dropped, followers get LeaderCancelledError."""
        async with Memoizer(run_dir=tmp_path) as memo:
            leader = mk(1)
            assert await memo.check_memo(leader) is None
            f1 = await memo.check_memo(mk(1))
            f2 = await memo.check_memo(mk(1))
            assert f1 is not None and f2 is not None
            await memo.update_memo_exception(leader, asyncio.CancelledError())
            with pytest.raises(LeaderCancelledError):
                await f1
            with pytest.raises(LeaderCancelledError):
                await f2
            assert await memo.check_memo(mk(1)) is None  # resubmitted: a new leader

    async def test_cached_takes_over_from_cancelled_leader(self, tmp_path: pathlib.Path) -> None:
        """With memo.cached one follower becomes the new leader when the first is cancelled."""
        runs = 0
        async with Memoizer(run_dir=tmp_path) as memo:

            @memo.cached
            async def work(x: int) -> int:
                nonlocal runs
                runs += 1
                await asyncio.sleep(0.1)
                return x

            first = asyncio.create_task(work(5))
            await asyncio.sleep(0.01)
            followers = [asyncio.create_task(work(5)) for _ in range(5)]
            await asyncio.sleep(0.01)
            first.cancel()
            assert await asyncio.gather(*followers) == [5] * 5
            assert runs == 2
            with pytest.raises(asyncio.CancelledError):
                await first

    async def test_cancelled_follower_leaves_work_alone(self, tmp_path: pathlib.Path) -> None:
        """Cancelling one follower neither cancels the leader nor other followers."""
        async with Memoizer(run_dir=tmp_path) as memo:

            @memo.cached
            async def work(x: int) -> int:
                await asyncio.sleep(0.05)
                return x

            lead = asyncio.create_task(work(1))
            await asyncio.sleep(0.005)
            f1 = asyncio.create_task(work(1))
            f2 = asyncio.create_task(work(1))
            await asyncio.sleep(0.005)
            f1.cancel()
            assert await lead == 1
            assert await f2 == 1
            assert f1.cancelled()

    async def test_unhashable_input(self, tmp_path: pathlib.Path) -> None:
        """check_memo raises UnhashableInputError naming the place."""
        async with Memoizer(run_dir=tmp_path) as memo:
            with pytest.raises(UnhashableInputError, match=r"kwargs\['b'\]"):
                await memo.check_memo(mk(1, b=object()))

    async def test_cached_key_and_version(self, tmp_path: pathlib.Path) -> None:
        """wrapper.key gives the call's key; version= separates look-alike functions."""
        async with Memoizer(run_dir=tmp_path) as memo:

            def make(v: int) -> Any:
                async def inner(x: int) -> int:
                    return x + v

                return inner

            a = memo.cached(make(1), version="a")
            b = memo.cached(make(2), version="b")
            assert await a(1) == 2
            assert await b(1) == 3
            assert await a.key(1) != await b.key(1)  # type: ignore[attr-defined]

    async def test_cached_rejects_sync(self, tmp_path: pathlib.Path) -> None:
        """memo.cached refuses a plain def."""
        memo = Memoizer(run_dir=tmp_path)
        with pytest.raises(TypeError, match="async def"):
            memo.cached(add)  # type: ignore[arg-type]

    async def test_in_flight_at_close(self, tmp_path: pathlib.Path) -> None:
        """Tasks in flight at close are dropped; close does not fail; followers are told."""
        memo = Memoizer(run_dir=tmp_path, checkpoint_mode="dfk_exit")
        await memo.start()
        assert await memo.check_memo(mk(1)) is None
        follower = await memo.check_memo(mk(1))
        await memo.close()
        assert follower is not None
        with pytest.raises(MemoizerClosedError):
            await follower


RESULTS: list[Any] = [
    None,
    True,
    42,
    2**100,
    -1.5,
    float("inf"),
    "text",
    b"bytes",
    bytearray(b"ba"),
    [1, [2, 3]],
    (1, (2, "x")),
    {"a": 1, 2: (3, 4)},
    {1, 2},
    frozenset({"x"}),
    complex(1, 2),
    decimal.Decimal("3.14"),
    dt.date(2024, 1, 2),
    dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    dt.time(1, 2, 3),
    dt.timedelta(seconds=5),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    pathlib.PurePosixPath("/x/y"),
    np.arange(6).reshape(2, 3),
]


class TestCheckpoints:
    """Run 1 checkpoints, run 2 loads and hits, in every mode."""

    @pytest.mark.parametrize("mode", ["task_exit", "periodic", "dfk_exit", "manual"])
    async def test_round_trip_every_mode(self, tmp_path: pathlib.Path, mode: Any) -> None:
        """Results of every codec type come back from the checkpoint, equal and same type."""
        root = tmp_path / "runinfo"
        kw: dict[str, Any] = {"checkpoint_mode": mode, "config_run_dir": root}
        if mode == "periodic":
            kw["checkpoint_period"] = 0.05
        async with Memoizer(**kw) as memo:
            for i, r in enumerate(RESULTS):
                await run(memo, mk(i), r)
            if mode == "manual":
                assert await memo.checkpoint() == len(RESULTS)
            if mode == "periodic":
                for _ in range(100):
                    if memo.stats().checkpointed == len(RESULTS):
                        break
                    await asyncio.sleep(0.02)
                assert memo.stats().checkpointed == len(RESULTS)
        async with Memoizer(**kw) as memo:
            for i, r in enumerate(RESULTS):
                fut = await memo.check_memo(mk(i))
                assert fut is not None, (i, r)
                got = fut.result()
                assert type(got) is type(r)
                if isinstance(r, np.ndarray):
                    assert np.array_equal(got, r)
                else:
                    assert got == r
            assert memo.stats().hits == len(RESULTS)

    async def test_task_exit_durable_on_return(self, tmp_path: pathlib.Path) -> None:
        """In task_exit mode the record is on disk when update_memo_result returns."""
        async with Memoizer(run_dir=tmp_path / "r", checkpoint_mode="task_exit") as memo:
            await run(memo, mk(7), 49)
            other = Memoizer(checkpoint_files=[tmp_path / "r"], run_dir=tmp_path / "o")
            async with other:
                fut = await other.check_memo(mk(7))
                assert fut is not None and fut.result() == 49

    async def test_group_commit(self, tmp_path: pathlib.Path) -> None:
        """64 completions arriving together share few writes, and all are durable."""
        store = FlakyStore()
        async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=store) as memo:
            tasks = [mk(i) for i in range(64)]
            for t in tasks:
                assert await memo.check_memo(t) is None
            await asyncio.gather(*(memo.update_memo_result(t, 1) for t in tasks))
            assert len(store.records) == 64
            assert len(store.calls) < 64 / 4

    async def test_cancelled_committer_leaves_batch_alone(self, tmp_path: pathlib.Path) -> None:
        """A task_exit caller cancelled while its batch is written cancels nobody else's."""
        store = FlakyStore()
        async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=store) as memo:
            tasks = [mk(i) for i in range(8)]
            for t in tasks:
                assert await memo.check_memo(t) is None
            calls = [asyncio.create_task(memo.update_memo_result(t, 1)) for t in tasks]
            await asyncio.sleep(0)
            calls[0].cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(results[0], asyncio.CancelledError)
            assert results[1:] == [None] * 7
            assert len(store.records) == 8  # the cancelled caller's record too

    async def test_default_loads_all_checkpoints(self, tmp_path: pathlib.Path) -> None:
        """With a mode and no checkpoint_files, every run under config_run_dir is loaded."""
        root = tmp_path / "runinfo"
        for i in range(3):
            async with Memoizer(checkpoint_mode="dfk_exit", config_run_dir=root) as memo:
                await run(memo, mk(i), i * 10)
        assert sorted(os.listdir(root)) == ["000", "001", "002"]
        assert aiomemo.get_all_checkpoints(str(root)) == [
            str((root / d / "checkpoint").resolve()) for d in ("000", "001", "002")
        ]
        async with Memoizer(checkpoint_mode="dfk_exit", config_run_dir=root) as memo:
            for i in range(3):
                fut = await memo.check_memo(mk(i))
                assert fut is not None and fut.result() == i * 10

    async def test_load_checkpoints_mapping(self, tmp_path: pathlib.Path) -> None:
        """load_checkpoints returns hex key -> done Future, decoded on access."""
        async with Memoizer(run_dir=tmp_path / "a", checkpoint_mode="dfk_exit") as memo:
            await run(memo, mk(1), "one")
            key = mk(1)
            await memo.check_memo(key)
        async with Memoizer(run_dir=tmp_path / "b") as memo:
            table = await memo.load_checkpoints([str(tmp_path / "a")])
            assert len(table) == 1
            assert table[key["hashsum"]].result() == "one"
            assert list(table) == [key["hashsum"]] and key["hashsum"] in table
            upper = key["hashsum"].upper()  # the same key, spelled in capitals
            assert upper in table and table[upper].result() == "one"
            for bad in ("zz", key["hashsum"][:-2], " " + key["hashsum"], 7, None, b"\x00"):
                assert bad not in table
                with pytest.raises(KeyError):
                    table[bad]  # type: ignore[index]
            fut = await memo.check_memo(mk(1))
            assert fut is not None and fut.result() == "one"

    async def test_unencodable_result(self, tmp_path: pathlib.Path) -> None:
        """A result the codec refuses stays memoized in memory, counted, one warning."""

        class Opaque:
            pass

        async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit") as memo:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                o1, o2 = Opaque(), Opaque()
                await run(memo, mk(1), o1)
                await run(memo, mk(2), o2)
            assert len([w for w in caught if "Opaque" in str(w.message)]) == 1
            fut = await memo.check_memo(mk(1))
            assert fut is not None and fut.result() is o1
            assert memo.stats().unserializable == 2

    async def test_write_failure_retried(self, tmp_path: pathlib.Path) -> None:
        """A failing write keeps records queued; they are written once the store recovers."""
        store = FlakyStore(failing=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=store) as m:
                await run(m, mk(1), 1)  # returns although the write failed
                assert m.stats().pending == 1
                for _ in range(200):
                    if store.records:
                        break
                    await asyncio.sleep(0.02)
                assert len(store.records) == 1
                assert m.stats().pending == 0
                assert m.stats().write_errors == 3

    async def test_close_reports_unsaved(self, tmp_path: pathlib.Path) -> None:
        """When writes keep failing, close() raises CheckpointError with the count."""
        store = FlakyStore(failing=10**9)
        memo = Memoizer(run_dir=tmp_path, checkpoint_mode="dfk_exit", store=store)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointError) as at_close:
                async with memo:
                    for i in range(5):
                        await run(memo, mk(i), i)
                    with pytest.raises(CheckpointError) as ei:
                        await memo.checkpoint()
                    assert ei.value.unsaved == 5
        assert at_close.value.unsaved == 5
        assert "5 checkpoint record(s)" in str(at_close.value)

    async def test_periodic_early_drain(self, tmp_path: pathlib.Path) -> None:
        """In periodic mode a queue past max_pending drains before the period."""
        store = FlakyStore()
        memo = Memoizer(
            run_dir=tmp_path,
            checkpoint_mode="periodic",
            checkpoint_period="01:00:00",
            store=store,
            max_pending=10,
        )
        async with memo:
            for i in range(25):
                await run(memo, mk(i), i)
            await asyncio.sleep(0.05)
            assert len(store.records) >= 20

    async def test_pickle_in_checkpoint_dir_never_runs(self, tmp_path: pathlib.Path) -> None:
        """A malicious tasks.pkl in a checkpoint dir is not loaded: nothing runs."""
        ck = tmp_path / "run" / "checkpoint"
        ck.mkdir(parents=True)
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self) -> Any:
                return (pathlib.Path.touch, (marker,))

        (ck / "tasks.pkl").write_bytes(
            pickle.dumps({"hash": "0" * 32, "exception": None, "result": Evil()})
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            async with Memoizer(checkpoint_files=[str(tmp_path / "run")], run_dir=tmp_path) as m:
                assert m.stats().load_errors >= 1
        assert not marker.exists()

    async def test_memory_store(self, tmp_path: pathlib.Path) -> None:
        """A MemoryStore takes checkpoints in place of the log."""
        store = MemoryStore()
        async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=store) as memo:
            await run(memo, mk(1), 1)
        assert not any(tmp_path.iterdir())


async def scale(a: int, n: int = 1) -> int:
    """A cached coroutine for explain."""
    return a * n


class TestExplain:
    """memo.explain names the input that made a task miss."""

    async def test_names_differing_kwarg(self, tmp_path: pathlib.Path) -> None:
        """After a run, a call with another n is explained by kwargs['n']; the same call is a hit."""
        async with Memoizer(checkpoint_mode="task_exit", config_run_dir=tmp_path) as memo:
            await memo.cached(scale)(2, n=3)
        async with Memoizer(checkpoint_mode="task_exit", config_run_dir=tmp_path) as memo:
            miss = await memo.explain({"func": scale, "args": (2,), "kwargs": {"n": 4}})
            assert not miss.hit
            assert "kwargs['n']" in str(miss)
            hit = await memo.explain({"func": scale, "args": (2,), "kwargs": {"n": 3}})
            assert hit.hit

    async def test_without_digests(self, tmp_path: pathlib.Path) -> None:
        """With explain=False records carry no digests and explain says so."""
        async with Memoizer(
            checkpoint_mode="task_exit", config_run_dir=tmp_path, explain=False
        ) as memo:
            await memo.cached(scale)(2, n=3)
        async with Memoizer(checkpoint_mode="task_exit", config_run_dir=tmp_path) as memo:
            res = await memo.explain({"func": scale, "args": (2,), "kwargs": {"n": 4}})
            assert not res.hit
            assert "digest" in str(res).lower()
