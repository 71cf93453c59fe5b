"""The drain: group commit, back-off, manual and final passes, and what survives cancellation."""

from __future__ import annotations

import asyncio
import pathlib
import warnings

import pytest

from aiomemo import Memoizer, _drain
from aiomemo.stores import MemoryStore
from helpers import (
    ClaimStore,
    FailOnceStore,
    FrozenClock,
    GateStore,
    mk,
    run,
    spin,
    spin_until,
)


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


async def test_task_exit_after_a_failed_batch_still_writes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In task_exit mode a record completed after an earlier failed batch is written before update_memo_result returns."""
    monkeypatch.setattr(_drain, "time", FrozenClock())  # the backoff never expires on its own
    store = FailOnceStore()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=store) as memo:
            await run(memo, mk(1), 1)  # its write fails: it returns, the record stays queued
            assert store.calls == 1
            second = mk(2)
            await run(memo, second, 2)
            assert bytes.fromhex(second["hashsum"]) in store.records


async def test_task_exit_64_concurrent_callers_share_one_batch(tmp_path: pathlib.Path) -> None:
    """64 completions arriving while a batch is written all join the next one: one
    write, each caller returns only once its own record is in the store, and a
    cancelled caller neither cancels the batch nor loses its record."""
    store = GateStore()
    async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", store=store) as memo:
        first = mk(-1)
        assert await memo.check_memo(first) is None
        held = asyncio.ensure_future(memo.update_memo_result(first, -1))
        await spin_until(lambda: store.calls == 1)  # the first batch is held in its write
        tasks = [mk(i) for i in range(64)]
        for tk in tasks:
            assert await memo.check_memo(tk) is None
        returned: list[bytes] = []

        async def complete(tk: dict[str, object], i: int) -> None:
            await memo.update_memo_result(tk, i)  # type: ignore[arg-type]
            # durable before it returns: the store holds this caller's record
            key = bytes.fromhex(str(tk["hashsum"]))
            assert key in store.records
            returned.append(key)

        callers = [asyncio.ensure_future(complete(tk, i)) for i, tk in enumerate(tasks)]
        await spin()
        assert not any(c.done() for c in callers)  # all wait behind the held batch
        assert memo._drain.commit(asyncio.get_running_loop()) is memo._drain.commit(
            asyncio.get_running_loop()
        )  # one Future for the whole batch
        callers[0].cancel()
        await spin()
        assert not any(c.done() for c in callers[1:])
        store.gate.set()
        await held
        await asyncio.gather(*callers[1:])
        with pytest.raises(asyncio.CancelledError):
            await callers[0]
        assert store.calls == 2  # the 64 went out in one write
        assert len(returned) == 63
        assert all(bytes.fromhex(str(tk["hashsum"])) in store.records for tk in tasks)
