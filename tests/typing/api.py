"""Type-checks the documented usage (mypy --strict tests/typing; never run)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomemo
from aiomemo import File, Memoizer, MemoStats, Retention, TaskRecord, id_for_memo, make_hash
from aiomemo.stores import LogStore, MemoryStore, RedisStore


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


@id_for_memo.register(Point)
def _(obj: Point, output_ref: bool = False) -> object:
    return (obj.x, obj.y)


async def engine() -> None:
    memo = Memoizer(checkpoint_mode="periodic", checkpoint_period="00:00:30")
    await memo.start()
    task: TaskRecord = {"func": print, "args": (1,), "kwargs": {"f": File("x.csv")}}
    fut = await memo.check_memo(task)
    if fut is None:
        await memo.update_memo_result(task, 42)
    else:
        result: Any = await fut
        print(result)
    plain: dict[str, Any] = {"func": print, "args": [], "kwargs": {}}
    await memo.check_memo(plain)
    key: str = await memo.make_hash(task)
    assert key == make_hash(task)
    stats: MemoStats = memo.stats()
    print(stats.hits, stats.checkpointed)
    n: int = await memo.checkpoint()
    print(n)
    await memo.close()


async def decorated() -> float:
    async with Memoizer(store=[LogStore(), MemoryStore()]) as memo:

        @memo.cached
        async def simulate(model: str, steps: int) -> float:
            return steps * 0.5

        @memo.cached(ignore=["log"], version="2")
        async def fetch(url: str, log: bool = False) -> bytes:
            return url.encode()

        value: float = await simulate("m", 3)
        data: bytes = await fetch("u")
        print(data)
        return value


async def tracked() -> int:
    async with Memoizer(checkpoint_mode="task_exit", track_code=True) as memo:

        @memo.cached(track_code=True)
        async def simulate(n: int) -> int:
            return n + 1

        ex = await memo.explain({"func": simulate, "args": (1,), "kwargs": {}, "track_code": True})
        changed: tuple[str, ...] = ex.code_changed
        print(changed)
        return await simulate(1)


async def budgeted() -> int:
    policy = Retention(max_bytes="10GiB", max_age="30d")
    async with Memoizer(checkpoint_mode="task_exit", retention=policy) as memo:
        report: dict[str, Any] | None = await memo.retention_report()
        return 0 if report is None else int(report["records_removed"])


def shared() -> RedisStore:
    return RedisStore("redis://127.0.0.1:6379/0", namespace="wf", ttl=3600)


def errors() -> None:
    try:
        make_hash({"func": print, "args": (object(),), "kwargs": {}})
    except aiomemo.UnhashableInputError as exc:
        print(exc.where, exc.type_name)
    except aiomemo.MemoError:
        pass


async def fault_injection() -> None:
    from aiomemo.testing import DiskFullStore, FailingStore, MemoryLeaseStore, StallingStore

    failing = FailingStore(failures=3)
    stalling = StallingStore(LogStore("ck"), seconds=2.0)
    full = DiskFullStore(budget=1_000_000)
    leases = MemoryLeaseStore(lease_ttl=5)
    async with Memoizer(checkpoint_mode="task_exit", store=[failing, stalling, full, leases]):
        pass
    failing.heal()
    stalling.release()
    full.free()
    leases.expire(b"k" * 32)
    n: int = failing.failed + stalling.stalled + full.refused + leases.completions
    print(n, len(failing.records))


def more_errors(data: bytes) -> None:
    from aiomemo import _codec

    try:
        _codec.decode(data)
    except aiomemo.CodecError as exc:  # also a ValueError
        print(exc)
    except (aiomemo.CheckpointPathError, aiomemo.MaintenanceError, aiomemo.UnencodableResultError):
        pass


async def expiry_forget_refresh() -> None:
    import datetime as dt

    async with Memoizer(checkpoint_mode="task_exit", ttl=dt.timedelta(days=7)) as memo:

        @memo.cached(ttl=3600)
        async def quote(symbol: str) -> float:
            return 1.0

        @memo.cached(refresh=True)
        async def latest() -> int:
            return 2

        price: float = await quote("X")
        fresh: int = await latest()
        task: aiomemo.TaskRecord = {"func": quote, "args": ("X",), "kwargs": {}, "ttl": 60.0}
        await memo.check_memo({**task, "refresh": True})
        try:
            gone: int = await memo.forget(func="mymod.sim")
        except aiomemo.UnknownFunctionError as exc:  # also a LookupError
            print(exc)
            gone = await memo.forget(task) + await memo.forget(func=quote)
        print(price, fresh, gone, memo.stats().expired, memo.stats().forgotten, memo.ttl)


if __name__ == "__main__":
    asyncio.run(engine())
