"""Task keys: soundness, canonical form, stability, errors, large inputs."""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import datetime as dt
import decimal
import enum
import functools
import json
import math
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiomemo
from aiomemo import _hashing as H
from aiomemo._hashing import File, id_for_memo, make_hash, make_hash_async


def golden_func(*args: Any, **kwargs: Any) -> None:
    """Stand-in task function with a fixed identity for the golden vectors."""


golden_func.__module__ = "golden"
golden_func.__qualname__ = "golden_func"


def f(*args: Any, **kwargs: Any) -> None:
    """A task function."""


def g(*args: Any, **kwargs: Any) -> None:
    """Another task function."""


@dataclasses.dataclass
class P:
    """A module-level dataclass (its name leads back to it, so it has a key)."""

    x: int
    y: list[int]


@dataclasses.dataclass
class Cfg:
    """A config holder whose field may hold anything."""

    port: object


class Color(enum.Enum):
    """A module-level enum."""

    RED = 1
    BLUE = 2


NT = collections.namedtuple("NT", "x y")


def task(*args: Any, _func: Any = f, **kwargs: Any) -> dict[str, Any]:
    return {"func": _func, "args": args, "kwargs": kwargs}


def key(*args: Any, **kwargs: Any) -> str:
    return make_hash(task(*args, **kwargs))


# --------------------------------------------------------------------------- strategies
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.complex_numbers(allow_nan=True),
    st.decimals(allow_nan=False, places=3),
    st.dates(),
    st.datetimes(),
    st.timedeltas(),
    st.uuids(),
)
hashables = st.recursive(
    scalars.filter(lambda x: not isinstance(x, decimal.Decimal) or x.is_finite()),
    lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    scalars,
    lambda c: (
        st.lists(c, max_size=4)
        | st.lists(c, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=4), c, max_size=4)
        | st.dictionaries(hashables, c, max_size=3)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
    ),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    """Strict equality: equal values of the same types all the way down (NaN == NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and str(a) == str(b))
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        bk = list(b)
        for k in a:
            match = [k2 for k2 in bk if same(k, k2)]
            if not match or not same(a[k], b[match[0]]):
                return False
        return True
    if isinstance(a, set | frozenset):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if isinstance(a, dt.datetime | dt.time):
        return a == b and a.tzinfo == b.tzinfo and a.fold == b.fold
    return bool(a == b)


def shuffled_copy(v: Any) -> Any:
    """A deep copy with every dict and set rebuilt in reverse order."""
    if type(v) is list:
        return [shuffled_copy(x) for x in v]
    if type(v) is tuple:
        return tuple(shuffled_copy(x) for x in v)
    if type(v) is dict:
        return {k: shuffled_copy(v[k]) for k in reversed(list(v))}
    if type(v) is set:
        return set(reversed(list(v)))
    if type(v) is frozenset:
        return frozenset(reversed(list(v)))
    return v


class TestSoundness:
    """Equal inputs give equal keys, different inputs different keys."""

    @given(values)
    @settings(max_examples=300, deadline=None)
    def test_equal_inputs_equal_keys(self, v: Any) -> None:
        """A copy with dicts and sets in another order has the same key."""
        assert key(v) == key(shuffled_copy(v))

    @given(values, values)
    @settings(max_examples=500, deadline=None)
    def test_different_inputs_different_keys(self, a: Any, b: Any) -> None:
        """Keys are equal exactly when the values are strictly equal."""
        assert (key(a) == key(b)) == same(a, b)

    def test_seven_types_never_conflated(self) -> None:
        """1, 1.0, True, '1', b'1', (1,) and [1] are seven different keys."""
        keys = {key(v) for v in (1, 1.0, True, "1", b"1", (1,), [1])}
        assert len(keys) == 7

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            (0, False),
            ([], ()),
            (set(), frozenset()),
            ({}, []),
            (bytearray(b"x"), b"x"),
            (b"x", "x"),
            ({"a": 1}, {"a": 1.0}),
            ({1: 2}, {"1": 2}),
            ((1, (2, 3)), (1, 2, 3)),
            ([[1], [2]], [[1, 2]]),
            (None, ()),
            (2**64, 2**64 - 1),
            (2**64, float(2**64)),
            (0.0, -0.0),
            (dt.date(2024, 1, 1), dt.datetime(2024, 1, 1)),
            (dt.timedelta(0), 0),
            (decimal.Decimal("1"), 1),
            (uuid.UUID(int=1), 1),
            (pathlib.PurePosixPath("a"), "a"),
            (pathlib.PurePosixPath("a"), pathlib.PureWindowsPath("a")),
            (complex(1, 0), 1.0),
            (np.int64(1), 1),
            (np.arange(3), [0, 1, 2]),
            (np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int64)),
            (np.zeros((2, 3)), np.zeros((3, 2))),
            (f, g),
            (f, "f"),
            (int, "int"),
        ],
    )
    def test_pairs_differ(self, a: Any, b: Any) -> None:
        """Look-alike values of different types or shapes have different keys."""
        assert key(a) != key(b)

    def test_floats_by_their_bits(self) -> None:
        """A NaN keys by its bits: ``copysign`` tells -NaN from NaN, as it tells
        -0.0 from 0.0; the same NaN keys alike wherever it sits."""
        assert (
            key(float("nan"))
            == key(math.nan)
            == key(struct.unpack(">d", struct.pack(">d", math.nan))[0])
        )
        assert key(float("nan")) != key(-float("nan"))
        payload = struct.unpack(">d", bytes.fromhex("7ff8000000000001"))[0]
        assert key(payload) != key(math.nan)
        assert key(complex(math.nan, 1)) != key(complex(-math.nan, 1))
        assert key(complex(math.nan, 1)) == key(complex(math.nan, 1))
        for v in ([math.nan], {"a": -math.nan}, (payload,), {payload}):
            assert key(v) == key(copy.deepcopy(v))
        assert key([math.nan]) != key([-math.nan]) and key({"a": math.nan}) != key({"a": -math.nan})

    def test_args_and_kwargs_are_separate(self) -> None:
        """A value passed positionally or by keyword gives different keys; so do functions."""
        assert key(1) != key(a=1)
        assert make_hash(task(1, _func=f)) != make_hash(task(1, _func=g))

    def test_version_separates(self) -> None:
        """The optional version tag is part of the key."""
        t1 = task(1) | {"version": "1"}
        t2 = task(1) | {"version": "2"}
        assert len({make_hash(t1), make_hash(t2), make_hash(task(1))}) == 3


class TestCanonicalTypes:
    """Every documented input type has a key, and the key follows the value."""

    def test_containers(self) -> None:
        """Nested containers key by content; sets and dicts ignore order."""
        assert key({"b": 1, "a": [1, {2, 3}]}) == key({"a": [1, {3, 2}], "b": 1})
        assert key({1: "a", "x": 2}) == key({"x": 2, 1: "a"})

    def test_dataclass_enum_namedtuple(self) -> None:
        """Dataclasses by fields, Enums by name, NamedTuples by fields, all with their type."""
        assert key(P(1, [2])) == key(P(1, [2]))
        assert key(P(1, [2])) != key(P(1, [3]))
        assert key(Color.RED) != key(Color.BLUE)
        assert key(Color.RED) != key(1)
        assert key(NT(1, 2)) != key((1, 2))
        assert key(collections.OrderedDict(a=1)) != key({"a": 1})

    def test_functions_types_partials(self) -> None:
        """Functions by module + qualname; partials by function and bound arguments."""
        assert key(f) == key(f)
        assert key(functools.partial(f, 1)) != key(functools.partial(f, 2))
        assert key(len) != key(abs)
        assert key(int) != key(float)

    def test_datetime_family(self) -> None:
        """Dates, times and timedeltas key by value; time zones are part of it."""
        naive = dt.datetime(2024, 5, 1, 12)
        aware = naive.replace(tzinfo=dt.UTC)
        assert key(naive) != key(aware)
        assert key(dt.timedelta(hours=1)) == key(dt.timedelta(seconds=3600))

    def test_numpy(self) -> None:
        """Arrays key by dtype, shape and data; a strided view keys like its copy."""
        a = np.arange(20, dtype=np.float64).reshape(4, 5)
        assert key(a) == key(a.copy())
        assert key(a[:, ::2]) == key(np.ascontiguousarray(a[:, ::2]))
        assert key(a) != key(a.T)
        big = np.arange(100_000, dtype=np.int64)
        assert key(big) == key(big.copy())
        big2 = big.copy()
        big2[-1] = 0
        assert key(big) != key(big2)

    def test_large_and_small_buffers(self) -> None:
        """Buffers above the inline limit key by content like small ones."""
        n = H.INLINE_LIMIT
        assert key(b"a" * (n + 10)) == key(bytes(b"a" * (n + 10)))
        assert key(b"a" * (n + 10)) != key(b"a" * (n + 11))
        assert key(bytearray(n + 1)) != key(bytes(n + 1))
        assert key(memoryview(b"x" * (n + 5))) == key(memoryview(b"x" * (n + 5)))

    def test_ignore_for_cache(self) -> None:
        """Ignored kwargs leave the key alone; an ignored name that is absent is fine."""
        t1 = task(1, a=1, log="x") | {"ignore_for_cache": ["log", "missing"]}
        t2 = task(1, a=1, log="y") | {"ignore_for_cache": ["log"]}
        assert make_hash(t1) == make_hash(t2) == make_hash(task(1, a=1))

    def test_parsl_task_record_shape(self) -> None:
        """A Parsl-shaped TaskRecord (extra keys, list args) hashes as is."""
        t = {
            "func": f,
            "args": [1, 2],
            "kwargs": {"outputs": []},
            "ignore_for_cache": [],
            "memoize": True,
            "id": 7,
            "fail_count": 0,
        }
        assert len(make_hash(t)) == 64
        assert make_hash(t) != make_hash(t | {"kwargs": {}})


class TestRegistry:
    """id_for_memo registrations and fallback hooks."""

    def test_registration_used(self) -> None:
        """A registered user type keys by its stand-in value and its type."""

        class Point:
            def __init__(self, x: int, y: int) -> None:
                self.x, self.y = x, y

        @id_for_memo.register(Point)
        def _(obj: Point, output_ref: bool = False) -> object:
            return (obj.x, obj.y)

        assert key(Point(1, 2)) == key(Point(1, 2))
        assert key(Point(1, 2)) != key(Point(2, 1))
        assert key(Point(1, 2)) != key((1, 2))

    def test_key_hook(self) -> None:
        """A key hook keys types nothing else covers, only where it is given."""

        class Opaque:
            pass

        def hook(obj: object, output_ref: bool) -> object:
            return "opaque" if isinstance(obj, Opaque) else H.NOT_HANDLED

        t = task(Opaque())
        assert make_hash(t, hooks=[hook]) == make_hash(task(Opaque()), hooks=[hook])
        assert H.hash_task(t, hooks=(hook,)).hex() == make_hash(t, hooks=[hook])
        with pytest.raises(aiomemo.UnhashableInputError):
            key(Opaque())


class TestErrors:
    """Inputs without a key raise UnhashableInputError saying where and what."""

    def test_names_where_and_type(self) -> None:
        """The message names kwargs['cfg'][3], the type, and how to register it."""
        with pytest.raises(aiomemo.UnhashableInputError) as ei:
            key(1, cfg=[1, 2, 3, object()])
        msg = str(ei.value)
        assert "kwargs['cfg'][3]" in msg
        assert "builtins.object" in msg
        assert "id_for_memo.register" in msg
        assert ei.value.where == "kwargs['cfg'][3]"
        assert isinstance(ei.value, TypeError)

    def test_nested_positions(self) -> None:
        """Positions inside args, dict keys, dataclass fields are named."""
        with pytest.raises(aiomemo.UnhashableInputError, match=r"args\[1\]\['x'\]\.port"):
            key(0, {"x": Cfg(object())})

    def test_cycle_raises(self) -> None:
        """A list that contains itself raises (never hangs, never RecursionError)."""
        a: list[Any] = [1]
        a.append(a)
        with pytest.raises(aiomemo.UnhashableInputError, match="cyclic"):
            key(a)
        d: dict[str, Any] = {}
        d["self"] = d
        with pytest.raises(aiomemo.UnhashableInputError, match="cyclic"):
            key(x=d)

    def test_too_deep(self) -> None:
        """Absurd nesting raises a clear error rather than RecursionError."""
        v: Any = 0
        for _ in range(5000):
            v = [v]
        with pytest.raises(aiomemo.UnhashableInputError, match="deeper"):
            key(v)

    def test_numpy_object_array(self) -> None:
        """Object arrays have no key."""
        with pytest.raises(aiomemo.UnhashableInputError, match="object"):
            key(np.array([object()]))


class TestFiles:
    """File inputs: by content (default) or by stat, sync and async alike."""

    async def test_content_key(self, tmp_path: pathlib.Path) -> None:
        """Content changes change the key; a moved file keeps it; async == sync."""
        p = tmp_path / "in.txt"
        p.write_bytes(b"hello" * 100_000)
        k1 = make_hash(task(File(p)))
        assert await make_hash_async(task(File(p))) == k1
        q = tmp_path / "moved.txt"
        p.rename(q)
        assert make_hash(task(File(q))) == k1
        q.write_bytes(b"other")
        assert make_hash(task(File(q))) != k1
        assert await make_hash_async(task(File(q))) == make_hash(task(File(q)))

    async def test_stat_key(self, tmp_path: pathlib.Path) -> None:
        """by='stat' keys by path, size and mtime, without reading."""
        p = tmp_path / "in.bin"
        p.write_bytes(b"x")
        k1 = make_hash(task(File(p, by="stat")))
        assert await make_hash_async(task(File(p, by="stat"))) == k1
        os.utime(p, ns=(1, 10**18))
        assert make_hash(task(File(p, by="stat"))) != k1

    async def test_key_now_finishes_only_what_needs_io(self, tmp_path: pathlib.Path) -> None:
        """hash_task_now makes plain keys at once; Files, big buffers and
        unprepared fingerprints come back pending, and finish to the same key."""
        p = tmp_path / "in.bin"
        p.write_bytes(b"data" * 1000)

        def fresh(x: int) -> int:  # never fingerprinted before this test
            return x

        cases = [
            (task(1, "x", [2.5]), False),
            (task(File(p)), True),
            (task(b"x" * (H.INLINE_LIMIT + 1)), True),
            (task(np.arange(H.THREAD_THRESHOLD // 8 + 1)), True),  # hashed in a thread
            ({"func": fresh, "args": (1,), "kwargs": {}, "track_code": True}, True),
        ]
        for t, pending in cases:
            now = H.hash_task_now(t)
            assert isinstance(now, H.PendingKey) is pending, t
            got = await now.finish() if isinstance(now, H.PendingKey) else now
            assert got == H.hash_task(t)
            assert await H.hash_task_async(t) == got

    def test_output_refs_by_path(self, tmp_path: pathlib.Path) -> None:
        """A File in outputs= is keyed by path and need not exist."""
        t1 = task(1, outputs=[File(tmp_path / "out1")])
        t2 = task(1, outputs=[File(tmp_path / "out2")])
        assert make_hash(t1) != make_hash(t2)
        assert make_hash(t1) == make_hash(task(1, outputs=[File(tmp_path / "out1")]))

    def test_missing_file(self, tmp_path: pathlib.Path) -> None:
        """A missing input file is an UnhashableInputError naming the path."""
        with pytest.raises(aiomemo.UnhashableInputError, match="nope"):
            make_hash(task(File(tmp_path / "nope")))

    def test_bad_mode(self) -> None:
        """File(by=...) accepts 'content' or 'stat' only."""
        with pytest.raises(ValueError, match="content"):
            File("x", by="mtime")  # type: ignore[arg-type]


GOLDEN = {
    "empty": "5252628eb70621cfa0b91d581360d58932807c70ed1f1c22a36da87371e08a3d",
    "scalars": "4130c23db6f62431f9381e9dfa59fe236784e45883d6d49b4b9c05f17ef988ee",
    "small_task": "bd2d9963c1e7c30bca084e9acb6838e639f67b4c231b61258d00d7f2524e7166",
    "containers": "32d3b911916ec58540cb6bb490c0cb59135329720fe5d130c0a0daede5261632",
    "numbers": "2db10429efe50f7c68be8f62bc455cbcbf53e891e87b397211200b07eb92792f",
    "times": "66b1ec5adb5006b72cd088e5f21ab7834cd2a904224eda7aa1e17b6943b6dac0",
    "misc": "1b5248ef1f0be821cef96ce281968b36f34dd0c821907f69da71cdaa0b9e978b",
    "large_bytes": "49d54565e349997cb95682cf49222270046991fc40c076a7b341744d8fd00333",
}

GOLDEN_SOURCE = """
import datetime as dt, decimal, uuid, pathlib
CASES = {
 "empty": ((), {}),
 "scalars": ((1, 2.5, "x", None, True, b"b"), {}),
 "small_task": ((1, 2.5, "x"), {"a": [1, 2, 3], "b": {"k": 1, "j": "v"}}),
 "containers": (((1, 2), [1, 2], {3, 1}, frozenset({"a"}), {1: "x", "y": 2}), {}),
 "numbers": ((2**100, -2**70, float("nan"), -0.0, complex(1, -1), decimal.Decimal("1.10")), {}),
 "times": ((dt.date(2024, 1, 2), dt.datetime(2024, 1, 2, 3, 4, 5, 6), dt.time(1, 2),
            dt.timedelta(days=1, seconds=2)), {}),
 "misc": ((uuid.UUID(int=12345), pathlib.PurePosixPath("/a/b"), bytearray(b"xy")), {}),
 "large_bytes": ((b"\\x01" * 10000,), {"k": bytearray(5000)}),
}
"""


class TestStability:
    """Keys are pinned by golden vectors and do not depend on the process."""

    def test_golden_vectors(self) -> None:
        """Fixed inputs give fixed keys (changing them means a new format version)."""
        ns: dict[str, Any] = {}
        exec(GOLDEN_SOURCE, ns)
        got = {
            name: make_hash({"func": golden_func, "args": a, "kwargs": k})
            for name, (a, k) in ns["CASES"].items()
        }
        assert got == GOLDEN

    def test_other_process_other_hash_seed(self) -> None:
        """Another interpreter with another PYTHONHASHSEED gives the same keys."""
        code = GOLDEN_SOURCE + textwrap.dedent(
            """
            import json, sys
            from aiomemo import make_hash
            def golden_func(*a, **k): pass
            golden_func.__module__ = "golden"; golden_func.__qualname__ = "golden_func"
            extra = {"sets": (({"a", "b", "c", "d", "e"}, frozenset({"x", "yy", "zzz"})), {})}
            CASES.update(extra)
            print(json.dumps({n: make_hash({"func": golden_func, "args": a, "kwargs": k})
                              for n, (a, k) in CASES.items()}))
            """
        )
        outs = []
        for seed in ("1", "12345"):
            env = dict(os.environ, PYTHONHASHSEED=seed)
            res = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
            )
            outs.append(json.loads(res.stdout))
        assert outs[0] == outs[1]
        assert {k: v for k, v in outs[0].items() if k in GOLDEN} == GOLDEN


class TestLargeInputs:
    """Large buffers: no copy, and the event loop keeps turning."""

    def test_no_copy_of_large_bytes(self) -> None:
        """Hashing 64 MiB of bytes allocates well under 1 MiB."""
        buf = os.urandom(1 << 20) * 64
        t = task(buf)
        tracemalloc.start()
        try:
            make_hash(t)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < (1 << 20)

    def test_no_copy_of_numpy(self) -> None:
        """Hashing a 64 MiB contiguous array allocates well under 1 MiB."""
        arr = np.ones(8 << 20, dtype=np.float64)
        tracemalloc.start()
        try:
            make_hash(task(arr))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < (1 << 20)

    async def test_loop_keeps_turning(self) -> None:
        """While a 512 MiB input is hashed, a 1 ms ticker task keeps running."""
        buf = bytes(512 << 20)
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                await asyncio.sleep(0.001)
                ticks += 1

        tk = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        before = ticks
        t0 = time.perf_counter()
        k = await make_hash_async(task(buf))
        elapsed = time.perf_counter() - t0
        during = ticks - before
        stop = True
        await tk
        assert k == make_hash(task(buf))
        # inline hashing would give the ticker no turn at all while it runs
        assert during >= 3, (during, elapsed)


def test_registration_errors_pass_through() -> None:
    """An error raised inside an id_for_memo registration reaches the caller as itself."""

    class Touchy:
        pass

    @id_for_memo.register(Touchy)
    def _(obj: Touchy, output_ref: bool = False) -> object:
        raise TypeError("touchy refuses")

    with pytest.raises(TypeError, match="touchy refuses"):
        key(Touchy())
    with pytest.raises(TypeError, match="must be a sequence"):
        make_hash({"func": f, "args": 5, "kwargs": {}})
