"""Flights: leaders, followers, and how a flight ends (result, exception, cancellation, cycles)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import traceback
from typing import Any

import pytest

from aiomemo import LeaderCancelledError, Memoizer, MemoizerUsageError
from helpers import (
    ClaimStore,
    mk,
    spin,
    spin_until,
)


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


# ---------------------------------------------------------------- a leader stopped, not failed


@pytest.mark.parametrize(
    "stop", [KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError]
)
async def test_a_stopped_leader_is_never_memoized(tmp_path: pathlib.Path, stop: type) -> None:
    """KeyboardInterrupt, SystemExit (any non-Exception) from a leader drop the entry like a
    cancellation: followers get LeaderCancelledError and the task runs again."""
    async with Memoizer(run_dir=tmp_path) as memo:
        leader = mk(1)
        assert await memo.check_memo(leader) is None
        follower = await memo.check_memo(mk(1))
        assert follower is not None
        await memo.update_memo_exception(leader, stop())
        with pytest.raises(LeaderCancelledError, match=r"was (cancelled|stopped)"):
            await follower
        assert await memo.check_memo(mk(1)) is None  # not memoized: it runs again
        assert memo.stats().entries == 0


async def test_cached_resubmits_after_keyboard_interrupt(tmp_path: pathlib.Path) -> None:
    """A memo.cached leader interrupted by KeyboardInterrupt is not memoized: the next call runs it."""
    calls = 0
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached
        async def work(x: int) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise KeyboardInterrupt
            return x * 2

        with pytest.raises(KeyboardInterrupt):
            await work(3)
        assert await work(3) == 6
        assert await work(3) == 6
    assert calls == 2


async def test_cached_follower_takes_over_from_an_interrupted_leader(
    tmp_path: pathlib.Path,
) -> None:
    """A caller waiting on a leader that got SystemExit becomes the new leader and gets a result."""
    gate = asyncio.Event()
    calls = 0
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached
        async def work(x: int) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                await gate.wait()
                raise SystemExit(1)
            return x + 1

        async def follow_then_open() -> int:
            await spin()
            follower = asyncio.create_task(work(1))  # waits on the leader below
            await spin()
            gate.set()
            return await follower

        second = asyncio.create_task(follow_then_open())
        with pytest.raises(SystemExit):  # in the leader's own task: the loop survives
            await work(1)
        assert await second == 2
    assert calls == 2


# ---------------------------------------------------------------- memoized exceptions stay small


def _frames(exc: BaseException) -> int:
    return len(traceback.extract_tb(exc.__traceback__))


async def test_memoized_exception_traceback_does_not_grow(tmp_path: pathlib.Path) -> None:
    """A memoized exception re-raised on 5,000 hits keeps a bounded traceback (not 10,001 entries)."""
    async with Memoizer(run_dir=tmp_path) as memo:
        task = mk(1)
        assert await memo.check_memo(task) is None
        try:
            raise ValueError("boom")
        except ValueError as exc:
            await memo.update_memo_exception(task, exc)
        sizes = []
        for _ in range(5000):
            fut = await memo.check_memo(mk(1))
            assert fut is not None
            try:
                await fut
            except ValueError as exc:
                sizes.append(_frames(exc))
        assert len(sizes) == 5000
        assert max(sizes) == sizes[0] <= 4


async def test_cached_exception_traceback_does_not_grow(tmp_path: pathlib.Path) -> None:
    """Through memo.cached too: hit 1 and hit 2,000 carry tracebacks of the same size."""
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached
        async def fail(x: int) -> None:
            raise RuntimeError(f"failed {x}")

        sizes = []
        for _ in range(2000):
            try:
                await fail(1)
            except RuntimeError as exc:
                sizes.append(_frames(exc))
                err = exc
        assert max(sizes) == sizes[1]
        assert len(str(traceback.format_exception(err))) < 5000


# ---------------------------------------------------------------- a call that waits for itself


async def test_cached_call_awaiting_itself_raises(tmp_path: pathlib.Path) -> None:
    """f(1) awaiting f(1) raises MemoizerUsageError naming f instead of hanging."""
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached
        async def f(x: int) -> int:
            return await f(x)

        with pytest.raises(
            MemoizerUsageError, match=r"f awaits itself with the same arguments \(.*f -> .*f, key"
        ):
            await asyncio.wait_for(f(1), 5)


async def test_cached_longer_cycle_raises(tmp_path: pathlib.Path) -> None:
    """f -> g -> f with the same arguments raises, and names the whole cycle."""
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached
        async def f(x: int) -> int:
            return await g(x)

        @memo.cached
        async def g(x: int) -> int:
            return await f(x)

        with pytest.raises(MemoizerUsageError, match=r"f -> .*g -> .*f"):
            await asyncio.wait_for(f(1), 5)


async def test_cycle_through_a_child_task_raises(tmp_path: pathlib.Path) -> None:
    """The cycle is found through tasks the leader starts and awaits (gather, create_task)."""
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached
        async def f(x: int) -> int:
            (r,) = await asyncio.gather(asyncio.create_task(f(x)))
            return r

        with pytest.raises(MemoizerUsageError):
            await asyncio.wait_for(f(1), 5)


async def test_recursion_and_collapse_are_not_cycles(tmp_path: pathlib.Path) -> None:
    """Recursion on other arguments works, and identical concurrent calls still collapse."""
    calls = 0
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached
        async def fib(n: int) -> int:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)
            return n if n < 2 else await fib(n - 1) + await fib(n - 2)

        results = await asyncio.gather(fib(20), fib(20), fib(20))
        assert results == [6765] * 3
        assert calls == 21
        assert memo.stats().collapsed >= 2


def test_claim_from_many_threads_makes_one_leader_per_key() -> None:
    """Flights.claim is atomic: of the threads racing on a key exactly one leads."""
    import concurrent.futures
    import threading

    from aiomemo._flights import Flights

    loop = asyncio.new_event_loop()
    try:
        flights = Flights(collapse=True)
        keys = [f"k{i % 8}" for i in range(400)]
        gate = threading.Barrier(8)

        def claim_all(offset: int) -> list[tuple[str, int, bool]]:
            gate.wait(10)
            out = []
            for key in keys[offset:] + keys[:offset]:  # every thread, every key
                flight, leads = flights.claim(key, loop)
                out.append((key, id(flight), leads))
            return out

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = [r for part in pool.map(claim_all, range(8)) for r in part]
        leaders = [r for r in results if r[2]]
        assert sorted(k for k, _, _ in leaders) == sorted({f"k{i}" for i in range(8)})
        by_key = {k: fid for k, fid, _ in leaders}
        assert all(fid == by_key[k] for k, fid, _ in results)  # followers got the leader's
        assert len(flights) == 8
        lone, lone_leads = Flights(collapse=False).claim("k0", loop)
        assert lone_leads and lone is not flights.get("k0")
    finally:
        loop.close()
