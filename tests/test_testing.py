"""aiomemo.testing: the fault-injecting stores do what they say, and a Memoizer copes with them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiomemo import CheckpointError, Memoizer, StoreError
from aiomemo.stores import MemoryStore, Record
from aiomemo.testing import (
    DiskFullStore,
    FailingStore,
    MemoryLeaseStore,
    StallingStore,
    WrappedStore,
    record_size,
)
from helpers import mk, run

# failed writes are the point here: the Memoizer's warnings about them are expected
pytestmark = pytest.mark.filterwarnings("ignore:aiomemo.*checkpoint write:RuntimeWarning")


def rec(i: int, size: int = 10) -> Record:
    return Record(i.to_bytes(32, "big"), b"v" * size, "m.f", 1.7e9)


class TestWrappedStore:
    """The base passes every call through to inner."""

    async def test_pass_through(self) -> None:
        """Writes land in inner; reads and load come from it."""
        inner = MemoryStore()
        store = WrappedStore(inner)
        async with store:
            await store.put_many([rec(1), rec(2)])
            assert await store.get(rec(1).key) == rec(1).value
            assert await store.get_many([rec(2).key, b"x" * 32]) == {rec(2).key: rec(2).value}
            assert (await store.load()).records == 2
        assert store.records is inner.records and len(inner) == 2


class TestFailingStore:
    """Writes fail N times, then succeed."""

    async def test_fails_n_times_then_stores(self) -> None:
        """Each failure raises StoreError and stores nothing; then writes go through."""
        store = FailingStore(failures=2)
        for k in (1, 2):
            with pytest.raises(StoreError, match=f"injected write failure {k} of 2"):
                await store.put_many([rec(1)])
            assert store.records == {}
        await store.put_many([rec(1)])
        assert store.attempts == 3 and store.failed == 2 and rec(1).key in store.records

    async def test_forever_until_healed_and_custom_error(self) -> None:
        """failures=None fails until heal(); error() builds the exception."""
        store = FailingStore(failures=None, error=lambda k: StoreError(f"boom {k}"))
        for k in range(1, 6):
            with pytest.raises(StoreError, match=f"boom {k}"):
                await store.put_many([rec(1)])
        store.heal()
        await store.put_many([rec(1)])
        assert len(store.records) == 1
        with pytest.raises(ValueError, match="failures"):
            FailingStore(failures=-1)

    async def test_memoizer_retries_until_saved(self, tmp_path: Path) -> None:
        """A periodic Memoizer keeps failed records queued and saves them all in the end."""
        store = FailingStore(failures=3)
        async with Memoizer(checkpoint_mode="manual", store=store, config_run_dir=tmp_path) as memo:
            for i in range(20):
                await run(memo, mk(i), i)
            for _ in range(3):
                with pytest.raises(CheckpointError, match="injected write failure"):
                    await memo.checkpoint()
            await memo.checkpoint()
        assert store.failed == 3 and len(store.records) == 20


class TestStallingStore:
    """Writes stall for a time or until released."""

    async def test_until_released(self) -> None:
        """A stalled write waits for release(); a cancelled one stores nothing."""
        store = StallingStore()
        put = asyncio.create_task(store.put_many([rec(1)]))
        gone = asyncio.create_task(store.put_many([rec(2)]))
        await store.wait_stalled(2)
        assert store.waiting == 2 and store.records == {}
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        store.release()
        await put
        assert list(store.records) == [rec(1).key] and store.stalled == 2
        await store.put_many([rec(3)])  # released: later calls do not stall
        assert store.stalled == 2

    async def test_for_seconds_and_reads(self) -> None:
        """seconds= stalls each call that long; methods= picks the calls."""
        store = StallingStore(seconds=0.05, methods={"get"})
        await store.put_many([rec(1)])
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await store.get(rec(1).key) == rec(1).value
        assert loop.time() - t0 >= 0.04 and store.stalled == 1
        with pytest.raises(ValueError, match="unknown methods"):
            StallingStore(methods={"put"})

    async def test_close_waits_for_a_stalled_final_checkpoint(self, tmp_path: Path) -> None:
        """close() returns only once the stalled final write has stored the records."""
        store = StallingStore()
        memo = Memoizer(checkpoint_mode="dfk_exit", store=store, config_run_dir=tmp_path)
        await run(memo, mk(1), 1)
        closing = asyncio.create_task(memo.close())
        await asyncio.wait_for(store.wait_stalled(1), 10)
        assert not closing.done() and store.records == {}
        store.release()
        await asyncio.wait_for(closing, 10)
        assert len(store.records) == 1


class TestDiskFullStore:
    """Writes fail once the byte budget is spent, atomically per batch."""

    async def test_budget(self) -> None:
        """A batch that does not fit stores nothing and raises StoreError from ENOSPC."""
        size = record_size(rec(1))
        store = DiskFullStore(budget=3 * size)
        await store.put_many([rec(1), rec(2)])
        with pytest.raises(StoreError, match="disk full") as info:
            await store.put_many([rec(3), rec(4)])
        assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == 28
        assert set(store.records) == {rec(1).key, rec(2).key} and store.used == 2 * size
        await store.put_many([rec(3)])  # exactly fills it
        with pytest.raises(StoreError):
            await store.put_many([rec(4)])
        store.free(size)
        await store.put_many([rec(4)])
        store.free()
        await store.put_many([rec(i, 10_000) for i in range(5, 50)])
        assert len(store.records) == 49 and store.refused == 2

    async def test_memoizer_keeps_results_when_the_disk_fills(self, tmp_path: Path) -> None:
        """Writes that do not fit fail; hits still come from memory; freed space saves them."""
        store = DiskFullStore(budget=0)
        async with Memoizer(checkpoint_mode="manual", store=store, config_run_dir=tmp_path) as memo:
            for i in range(10):
                await run(memo, mk(i), i)
            with pytest.raises(CheckpointError, match="disk full"):
                await memo.checkpoint()
            assert await run(memo, mk(3), "recomputed") == 3  # still a hit
            store.free()
            await memo.checkpoint()
        assert len(store.records) == 10


class TestMemoryLeaseStore:
    """In-memory leases: one holder per key, expiry, cross-Memoizer collapse."""

    async def test_claim_renew_release_complete(self) -> None:
        """Only the holder renews, releases or completes; a stored key cannot be claimed."""
        clock = [0.0]
        store = MemoryLeaseStore(clock=lambda: clock[0])
        k = rec(1).key
        lease = await store.claim(k, 10)
        assert lease is not None and store.holder(k) == lease.token
        assert await store.claim(k, 10) is None
        clock[0] = 9
        assert await lease.renew()
        clock[0] = 18  # within the renewed ttl
        assert await store.claim(k, 10) is None
        clock[0] = 30  # expired
        assert not await lease.renew()
        other = await store.claim(k, 10)
        assert other is not None and other.token != lease.token
        await lease.release()  # not the holder: no effect
        assert store.holder(k) == other.token
        assert not await lease.complete(rec(1))  # stored anyway, lease lost
        assert store.lost == 1 and k in store.records
        assert await store.claim(k, 10) is None  # already stored
        await other.release()
        await other.release()  # idempotent

    async def test_wait_for(self) -> None:
        """wait_for returns the value once completed, None when the lease goes or time runs out."""
        store = MemoryLeaseStore()
        k1, k2, k3 = rec(1).key, rec(2).key, rec(3).key
        l1 = await store.claim(k1, 10)
        l2 = await store.claim(k2, 10)
        assert l1 is not None and l2 is not None
        w1 = asyncio.create_task(store.wait_for(k1, 5))
        w2 = asyncio.create_task(store.wait_for(k2, 5))
        await asyncio.sleep(0)
        assert await l1.complete(rec(1))
        await l2.release()
        assert await w1 == rec(1).value and await w2 is None
        assert await store.wait_for(k3, 5) is None  # no lease, no value
        l3 = await store.claim(k3, 10)
        assert l3 is not None
        assert await store.wait_for(k3, 0.01) is None  # timeout
        w3 = asyncio.create_task(store.wait_for(k3, 5))
        await asyncio.sleep(0)
        store.expire(k3)
        assert await w3 is None and not await l3.renew()

    async def test_lease_expiry_wakes_waiters(self) -> None:
        """A holder that dies (never renews) frees the key after ttl, waking waiters."""
        store = MemoryLeaseStore()
        assert await store.claim(rec(1).key, 0.05) is not None
        assert await asyncio.wait_for(store.wait_for(rec(1).key, 5), 2) is None
        assert await store.claim(rec(1).key, 0.05) is not None

    async def test_collapse_across_memoizers(self, tmp_path: Path) -> None:
        """Two Memoizers (two "processes") on one store run an identical task once."""
        store = MemoryLeaseStore(lease_ttl=5)
        ran = 0
        gate = asyncio.Event()

        async def engine(memo: Memoizer) -> object:
            nonlocal ran
            task = mk(7)
            fut = await memo.check_memo(task)
            if fut is not None:
                return await fut
            ran += 1
            await gate.wait()
            await memo.update_memo_result(task, 49)
            return 49

        async with (
            Memoizer(checkpoint_mode=None, store=store, run_dir=tmp_path / "a") as a,
            Memoizer(checkpoint_mode=None, store=store, run_dir=tmp_path / "b") as b,
        ):
            first = asyncio.create_task(engine(a))
            await asyncio.sleep(0.01)
            second = asyncio.create_task(engine(b))
            await asyncio.sleep(0.01)
            gate.set()
            assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [49, 49]
            assert b.stats().remote_hits == 1
        assert ran == 1 and store.completions == 1 and store.refused_claims >= 1

    def test_usable_from_one_loop_after_another(self) -> None:
        """A wait that timed out in one event loop leaves nothing that breaks the next loop."""
        store = MemoryLeaseStore()
        k = rec(1).key

        async def first() -> None:
            assert await store.claim(k, 10) is not None
            assert await store.wait_for(k, 0.01) is None  # times out

        async def second() -> bytes | None:
            waiter = asyncio.create_task(store.wait_for(k, 5))
            await asyncio.sleep(0)
            await store.put_many([rec(1)])
            return await waiter

        asyncio.run(first())
        assert asyncio.run(second()) == rec(1).value
