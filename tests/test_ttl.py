"""Expiry (ttl), refresh and forget in the Memoizer, with a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomemo import Memoizer, UnknownFunctionError, _expiry, _records, make_hash
from aiomemo._checkpoint import RecordInfo, iter_segment, list_segments, load_paths
from aiomemo.stores import MemoryStore, RedisStore
from helpers import mk, run

T0 = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(_expiry, "now", c)
    monkeypatch.setattr(_records, "clock", c)
    return c


def sim(x: int) -> int:
    """A task function."""
    return x


sim.__module__ = "mymod"
sim.__qualname__ = "simulate"


def other(x: int) -> int:
    """Another task function."""
    return x


other.__module__ = "mymod"
other.__qualname__ = "other"


def ck(run_dir: Path) -> list[RecordInfo]:
    return [
        i
        for seg in list_segments(run_dir / "checkpoint")
        for i in iter_segment(seg)
        if isinstance(i, RecordInfo)
    ]


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("ttl", "exc", "match"),
    [
        (0, ValueError, "positive"),
        (-1.5, ValueError, "positive"),
        (math.nan, ValueError, "positive"),
        (dt.timedelta(0), ValueError, "positive"),
        ("5", TypeError, "number of seconds"),
        (True, TypeError, "number of seconds"),
        ([5], TypeError, "number of seconds"),
    ],
)
def test_bad_ttl_is_refused_at_construction(ttl: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        Memoizer(ttl=ttl)
    memo = Memoizer()
    with pytest.raises(exc, match=match):

        @memo.cached(ttl=ttl)
        async def f() -> None: ...


def test_ttl_forms() -> None:
    assert Memoizer(ttl=dt.timedelta(minutes=2)).ttl == 120.0
    assert Memoizer(ttl=5).ttl == 5.0 and Memoizer().ttl is None
    memo = Memoizer()
    with pytest.raises(TypeError, match="refresh must be True or False"):
        memo.cached(refresh="yes")  # type: ignore[call-overload]


async def test_bad_task_ttl_fails_before_the_task_runs(tmp_path: Path) -> None:
    async with Memoizer(run_dir=tmp_path) as memo:
        with pytest.raises(TypeError, match=r"task\['ttl'\]"):
            await memo.check_memo({**mk(1), "ttl": "1h"})


# ------------------------------------------------------------------ expiry


async def test_expired_entry_is_a_miss_in_memory(clock: Clock, tmp_path: Path) -> None:
    """A result expires ttl seconds after it was recorded: the next lookup misses."""
    runs: list[int] = []
    async with Memoizer(run_dir=tmp_path, ttl=10) as memo:

        @memo.cached
        async def f(x: int) -> int:
            runs.append(x)
            return x

        assert await f(1) == 1 and await f(1) == 1 and runs == [1]
        clock.t += 9.9
        assert await f(1) == 1 and runs == [1]
        clock.t += 0.1
        assert await f(1) == 1 and runs == [1, 1]
        assert memo.stats().expired == 1 and memo.stats().hits == 2


async def test_expiry_is_recorded_and_applied_at_load(clock: Clock, tmp_path: Path) -> None:
    """Records carry the absolute expiry; a later run loads them only while valid, and drops them then."""
    a = tmp_path / "a"
    async with Memoizer(run_dir=a, checkpoint_mode="task_exit", ttl=dt.timedelta(seconds=60)) as m:
        await run(m, mk(1), 11)
        await run(m, {**mk(2), "ttl": math.inf}, 22)  # this task never expires
    assert sorted(i.record.expires for i in ck(a)) == [T0 + 60, math.inf]
    clock.t += 30
    async with Memoizer(checkpoint_files=[str(a)], run_dir=tmp_path / "b") as m:
        assert await run(m, mk(1), -1) == 11  # loaded, still valid
        clock.t += 30  # expires while loaded
        assert await run(m, mk(1), -1) == -1
        assert await run(m, mk(2), -2) == 22
        assert m.stats().expired == 1
    async with Memoizer(checkpoint_files=[str(a)], run_dir=tmp_path / "c") as m:
        assert m.stats().entries == 1 and m.stats().expired == 1  # left out at load
        assert await run(m, mk(1), -3) == -3


async def test_per_function_ttl_overrides_the_default(clock: Clock, tmp_path: Path) -> None:
    async with Memoizer(run_dir=tmp_path, ttl=100) as memo:
        runs: list[str] = []

        @memo.cached(ttl=5)
        async def short() -> str:
            runs.append("s")
            return "s"

        @memo.cached
        async def long() -> str:
            runs.append("l")
            return "l"

        await short()
        await long()
        clock.t += 6
        await short()
        await long()
        assert runs == ["s", "l", "s"]


async def test_memory_store_keeps_the_expiry(clock: Clock, tmp_path: Path) -> None:
    store = MemoryStore()
    async with Memoizer(run_dir=tmp_path / "a", store=store, checkpoint_mode="task_exit", ttl=5) as m:
        await run(m, mk(1), 1)
    async with Memoizer(run_dir=tmp_path / "b", store=store, checkpoint_mode="task_exit") as m:
        assert await run(m, mk(1), -1) == 1
    clock.t += 5
    async with Memoizer(run_dir=tmp_path / "c", store=store, checkpoint_mode="task_exit") as m:
        assert await run(m, mk(1), -1) == -1


async def test_forget_func_reaches_a_memory_store(clock: Clock, tmp_path: Path) -> None:
    """Entries loaded from a MemoryStore are found by function too, and the store forgets them."""
    store = MemoryStore()
    async with Memoizer(run_dir=tmp_path / "a", store=store, checkpoint_mode="task_exit") as m:
        await run(m, mk(1, func=sim), 1)
        await run(m, mk(1, func=other), 2)
    clock.t += 1
    async with Memoizer(run_dir=tmp_path / "b", store=store, checkpoint_mode="task_exit") as m:
        assert await m.forget(func=sim) == 1
    assert [r.func for r in store.records.values()] == ["mymod.other"]


# ------------------------------------------------------------------ refresh


async def test_refresh_recomputes_and_replaces_everywhere(tmp_path: Path) -> None:
    """refresh=True runs even on a hit; the new result replaces the old in memory and on disk."""
    a = tmp_path / "a"
    value = ["old"]
    async with Memoizer(run_dir=a, checkpoint_mode="task_exit") as memo:

        @memo.cached
        async def f() -> str:
            return value[0]

        assert await f() == "old"
        value[0] = "new"
        assert await f() == "old"
        task = {"func": sim, "args": (1,), "kwargs": {}}
        assert await run(memo, dict(task), "v1") == "v1"
        assert await run(memo, {**task, "refresh": True}, "v2") == "v2"
        assert await run(memo, dict(task), "v3") == "v2"
    async with Memoizer(checkpoint_files=[str(a)], run_dir=tmp_path / "b") as memo:
        assert await run(memo, {"func": sim, "args": (1,), "kwargs": {}}, "v4") == "v2"


async def test_refresh_decorator_and_collapse(tmp_path: Path) -> None:
    """Every call of a refresh=True function runs; identical concurrent ones still run once."""
    runs = 0
    async with Memoizer(run_dir=tmp_path) as memo:

        @memo.cached(refresh=True)
        async def f(x: int) -> int:
            nonlocal runs
            runs += 1
            await asyncio.sleep(0.01)
            return x * runs

        assert await f(2) == 2
        assert await f(2) == 4
        got = await asyncio.gather(*(f(2) for _ in range(5)))
        assert runs == 3 and got == [6] * 5
        assert memo.stats().collapsed == 4


# ------------------------------------------------------------------ forget


async def test_forget_task(clock: Clock, tmp_path: Path) -> None:
    """forget(task) drops the entry (returns 1, then 0) and a later run misses it too."""
    a = tmp_path / "a"
    async with Memoizer(run_dir=a, checkpoint_mode="task_exit") as memo:
        await run(memo, mk(1), 1)
        await run(memo, mk(2), 2)
        clock.t += 1
        assert await memo.forget(mk(1)) == 1
        assert await memo.forget(mk(1)) == 0
        assert memo.stats().forgotten == 1
        clock.t += 1
        assert await run(memo, mk(1), -1) == -1  # recomputed after the forget: a new result
        assert await run(memo, mk(2), -2) == 2
    r = load_paths([a])
    assert r.forgotten == 1 and len(r.table) == 2  # the new mk(1) result stands
    async with Memoizer(checkpoint_files=[str(a)], run_dir=tmp_path / "b") as memo:
        assert await run(memo, mk(1), -9) == -1


async def test_explain_says_forgotten_or_expired(clock: Clock, tmp_path: Path) -> None:
    """explain agrees with the memo: a forgotten or expired record is no hit, and it says why."""
    async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit", ttl=10) as memo:
        await run(memo, mk(1), 1)
        await run(memo, mk(2), 2)
        assert (await memo.explain(mk(1))).hit
        clock.t += 1
        await memo.forget(mk(1))
        ex = await memo.explain(mk(1))
        assert not ex.hit and "forgotten" in ex.note
        clock.t += 10
        ex = await memo.explain(mk(2))
        assert not ex.hit and "expired at " in ex.note and "expired at " in str(ex)


async def test_forget_func_by_name_and_object(clock: Clock, tmp_path: Path) -> None:
    """forget(func=...) drops this run's and loaded entries of the function, no other's."""
    a = tmp_path / "a"
    async with Memoizer(run_dir=a, checkpoint_mode="task_exit") as memo:
        for i in range(3):
            await run(memo, mk(i, func=sim), i)
        await run(memo, mk(0, func=other), "o")
    clock.t += 1
    async with Memoizer(checkpoint_files=[str(a)], run_dir=tmp_path / "b", checkpoint_mode="task_exit") as memo:
        await run(memo, mk(7, func=sim), 7)  # this run's
        assert await run(memo, mk(0, func=sim), -1) == 0  # decoded into memory
        clock.t += 1
        assert await memo.forget(func="mymod.simulate") == 4
        clock.t += 1
        assert await run(memo, mk(1, func=sim), -1) == -1
        assert await run(memo, mk(0, func=other), -1) == "o"
        clock.t += 1
        assert await memo.forget(func=other) == 1
    async with Memoizer(
        checkpoint_files=[str(a), str(tmp_path / "b")], run_dir=tmp_path / "c"
    ) as memo:
        assert await run(memo, mk(2, func=sim), -2) == -2
        assert await run(memo, mk(7, func=sim), -7) == -7
        assert await run(memo, mk(1, func=sim), -5) == -1  # recorded after the forget
        assert await run(memo, mk(0, func=other), -3) == -3


async def test_forget_while_the_task_runs(clock: Clock, tmp_path: Path) -> None:
    """A task running when it is forgotten is not stopped; its result, recorded afterwards, stays."""
    a = tmp_path / "a"
    async with Memoizer(run_dir=a, checkpoint_mode="task_exit") as memo:
        await run(memo, mk(1), "old")
        task = mk(2)
        assert await memo.check_memo(task) is None  # we lead mk(2) now
        clock.t += 1
        assert await memo.forget(mk(1)) == 1
        assert await memo.forget(mk(2)) == 0  # running, not finished: nothing to drop
        clock.t += 1
        await memo.update_memo_result(task, "fresh")
        assert await run(memo, mk(2), -1) == "fresh"
    async with Memoizer(checkpoint_files=[str(a)], run_dir=tmp_path / "b") as memo:
        assert await run(memo, mk(2), -1) == "fresh"
        assert await run(memo, mk(1), "new") == "new"


async def test_redis_refresh_replaces_the_shared_value(
    redis_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    """A refreshing call skips the shared lookup, runs, and its result replaces Redis's."""
    def store() -> RedisStore:
        return RedisStore(redis_url, namespace=redis_namespace, lease_ttl=2.0)

    async with Memoizer(run_dir=tmp_path / "a", store=store(), checkpoint_mode="task_exit") as m:
        await run(m, mk(5), "v1")
    async with Memoizer(run_dir=tmp_path / "b", store=store(), checkpoint_mode="task_exit") as m:
        assert await run(m, mk(5), "x") == "v1"  # a shared hit
        assert await run(m, {**mk(5), "refresh": True}, "v2") == "v2"
    async with Memoizer(run_dir=tmp_path / "c", store=store(), checkpoint_mode="task_exit") as m:
        assert await run(m, mk(5), "x") == "v2"


async def test_forget_unknown_function_says_did_you_mean(tmp_path: Path) -> None:
    async with Memoizer(run_dir=tmp_path, checkpoint_mode="task_exit") as memo:
        await run(memo, mk(1, func=sim), 1)
        with pytest.raises(UnknownFunctionError, match=r"^no records of mymod\.sim; did you mean mymod\.simulate\?$"):
            await memo.forget(func="mymod.sim")
        with pytest.raises(UnknownFunctionError, match=r"no records of zzz\.qqq \("):
            await memo.forget(func="zzz.qqq")
        with pytest.raises(TypeError, match="exactly one"):
            await memo.forget()
        with pytest.raises(TypeError, match="exactly one"):
            await memo.forget(mk(1), func=sim)
        with pytest.raises(TypeError, match="function or its"):
            await memo.forget(func=3)  # type: ignore[arg-type]
        assert await run(memo, mk(1, func=sim), -1) == 1  # nothing was forgotten


_PROC = """
import asyncio, sys
from aiomemo import Memoizer
def sim(x):
    return x
sim.__module__ = "mymod"; sim.__qualname__ = "simulate"
async def main(action, root):
    async with Memoizer(config_run_dir=root, checkpoint_mode="task_exit") as memo:
        out = []
        for i in range(3):
            t = {"func": sim, "args": (i,), "kwargs": {}}
            fut = await memo.check_memo(t)
            if fut is None:
                await memo.update_memo_result(t, i * 10 + len(action))
                out.append("miss")
            else:
                out.append(f"hit={fut.result()}")
        if action == "forget":
            out.append(f"forgot={await memo.forget({'func': sim, 'args': (1,), 'kwargs': {}})}")
        print(" ".join(out))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_forget_in_one_process_seen_by_a_later_process(tmp_path: Path) -> None:
    """Process 1 writes, process 2 forgets one task, process 3 (started afterwards) misses it only."""
    script = tmp_path / "proc.py"
    script.write_text(textwrap.dedent(_PROC))
    root = str(tmp_path / "runinfo")

    def go(action: str) -> str:
        out = subprocess.run(
            [sys.executable, str(script), action, root], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    assert go("write") == "miss miss miss"
    assert go("forget") == "hit=5 hit=15 hit=25 forgot=1"
    assert go("read") == "hit=5 miss hit=25"


# ------------------------------------------------------------------ Redis


async def test_redis_value_expires_with_the_record(
    redis_url: str, redis_namespace: str, raw: aioredis.Redis, tmp_path: Path
) -> None:
    """RedisStore sets the value's PX from the record's expiry, on put and on the lease path."""
    store = RedisStore(redis_url, namespace=redis_namespace, lease_ttl=2.0)
    async with Memoizer(run_dir=tmp_path / "a", store=store, checkpoint_mode="task_exit", ttl=50) as m:
        await run(m, mk(1), 1)  # lease complete path (a LeaseStore claims first)
    store2 = RedisStore(redis_url, namespace=redis_namespace, lease_ttl=2.0)
    async with Memoizer(run_dir=tmp_path / "b", store=[store2], checkpoint_mode="periodic", checkpoint_period=60, ttl=80, collapse=False) as m:
        await run(m, mk(2), 2)  # put_many path (no lease: collapse off)
        await m.checkpoint()
    k1 = store.value_key(bytes.fromhex(make_hash(mk(1))))
    k2 = store.value_key(bytes.fromhex(make_hash(mk(2))))
    p1, p2 = await raw.pttl(k1), await raw.pttl(k2)
    assert 40_000 < p1 <= 50_000 and 70_000 < p2 <= 80_000


async def test_redis_shared_hit_keeps_the_recorded_expiry(
    clock: Clock, redis_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    """A result fetched from Redis expires in this memo at its recorded time (a fresh lookup then)."""
    def store(**kw: Any) -> RedisStore:
        return RedisStore(redis_url, namespace=redis_namespace, lease_ttl=2.0, **kw)

    async with Memoizer(run_dir=tmp_path / "a", store=store(), checkpoint_mode="task_exit", ttl=50) as m:
        await run(m, mk(1), "v")
        await run(m, {**mk(2), "ttl": math.inf}, "w")
    async with Memoizer(run_dir=tmp_path / "b", store=store(), checkpoint_mode="task_exit") as m:
        assert await run(m, mk(1), "x") == "v" and await run(m, mk(2), "x") == "w"
        assert m.stats().remote_hits == 2
        clock.t += 49
        assert await run(m, mk(1), "x") == "v"  # still valid, from memory
        clock.t += 1
        # expired in this memo: asked again from Redis (whose own PX, on the
        # server's real clock, has 50 s to go here; it is the judge there)
        assert await run(m, mk(1), "y") == "v"
        assert await run(m, mk(2), "x") == "w"
        assert m.stats().expired == 1 and m.stats().remote_hits == 3


def test_redis_values_carry_the_expiry() -> None:
    """Values that expire get the AMR\\x03/\\x04 form with the expiry; others keep the old bytes."""
    from aiomemo.stores._redis._values import (
        MAGIC,
        MAGIC_EXP,
        MAGIC_EXP_SIGNED,
        decode_value,
        derive_key,
        encode_value,
    )

    key = bytes(range(32))
    plain = _records.Record(key, b"\x01", "m.f", 5.0, b"d")
    timed = _records.Record(key, b"\x01", "m.f", 5.0, b"d", 99.5)
    assert encode_value(plain).startswith(MAGIC) and decode_value(key, encode_value(plain)) == plain
    assert encode_value(timed).startswith(MAGIC_EXP) and decode_value(key, encode_value(timed)) == timed
    mac = derive_key("s")
    blob = encode_value(timed, mac)
    assert blob.startswith(MAGIC_EXP_SIGNED) and decode_value(key, blob, mac) == timed
    assert decode_value(key, blob) is None and decode_value(key, encode_value(timed), mac) is None
    bad = bytearray(encode_value(timed))
    bad[30] ^= 1  # inside the expiry
    assert decode_value(key, bytes(bad)) is None


async def test_redis_forget_task_and_function(redis_url: str, redis_namespace: str, tmp_path: Path) -> None:
    """A forget reaches the shared store: the task's value, and a function's values, are gone."""
    async with Memoizer(
        run_dir=tmp_path / "a",
        store=RedisStore(redis_url, namespace=redis_namespace, lease_ttl=2.0),
        checkpoint_mode="task_exit",
    ) as m:
        for i in range(3):
            await run(m, mk(i, func=sim), i)
        await run(m, mk(0, func=other), "o")
        assert await m.forget(mk(0, func=sim)) == 1
    async with Memoizer(
        run_dir=tmp_path / "b",
        store=RedisStore(redis_url, namespace=redis_namespace, lease_ttl=2.0),
        checkpoint_mode="task_exit",
    ) as m:
        assert await run(m, mk(0, func=sim), -1) == -1
        assert await run(m, mk(1, func=sim), -1) == 1  # a shared hit
        await asyncio.sleep(0)
        assert await m.forget(func=sim) >= 1
    async with Memoizer(
        run_dir=tmp_path / "c",
        store=RedisStore(redis_url, namespace=redis_namespace, lease_ttl=2.0),
        checkpoint_mode="task_exit",
    ) as m:
        assert await run(m, mk(2, func=sim), -2) == -2
        assert await run(m, mk(0, func=other), -3) == "o"


# ------------------------------------------------------------------ against a model

_op = st.one_of(
    st.tuples(
        st.just("run"),
        st.sampled_from([sim, other]),
        st.integers(0, 2),
        st.sampled_from([None, 5.0, 20.0]),
        st.booleans(),
    ),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 6.0, 25.0])),
    st.tuples(st.just("forget_task"), st.sampled_from([sim, other]), st.integers(0, 2)),
    st.tuples(st.just("forget_func"), st.sampled_from([sim, other])),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(_op, max_size=14))
def test_ttl_forget_refresh_match_a_model(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, ops: list[Any]
) -> None:
    """Random runs (with ttl, refresh), clock ticks and forgets: hits in the run and after a reload match a model."""
    clock = Clock()
    monkeypatch.setattr(_expiry, "now", clock)
    monkeypatch.setattr(_records, "clock", clock)
    d = tmp_path_factory.mktemp("run")

    async def go() -> None:
        model: dict[tuple[str, int], tuple[int, float]] = {}
        ever: set[str] = set()
        counter = 0
        async with Memoizer(run_dir=d, checkpoint_mode="task_exit") as memo:
            for op in ops:
                if op[0] == "run":
                    _, f, x, ttl, refresh = op
                    k = (f.__qualname__, x)
                    task: dict[str, Any] = {"func": f, "args": (x,), "kwargs": {}}
                    if ttl is not None:
                        task["ttl"] = ttl
                    if refresh:
                        task["refresh"] = True
                    live = model.get(k)
                    if live is not None and live[1] <= clock.t:
                        live = None
                    fut = await memo.check_memo(task)
                    if live is not None and not refresh:
                        assert fut is not None and fut.result() == live[0], (op, live)
                    else:
                        assert fut is None, op
                        counter += 1
                        await memo.update_memo_result(task, counter)
                        model[k] = (counter, clock.t + ttl if ttl else math.inf)
                        ever.add(f.__qualname__)
                elif op[0] == "tick":
                    clock.t += op[1]
                elif op[0] == "forget_task":
                    _, f, x = op
                    await memo.forget({"func": f, "args": (x,), "kwargs": {}})
                    model.pop((f.__qualname__, x), None)
                    clock.t += 0.001  # a result recorded after a forget is strictly later
                else:
                    f = op[1]
                    if f.__qualname__ not in ever:
                        with pytest.raises(UnknownFunctionError):
                            await memo.forget(func=f)
                        continue
                    await memo.forget(func=f)
                    for k in [k for k in model if k[0] == f.__qualname__]:
                        del model[k]
                    clock.t += 0.001
        if not (d / "checkpoint").exists():  # nothing was ever recorded
            assert not model
            return
        async with Memoizer(checkpoint_files=[str(d)], run_dir=d.parent / (d.name + "-b")) as memo:
            for f in (sim, other):
                for x in range(3):
                    live = model.get((f.__qualname__, x))
                    want = live[0] if live is not None and live[1] > clock.t else None
                    fut = await memo.check_memo({"func": f, "args": (x,), "kwargs": {}})
                    assert (fut.result() if fut is not None else None) == want, (f, x)

    asyncio.run(go())
