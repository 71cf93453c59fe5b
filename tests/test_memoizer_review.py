"""Review findings on the asyncio Memoizer, kept as regression tests (each pinned one bug)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from aiomemo import LeaderCancelledError, Memoizer, MemoizerClosedError, StoreError, _memoizer
from aiomemo.stores import Lease, LeaseStore, MemoryStore, Record
from helpers import mk, run  # the engine-playing helpers


async def spin(turns: int = 50) -> None:
    """Let the loop run a fixed number of turns (no wall clock)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def spin_until(cond: Callable[[], bool], turns: int = 500) -> None:
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


class GateStore(MemoryStore):
    """A MemoryStore whose first put_many blocks until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.calls = 0

    async def put_many(self, records: Sequence[Record]) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.gate.wait()
        await super().put_many(records)


class SlowOpenStore(MemoryStore):
    """A MemoryStore whose open() blocks until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.opening = False

    async def open(self, *, run_dir: pathlib.Path | None = None) -> None:
        self.opening = True
        await self.gate.wait()


class GrantedLease(Lease):
    """A lease of ClaimStore: complete() goes through the store's put gate."""

    __slots__ = ("store",)

    def __init__(self, store: ClaimStore, key: bytes, ttl: float) -> None:
        super().__init__(key, "token", ttl)
        self.store = store

    async def renew(self) -> bool:
        return True

    async def release(self) -> None:
        return None

    async def complete(self, record: Record) -> bool:
        self.store.in_put += 1
        await self.store.put_gate.wait()
        await self.store.put_many([record])
        return True


class ClaimStore(LeaseStore):
    """A shared store with leases (always granted); get/lease completion may block on gates."""

    def __init__(self, *, block_get: bool = False, block_put: bool = False) -> None:
        self.records: dict[bytes, bytes] = {}
        self.get_gate = asyncio.Event()
        self.put_gate = asyncio.Event()
        if not block_get:
            self.get_gate.set()
        if not block_put:
            self.put_gate.set()
        self.in_get = 0
        self.in_put = 0

    async def get(self, key: bytes) -> bytes | None:
        self.in_get += 1
        await self.get_gate.wait()
        return self.records.get(key)

    async def put_many(self, records: Sequence[Record]) -> None:
        for r in records:
            self.records[r.key] = r.value

    async def claim(self, key: bytes, ttl: float) -> Lease | None:
        return GrantedLease(self, key, ttl)

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:
        return self.records.get(key)


async def test_close_during_start_stays_closed(tmp_path: pathlib.Path) -> None:
    """A close() that lands while start() is still opening stores leaves the Memoizer closed."""
    store = SlowOpenStore()
    memo = Memoizer(run_dir=tmp_path, checkpoint_mode="dfk_exit", store=store)
    starting = asyncio.create_task(memo.start())
    await spin_until(lambda: store.opening)
    await memo.close()
    store.gate.set()
    with contextlib.suppress(MemoizerClosedError):
        await starting
    try:
        assert memo.closed
        with pytest.raises(MemoizerClosedError):
            await memo.check_memo(mk(1))
    finally:
        if not memo.closed:
            await memo.close()  # cleanup: the memo came back to life


async def test_cancelled_shared_lookup_leaves_no_orphan_flight(tmp_path: pathlib.Path) -> None:
    """A check_memo cancelled during the shared-store lookup does not leave an orphan in-flight entry."""
    store = ClaimStore(block_get=True)
    async with Memoizer(run_dir=tmp_path, store=store) as memo:
        first = asyncio.create_task(memo.check_memo(mk(1)))
        await spin_until(lambda: store.in_get == 1)
        first.cancel()
        await spin()
        assert first.cancelled()
        store.get_gate.set()
        again = await memo.check_memo(mk(1))
        try:
            assert again is None  # a miss: this caller is the new leader
        finally:
            if again is not None:
                again.cancel()


async def test_checkpoint_one_during_flush_loses_nothing(tmp_path: pathlib.Path) -> None:
    """checkpoint_one racing a checkpoint() in progress does not drop records queued meanwhile."""
    store = GateStore()
    tasks = [mk(i) for i in range(3)]
    async with Memoizer(run_dir=tmp_path, checkpoint_mode="manual", store=store) as memo:
        await run(memo, tasks[0], 0)
        await run(memo, tasks[1], 1)
        manual = asyncio.create_task(memo.checkpoint())
        await spin_until(lambda: store.calls == 1)  # writing [t0, t1], blocked
        await run(memo, tasks[2], 2)  # queued after the chunk was taken
        one = asyncio.create_task(memo.checkpoint_one(task=tasks[0]))
        await spin()
        store.gate.set()
        assert await one == 1
        await manual
    assert len(store.records) == 3


async def test_cancelled_task_exit_publish_still_checkpoints(tmp_path: pathlib.Path) -> None:
    """Cancelling a task_exit leader while it publishes to a shared store still checkpoints its result locally."""
    local = MemoryStore()
    shared = ClaimStore(block_put=True)
    task = mk(1)
    memo = Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=[local, shared])
    async with memo:
        assert await memo.check_memo(task) is None  # lease taken: we lead
        upd = asyncio.create_task(memo.update_memo_result(task, 41))
        await spin_until(lambda: shared.in_put == 1)
        upd.cancel()
        await spin()
        shared.put_gate.set()
        await asyncio.gather(upd, return_exceptions=True)
    assert bytes.fromhex(task["hashsum"]) in local.records


async def test_task_exit_publish_across_close_does_not_hang(tmp_path: pathlib.Path) -> None:
    """An update_memo_result still publishing when close() runs completes after close instead of hanging."""
    shared = ClaimStore(block_put=True)
    memo = Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=shared)
    await memo.start()
    task = mk(1)
    assert await memo.check_memo(task) is None
    upd = asyncio.create_task(memo.update_memo_result(task, 1))
    await spin_until(lambda: shared.in_put == 1)
    await memo.close()
    shared.put_gate.set()
    await spin()
    try:
        assert upd.done()
    finally:
        if not upd.done():
            memo._release_commit()  # cleanup: free the orphaned waiter
        await asyncio.gather(upd, return_exceptions=True)


async def test_cancelled_close_releases_task_exit_waiters(tmp_path: pathlib.Path) -> None:
    """Cancelling close() does not leave task_exit callers waiting forever on their batch."""
    store = GateStore()
    memo = Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=store)
    await memo.start()
    ta, tb = mk(1), mk(2)
    assert await memo.check_memo(ta) is None
    assert await memo.check_memo(tb) is None
    a = asyncio.create_task(memo.update_memo_result(ta, 1))
    await spin_until(lambda: store.calls == 1)  # drain pass 1 writing [ta], blocked
    b = asyncio.create_task(memo.update_memo_result(tb, 2))  # fills the next batch
    await spin()
    closing = asyncio.create_task(memo.close())
    await spin()
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    store.gate.set()
    await spin()
    try:
        assert a.done()
        assert len(store.records) == 2  # both records were written
        assert b.done()
    finally:
        if not b.done():
            memo._release_commit()  # cleanup: free the orphaned waiter
        await asyncio.gather(a, b, return_exceptions=True)


async def test_load_checkpoints_mapping_consistent_without_memoize(tmp_path: pathlib.Path) -> None:
    """The mapping from load_checkpoints can be read for every key it lists, even with memoize=False."""
    async with Memoizer(run_dir=tmp_path / "a", checkpoint_mode="dfk_exit") as memo:
        await run(memo, mk(1), "one")
    async with Memoizer(run_dir=tmp_path / "b", memoize=False) as memo:
        table = await memo.load_checkpoints([str(tmp_path / "a")])
        items = dict(table.items())
        assert len(items) == len(table)


async def test_cached_memoized_leader_cancelled_error_does_not_spin(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LeaderCancelledError raised by the cached function itself comes back from the memo instead of looping."""
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached
        async def work(x: int) -> int:
            raise LeaderCancelledError("an upstream collapsed task was cancelled")

        with pytest.raises(LeaderCancelledError):
            await work(1)
        original = memo.check_memo
        calls = 0

        async def guarded(task: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 50:
                raise RuntimeError("memo.cached is looping on a memoized LeaderCancelledError")
            return await original(task)

        monkeypatch.setattr(memo, "check_memo", guarded)
        with pytest.raises(LeaderCancelledError):
            await work(1)


async def test_stop_iteration_exception_completes_followers(tmp_path: pathlib.Path) -> None:
    """A task that ended with StopIteration still completes its collapsed followers."""
    async with Memoizer(run_dir=tmp_path) as memo:
        leader = mk(1)
        assert await memo.check_memo(leader) is None
        follower = await memo.check_memo(mk(1))
        assert follower is not None
        with contextlib.suppress(TypeError):
            await memo.update_memo_exception(leader, StopIteration())
        await spin()
        try:
            assert follower.done()
        finally:
            if not follower.done():
                follower.cancel()
            elif not follower.cancelled():
                follower.exception()


class FailOnceStore(MemoryStore):
    """A MemoryStore whose first put_many fails with a StoreError, then works."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def put_many(self, records: Sequence[Record]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise StoreError("injected: transient I/O error")
        await super().put_many(records)


class FrozenClock:
    """Stands in for the ``time`` module inside aiomemo._memoizer: monotonic() never advances."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


async def test_task_exit_after_a_failed_batch_still_writes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In task_exit mode a record completed after an earlier failed batch is written before update_memo_result returns."""
    monkeypatch.setattr(_memoizer, "time", FrozenClock())  # the backoff never expires on its own
    store = FailOnceStore()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=store) as memo:
            await run(memo, mk(1), 1)  # its write fails: it returns, the record stays queued
            assert store.calls == 1
            second = mk(2)
            await run(memo, second, 2)
            assert bytes.fromhex(second["hashsum"]) in store.records


class HeldElsewhereStore(ClaimStore):
    """A shared store where another process holds every lease and never finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.never = asyncio.Event()
        self.waiting = 0

    async def claim(self, key: bytes, ttl: float) -> Lease | None:
        return None

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:
        self.waiting += 1
        await self.never.wait()
        return None


async def test_close_does_not_wait_for_remote_followers(tmp_path: pathlib.Path) -> None:
    """close() fails local followers of a remote leader at once instead of waiting on them."""
    store = HeldElsewhereStore()
    memo = Memoizer(run_dir=tmp_path, store=store)
    await memo.start()
    follower = await memo.check_memo(mk(1))
    assert follower is not None
    await spin_until(lambda: store.waiting == 1)
    closing = asyncio.create_task(memo.close())
    await spin(200)
    try:
        assert closing.done()
    finally:
        await closing
        with pytest.raises(MemoizerClosedError):
            await follower
