"""Keys that never lie: one test class per class of defect found in review.

The rule: two inputs share a key only when no function could tell them
apart; where aiomemo cannot tell, it raises ``UnhashableInputError`` naming
where the value sits.
"""

from __future__ import annotations

import array
import collections
import copy
import dataclasses
import datetime as dt
import enum
import fractions
import functools
import json
import os
import pathlib
import random
import subprocess
import sys
import types
import zoneinfo
from typing import Any, NamedTuple

import numpy as np
import pytest

import aiomemo
from aiomemo import File, Memoizer, UnhashableInputError
from aiomemo import _hashing as H
from aiomemo._hashing import make_hash, make_hash_async

BIG = 5000  # over the 4 KiB inline limit: hashed out of band


def f(*args: Any, **kwargs: Any) -> None:
    """A task function."""


def task(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"func": f, "args": args, "kwargs": kwargs}


def key(*args: Any, **kwargs: Any) -> str:
    return make_hash(task(*args, **kwargs))


async def akey(*args: Any, **kwargs: Any) -> str:
    return await make_hash_async(task(*args, **kwargs))


def big(c: int, n: int = BIG) -> bytes:
    return bytes([c]) * n


class Perm(enum.IntFlag):
    """A flag enum."""

    R = 4
    W = 2
    X = 1


class Shade(enum.Flag):
    """A plain Flag."""

    LIGHT = 1
    DARK = 2


class Color(enum.Enum):
    """A plain enum with an alias."""

    RED = 1
    CRIMSON = 1
    BLUE = 2


@dataclasses.dataclass(frozen=True, eq=False)
class Frozen:
    """A frozen dataclass compared by identity (eq=False)."""

    x: int


@dataclasses.dataclass
class Loose:
    """A dataclass that may get attributes beyond its fields."""

    x: int

    @functools.cached_property
    def double(self) -> int:
        return self.x * 2


@dataclasses.dataclass(frozen=True)
class Adder:
    """A callable dataclass: its fields are its state."""

    n: int

    def __call__(self, x: int) -> int:
        return x + self.n


class Opaque:
    """A callable object whose state aiomemo cannot see."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: int) -> int:
        return x + self.n

    def method(self) -> int:
        return self.n


class Pair(NamedTuple):
    """A NamedTuple."""

    a: int
    b: int


class Sub(dict[str, int]):
    """A dict subclass."""


class MaskedSub(np.ndarray):
    """A user ndarray subclass."""


class TestOutOfBandOrder:
    """Large buffers inside sorted containers keep their pairing, at any depth."""

    @pytest.mark.parametrize("n", [BIG, 1 << 16])
    def test_dict_values(self, n: int) -> None:
        """{1: A, 0: B} and {0: A, 1: B} differ; insertion order does not matter."""
        a, b = big(1, n), big(2, n)
        assert key({1: a, 0: b}) != key({0: a, 1: b})
        assert key({1: a, 0: b}) == key({0: b, 1: a})

    def test_sets_and_frozensets(self) -> None:
        """Sets of large values key the same in any order, and different sets differ."""
        a, b, c = big(1), big(2), big(3)
        assert key({a, b}) == key({b, a})
        assert key({a, b}) != key({a, c})
        assert key(frozenset({a, b})) == key(frozenset({b, a}))
        assert key({(a, 1), (b, 2)}) != key({(a, 2), (b, 1)})
        assert key({(a, 1), (b, 2)}) == key({(b, 2), (a, 1)})

    def test_nested_at_depth(self) -> None:
        """Sorted containers inside sorted containers inside lists keep the pairing."""
        a, b, c, d = big(1), big(2), big(3), big(4)
        v1 = [{0: {frozenset({a, b}): c, 5: d}}]
        v2 = [{0: {5: d, frozenset({b, a}): c}}]
        v3 = [{0: {frozenset({a, b}): d, 5: c}}]
        assert key(v1) == key(v2)
        assert key(v1) != key(v3)
        s1 = {frozenset({a, b}), frozenset({c, d})}
        s2 = {frozenset({d, c}), frozenset({b, a})}
        s3 = {frozenset({a, c}), frozenset({b, d})}
        assert key(s1) == key(s2)
        assert key(s1) != key(s3)

    def test_numpy_values(self) -> None:
        """Arrays as values of non-str-keyed dicts pair with their keys."""
        a = np.arange(1000, dtype=np.int64)
        b = a[::-1].copy()
        assert key({1: a, 0: b}) != key({0: a, 1: b})
        assert key({1: a, 0: b}) == key({0: b, 1: a})

    async def test_files_sync_and_async(self, tmp_path: pathlib.Path) -> None:
        """Files in dicts and sets: content pairs with keys; sync and async agree."""
        pa, pb = tmp_path / "a", tmp_path / "b"
        pa.write_bytes(b"A" * 10)
        pb.write_bytes(b"B" * 10)
        cases = [
            ({1: File(pb), 0: File(pa)}, {0: File(pb), 1: File(pa)}),
            ({File(pa), File(pb)}, {File(pa), File(pa.with_name("a"))}),
        ]
        for v, other in cases:
            k = key(v)
            assert await akey(v) == k
            assert key(other) != k
        assert key({File(pa), File(pb)}) == key({File(pb), File(pa)})
        assert await akey({File(pa), File(pb)}) == key({File(pb), File(pa)})

    async def test_memoizer_end_to_end(self, tmp_path: pathlib.Path) -> None:
        """f({1: File(b), 0: File(a)}) no longer returns the result of f({0: File(b), 1: File(a)})."""
        pa, pb = tmp_path / "a", tmp_path / "b"
        pa.write_bytes(b"a" * BIG)
        pb.write_bytes(b"b" * BIG)
        calls = []
        async with Memoizer() as memo:

            @memo.cached
            async def g(d: dict[int, File]) -> list[tuple[int, bytes]]:
                calls.append(1)
                return [(k, pathlib.Path(v.path).read_bytes()[:1]) for k, v in sorted(d.items())]

            r1 = await g({1: File(pb), 0: File(pa)})
            r2 = await g({0: File(pb), 1: File(pa)})
        assert r1 == [(0, b"a"), (1, b"b")]
        assert r2 == [(0, b"b"), (1, b"a")]
        assert len(calls) == 2

    def test_hash_seed_independent(self) -> None:
        """Sets of large bytes key the same under any PYTHONHASHSEED."""
        code = (
            "from aiomemo import make_hash\n"
            "def f(): pass\n"
            "v = {bytes([i]) * 5000 for i in range(8)}\n"
            "w = {(bytes([i]) * 5000, i): i for i in range(8)}\n"
            "print(make_hash({'func': f, 'args': (v, w, frozenset(v)), 'kwargs': {}}))\n"
        )
        outs = {
            subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, PYTHONHASHSEED=seed),
            ).stdout
            for seed in ("0", "1", "4242")
        }
        assert len(outs) == 1

    def test_nan_keys_do_not_leak_order(self) -> None:
        """Distinct NaN dict keys (one canonical form) key by pair, not insertion order."""
        n1, n2 = float("nan"), float("nan")
        assert key({n1: 1, n2: 2}) == key({n2: 2, n1: 1})
        assert key({n1: 1, n2: 2}) != key({n1: 1, n2: 3})


class TestCallables:
    """A callable is keyed by everything that decides what it does, or raises."""

    def test_partial_as_task_function(self) -> None:
        """partial(pow, 2) and partial(pow, 3) as the task's function differ; so do keywords."""

        def k(fn: Any) -> str:
            return make_hash({"func": fn, "args": (3,), "kwargs": {}})

        assert k(functools.partial(pow, 2)) != k(functools.partial(pow, 3))
        assert k(functools.partial(f, a=1)) != k(functools.partial(f, a=2))
        assert k(functools.partial(f, 1)) != k(functools.partial(g_func, 1))
        assert k(functools.partial(pow, 2)) == k(functools.partial(pow, 2))

    def test_partial_as_argument(self) -> None:
        """{'func': partial(pow, 2)} never hits the result of another function."""
        assert key({"func": functools.partial(pow, 2)}) != key({"func": functools.partial(max, 2)})
        assert key(functools.partial(pow, 2)) != key(functools.partial(pow, 2, 5))
        assert key(functools.partial(pow, exp=2)) != key(functools.partial(pow, exp=3))

    def test_builtin_bound_methods(self) -> None:
        """'abc'.upper, {}.get: the bound object is part of the key."""
        assert key("abc".upper) != key("xyz".upper)
        assert key({}.get) != key({1: 2}.get)
        assert key((1).__add__) != key((2).__add__)
        assert key("abc".upper) == key("abc".upper)
        assert key(len) != key("abc".upper)

    def test_unkeyable_bound_object_raises(self) -> None:
        """Random(1).random: the Random's state has no key, so it raises naming __self__."""
        with pytest.raises(UnhashableInputError) as ei:
            key(random.Random(1).random)
        assert ei.value.where == "args[0].__self__"
        with pytest.raises(UnhashableInputError, match=r"func\.__self__"):
            make_hash({"func": random.Random(1).random, "args": (), "kwargs": {}})

    def test_bound_methods_of_user_objects(self) -> None:
        """A bound method keys its object: by its fields, or it raises."""
        assert key(Adder(1).__call__) != key(Adder(2).__call__)
        with pytest.raises(UnhashableInputError, match="__self__"):
            make_hash({"func": Opaque(1).method, "args": (), "kwargs": {}})

    def test_callable_instances(self) -> None:
        """A callable object keys its state (a dataclass's fields) or raises."""

        def k(fn: Any) -> str:
            return make_hash({"func": fn, "args": (1,), "kwargs": {}})

        assert k(Adder(1)) != k(Adder(2))
        assert k(Adder(1)) == k(Adder(1))
        with pytest.raises(UnhashableInputError) as ei:
            k(Opaque(1))
        assert ei.value.where == "func"
        with pytest.raises(UnhashableInputError, match="callable"):
            key(Opaque(1))

    def test_functions_by_name(self) -> None:
        """Functions found under their name key by module + qualname; as an argument a
        closure keys by its code and what it closes over. As the task's function
        it keys by name (as in Parsl, documented): version= separates them."""

        def make(n: int) -> Any:
            def inner() -> int:
                return n

            return inner

        assert key(make(1)) != key(make(2))
        assert key(make(1)) == key(make(1))
        assert key(f) != key(g_func)
        by_name = [make_hash({"func": make(n), "args": (), "kwargs": {}}) for n in (1, 2)]
        assert by_name[0] == by_name[1]
        one = make_hash({"func": make(1), "args": (), "kwargs": {}, "version": 1})
        two = make_hash({"func": make(2), "args": (), "kwargs": {}, "version": 2})
        assert one != two


def g_func(*args: Any, **kwargs: Any) -> None:
    """Another task function."""


class TestIgnoreNames:
    """ignore_for_cache / memo.cached(ignore=...) take names, never a bare str."""

    def test_bare_str_rejected(self) -> None:
        """ignore_for_cache='log' is a TypeError that shows the fix."""
        t = task(1, log=1) | {"ignore_for_cache": "log"}
        with pytest.raises(TypeError, match=r"\['log'\]"):
            make_hash(t)
        with pytest.raises(TypeError, match="str"):
            H.arg_digests(t)

    def test_non_str_names_rejected(self) -> None:
        """Names must be str."""
        with pytest.raises(TypeError, match="keyword names"):
            make_hash(task(1) | {"ignore_for_cache": [1]})

    def test_tuple_and_set_accepted(self) -> None:
        """A tuple or set of names works like a list."""
        base = make_hash(task(1))
        for names in (("log",), {"log"}, ["log"], frozenset({"log"})):
            assert make_hash(task(1, log=2) | {"ignore_for_cache": names}) == base

    async def test_cached_rejects_str(self) -> None:
        """memo.cached(ignore='log') raises at decoration, with and without fn."""
        async with Memoizer() as memo:

            async def h(x: int, log: int = 0) -> int:
                return x

            with pytest.raises(TypeError, match="bare str"):
                memo.cached(ignore="log")  # type: ignore[call-overload]
            with pytest.raises(TypeError, match="bare str"):
                memo.cached(h, ignore="log")  # type: ignore[call-overload]
            c = memo.cached(h, ignore=["log"])
            assert await c.key(1, log=1) == await c.key(1, log=2)  # type: ignore[attr-defined]


class TestNumpy:
    """numpy: the full dtype and the array's class are in the key, or it raises."""

    def test_structured_scalars(self) -> None:
        """Structured scalars with other field names, offsets or byte orders differ."""
        a = np.zeros(1, dtype=[("a", "<i4"), ("b", "<f8")])[0]
        b = np.zeros(1, dtype=[("x", "<i4"), ("y", "<f8")])[0]
        c = np.zeros(1, dtype=[("a", ">i4"), ("b", "<f8")])[0]
        d = np.zeros(1, dtype=[("a", "<i4", (1,)), ("b", "<f8")])[0]
        assert len({key(a), key(b), key(c), key(d)}) == 4
        assert key(a) == key(np.zeros(1, dtype=[("a", "<i4"), ("b", "<f8")])[0])

    @pytest.mark.parametrize("n", [2, 2000])
    def test_structured_arrays(self, n: int) -> None:
        """Overlapping, out-of-order, titled, aligned and padded layouts all differ."""
        dts = [
            np.dtype([("a", "u1"), ("b", "i4")]),
            np.dtype([("a", "u1"), ("b", "i4")], align=True),
            np.dtype({"names": ["a", "b"], "formats": ["u1", "i4"], "offsets": [0, 4]}),
            np.dtype({"names": ["a", "b"], "formats": ["u1", "i4"], "offsets": [4, 0]}),
            np.dtype({"names": ["a", "b"], "formats": ["i4", "i4"], "offsets": [0, 0]}),
            np.dtype([(("T", "a"), "u1"), ("b", "i4")]),
            np.dtype(
                {"names": ["a", "b"], "formats": ["u1", "i4"], "offsets": [0, 1], "itemsize": 8}
            ),
        ]
        keys = set()
        for d in dts:
            arr = np.zeros(n, dtype=d)
            keys.add(key(arr))
            assert key(arr) == key(arr.copy())
        assert len(keys) == len(dts)

    def test_masked_arrays(self) -> None:
        """The mask, masked data, fill value and hardness are in the key."""
        base = np.ma.masked_array([1, 2, 3], mask=[0, 1, 0])
        others = [
            np.ma.masked_array([1, 2, 3], mask=[0, 0, 0]),
            np.ma.masked_array([1, 9, 3], mask=[0, 1, 0]),  # masked slot differs: .data shows it
            np.ma.masked_array([1, 2, 3], mask=[0, 1, 0], fill_value=7),
            np.ma.masked_array([1, 2, 3], mask=[0, 1, 0], hard_mask=True),
            np.array([1, 2, 3]),
        ]
        k = key(base)
        assert key(np.ma.masked_array([1, 2, 3], mask=[0, 1, 0])) == k
        assert all(key(o) != k for o in others)
        assert key(np.ma.masked) != key(None)
        big_m = np.ma.masked_array(np.arange(2000), mask=np.arange(2000) % 2 == 0)
        assert key(big_m) != key(np.ma.masked_array(np.arange(2000), mask=np.arange(2000) % 3 == 0))

    @pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
    def test_subclasses(self) -> None:
        """matrix and recarray are not plain arrays; unknown subclasses raise."""
        plain = np.array([[1, 2]])
        assert key(np.matrix([[1, 2]])) != key(plain)
        rec = np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")])
        assert key(rec) != key(rec.view(np.ndarray))
        with pytest.raises(UnhashableInputError, match="asarray"):
            key(plain.view(MaskedSub))

    @pytest.mark.parametrize("n", [10, 1000, 100_000])
    @pytest.mark.parametrize("kind", ["M8[s]", "m8[ns]", "M8[D]"])
    def test_datetime_arrays_any_size(self, n: int, kind: str) -> None:
        """datetime64/timedelta64 arrays of any size key (no buffer error) by unit and data."""
        a = np.arange(n).astype(kind)
        assert key(a) == key(a.copy())
        b = a.copy()
        b[-1] = b[0]
        assert key(a) != key(b)
        assert key(a) != key(np.arange(n).astype("m8[us]"))
        assert key(a[::2]) == key(np.ascontiguousarray(a[::2]))


class TestEnums:
    """Enums key by class and member; Flag pseudo-members by value."""

    def test_flag_pseudo_members(self) -> None:
        """Combinations, zero and unknown bits all differ."""
        values = [Perm(0), Perm.R | Perm.W, Perm.R | Perm.X, Perm(8), Perm.R, Perm(7)]
        assert len({key(v) for v in values}) == len(values)
        assert key(Perm.R | Perm.W) == key(Perm(6))
        assert key(Shade.LIGHT | Shade.DARK) != key(Shade(0))
        assert key(Perm(4)) != key(4)

    def test_aliases_are_one_member(self) -> None:
        """An alias is the member itself."""
        assert key(Color.CRIMSON) == key(Color.RED)
        assert key(Color.RED) != key(Color.BLUE)

    def test_local_enum_classes_raise(self) -> None:
        """Two local enum classes with one qualname cannot be told apart: raise."""

        def make() -> Any:
            class E(enum.Enum):
                A = 1

            return E

        with pytest.raises(UnhashableInputError, match="module level"):
            key(make().A)


class TestTypeDetail:
    """What Python's == or a function can observe is in the key."""

    def test_ordered_dict_order(self) -> None:
        """OrderedDict order counts (== sees it); plain dicts stay order-free."""
        a = collections.OrderedDict([("a", 1), ("b", 2)])
        b = collections.OrderedDict([("b", 2), ("a", 1)])
        assert key(a) != key(b)
        assert key(b) == key(collections.OrderedDict([("b", 2), ("a", 1)]))
        assert key(collections.OrderedDict([(2, "x"), (1, "y")])) != key(
            collections.OrderedDict([(1, "y"), (2, "x")])
        )
        assert key({"a": 1, "b": 2}) == key({"b": 2, "a": 1})

    def test_defaultdict_factory(self) -> None:
        """defaultdict(list) and defaultdict(int) with the same items differ."""
        assert key(collections.defaultdict(list, a=1)) != key(collections.defaultdict(int, a=1))
        assert key(collections.defaultdict(list, a=1)) == key(collections.defaultdict(list, a=1))
        assert key(collections.defaultdict(None, a=1)) != key(collections.defaultdict(list, a=1))

    def test_timezone_names(self) -> None:
        """timezone(+1) and timezone(+1, 'CET') differ; other tzinfo classes raise."""
        off = dt.timedelta(hours=1)
        plain = dt.datetime(2024, 1, 1, tzinfo=dt.timezone(off))
        named = dt.datetime(2024, 1, 1, tzinfo=dt.timezone(off, "CET"))
        assert key(plain) != key(named)
        assert key(dt.time(1, tzinfo=dt.timezone(off))) != key(
            dt.time(1, tzinfo=dt.timezone(off, "X"))
        )
        paris = dt.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
        berlin = dt.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin"))
        assert key(paris) != key(berlin)

        class Fixed(dt.tzinfo):
            def utcoffset(self, d: Any) -> dt.timedelta:
                return off

        with pytest.raises(UnhashableInputError, match="time zone"):
            key(dt.datetime(2024, 1, 1, tzinfo=Fixed()))

    def test_local_classes_with_one_qualname(self) -> None:
        """Two distinct local classes with one qualname raise, naming where (never collide)."""

        def make() -> Any:
            @dataclasses.dataclass
            class Local:
                x: int

            return Local

        a, b = make(), make()
        assert a is not b and a.__qualname__ == b.__qualname__
        with pytest.raises(UnhashableInputError) as ei:
            key(1, cfg=[a(1)])
        assert ei.value.where == "kwargs['cfg'][0]"
        with pytest.raises(UnhashableInputError):
            key(a)
        dyn = collections.namedtuple("Dyn", "x")  # never stored under its name
        with pytest.raises(UnhashableInputError):
            key(dyn(1))

    def test_module_level_classes_key(self) -> None:
        """Classes found under their module.qualname key as before."""
        assert key(Pair(1, 2)) != key((1, 2))
        assert key(Sub(a=1)) != key({"a": 1})
        assert key(Frozen(1)) == key(Frozen(1))
        assert key(Frozen(1)) != key(Frozen(2))

    def test_attributes_beyond_fields_raise(self) -> None:
        """An attribute the key cannot see (not a field) raises; a cached_property does not."""
        v = Loose(1)
        assert v.double == 2
        assert key(v) == key(Loose(1))
        v.extra = 5  # type: ignore[attr-defined]
        with pytest.raises(UnhashableInputError, match="extra"):
            key(v)
        s = Sub(a=1)
        s.note = "x"  # type: ignore[attr-defined]
        with pytest.raises(UnhashableInputError, match="instance attributes"):
            key(s)
        od = collections.OrderedDict(a=1)
        od.note = "x"  # type: ignore[attr-defined]
        with pytest.raises(UnhashableInputError, match="instance attributes"):
            key(od)

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            (collections.deque([1, 2]), [1, 2]),
            (collections.deque([1, 2]), collections.deque([1, 2], maxlen=2)),
            (collections.deque([1, 2]), collections.deque([2, 1])),
            (collections.ChainMap({"a": 1}, {"a": 2}), collections.ChainMap({"a": 2}, {"a": 1})),
            (collections.ChainMap({"a": 1}), {"a": 1}),
            (range(0), range(5, 5)),
            (range(3), [0, 1, 2]),
            (slice(1, 2), slice(1, 2, None).indices(5)),
            (slice(1, 2), slice(1, 2, 1)),
            (fractions.Fraction(1, 2), 0.5),
            (fractions.Fraction(1, 2), fractions.Fraction(2, 3)),
            (array.array("i", [1, 2]), array.array("l", [1, 2])),
            (array.array("b", [1, 2]), b"\x01\x02"),
            (array.array("d", range(1000)), array.array("d", range(1, 1001))),
            (memoryview(b"ab").cast("b"), memoryview(b"ab")),
            (memoryview(bytes(8)).cast("i"), memoryview(bytes(8)).cast("B", (2, 4))),
            (bytearray(b"x" * BIG), b"x" * BIG),
            (types.SimpleNamespace(a=1), {"a": 1}),
            (types.SimpleNamespace(a=1), types.SimpleNamespace(a=2)),
            (Pair(1, 2), (1, 2)),
            (collections.Counter("ab"), {"a": 1, "b": 1}),
        ],
    )
    def test_more_containers_differ(self, a: Any, b: Any) -> None:
        """Other containers whose order, type or parameters a function can observe."""
        assert key(a) != key(b)

    def test_more_containers_equal_copies(self) -> None:
        """...and equal copies of them key alike."""
        for v in (
            collections.deque([1, {2: 3}]),
            collections.ChainMap({"a": 1}, {2: 3}),
            range(1, 9, 2),
            slice(None, 3),
            fractions.Fraction(-7, 3),
            array.array("q", range(2000)),
            types.SimpleNamespace(b=2, a=1),
        ):
            assert key(v) == key(copy.deepcopy(v))


class TestSurrogates:
    """Strs with lone surrogates (undecodable file names) key, and stay apart."""

    def test_keyed_and_distinct(self) -> None:
        """os.fsdecode(b'caf\\xe9') keys anywhere a str may sit, never like another str."""
        s = os.fsdecode(b"caf\xe9")
        t = os.fsdecode(b"caf\xe8")
        assert key(s) != key(t)
        assert key(s) != key("caf\udce9".encode("utf-8", "surrogatepass"))
        for wrap in (lambda x: [x], lambda x: {x: 1}, lambda x: {x}, pathlib.PurePosixPath):
            assert key(wrap(s)) == key(wrap(s))
            assert key(wrap(s)) != key(wrap(t))
        assert key(**{"n": s}) != key(**{"n": t})
        assert len(H.arg_digests(task(s))) > 0

    def test_codec_round_trip(self) -> None:
        """The result codec keeps them (a checkpointed result loads back)."""
        from aiomemo import _codec

        s = os.fsdecode(b"caf\xe9")
        assert _codec.decode(_codec.encode([s, {s: s}])) == [s, {s: s}]

    async def test_explain_cli(self, tmp_path: pathlib.Path) -> None:
        """`aiomemo explain` with such an argument answers, exit 0, no traceback."""
        s = os.fsdecode(b"caf\xe9")
        async with Memoizer(checkpoint_mode="task_exit", run_dir=tmp_path / "000") as memo:

            async def name_len(name: str) -> int:
                return len(name)

            c = memo.cached(name_len)
            await c(s)
        fname = f"{name_len.__module__}.{name_len.__qualname__}"
        for arg in (s, os.fsdecode(b"caf\xe8")):
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "aiomemo",
                    "explain",
                    "--json",
                    str(tmp_path),
                    "--func",
                    fname,
                    "--args",
                    json.dumps([arg]),
                ],
                capture_output=True,
                text=True,
            )
            assert res.returncode == 0, res.stderr
            assert "Traceback" not in res.stderr
            out = json.loads(res.stdout)
            assert out["hit"] is (arg == s)


class TestKeyHooks:
    """Key hooks belong to a Memoizer; importing a module changes no keys."""

    def test_no_global_hook_list(self) -> None:
        """The process-global fallback list is gone."""
        assert not hasattr(H, "fallback_hooks")

    def test_importing_parsl_adapter_changes_nothing(self) -> None:
        """A type with a Parsl id_for_memo registration stays unkeyable outside ParslMemoizer."""
        code = (
            "import aiomemo\n"
            "from parsl.dataflow.memoization import id_for_memo\n"
            "class T: pass\n"
            "@id_for_memo.register(T)\n"
            "def _(o, output_ref=False): return b't'\n"
            "def f(): pass\n"
            "t = {'func': f, 'args': (T(),), 'kwargs': {}}\n"
            "before = {'func': f, 'args': (1, {2: b'x' * 5000}), 'kwargs': {}}\n"
            "k0 = aiomemo.make_hash(before)\n"
            "import aiomemo.parsl\n"
            "assert aiomemo.make_hash(before) == k0\n"
            "try:\n"
            "    aiomemo.make_hash(t)\n"
            "except aiomemo.UnhashableInputError:\n"
            "    print('raises')\n"
            "from aiomemo._hashing import make_hash\n"
            "print(len(make_hash(t, hooks=aiomemo.parsl._KEY_HOOKS)))\n"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["raises", "64"]

    async def test_memoizer_key_hooks(self) -> None:
        """Memoizer(key_hooks=...) keys through its hooks; another Memoizer does not."""

        def hook(obj: object, output_ref: bool) -> object:
            return ("opaque", obj.n) if isinstance(obj, Opaque) else H.NOT_HANDLED

        async with Memoizer(key_hooks=[hook]) as memo, Memoizer() as plain:
            k1 = await memo.make_hash(task(Opaque(1)))  # type: ignore[arg-type]
            k2 = await memo.make_hash(task(Opaque(2)))  # type: ignore[arg-type]
            assert k1 != k2
            assert k1 == make_hash(task(Opaque(1)), hooks=[hook])
            with pytest.raises(UnhashableInputError):
                await plain.make_hash(task(Opaque(1)))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="key_hooks"):
            Memoizer(key_hooks=[1])  # type: ignore[list-item]


class TestGolden:
    """Keys of inputs that keyed correctly before the fixes stay the same."""

    def test_golden_file(self, tmp_path: pathlib.Path) -> None:
        """tests/golden/keys_cases.py gives tests/golden/keys.json."""
        import runpy

        here = pathlib.Path(__file__).parent / "golden"
        ns = runpy.run_path(str(here / "keys_cases.py"))
        got = ns["keys"](str(tmp_path))
        want = json.loads((here / "keys.json").read_text())
        assert got == want
        assert sum(k.startswith("v1_") for k in want) >= 15

    def test_format_version(self) -> None:
        """The fixes kept format version 1 (old keys of sound inputs are unchanged)."""
        assert aiomemo._hashing.FORMAT_VERSION == 1


def test_structured_padding_is_not_data() -> None:
    """Equal structured arrays and scalars with different padding bytes key alike."""
    d = np.dtype([("a", "u1"), ("b", "<i4")], align=True)
    raw = np.frombuffer(bytes([1, 0xAA, 0xBB, 0xCC, 2, 0, 0, 0]) * 2, dtype=d)
    clean = np.zeros(2, dtype=d)
    clean["a"], clean["b"] = 1, 2
    assert raw.tobytes() != clean.tobytes()
    assert key(raw) == key(clean)
    assert key(raw[0]) == key(clean[0])
    assert key(np.ma.masked_array(raw)) == key(np.ma.masked_array(clean))
    clean["b"] = 3
    assert key(raw) != key(clean)


def test_generic_aliases_and_descriptors() -> None:
    """list[int] never passes for list; unbound C methods key by class and name."""
    assert key(str.upper) != key(str.lower)
    assert key(str.upper) != key(bytes.upper)
    assert key(str.__add__) == key(str.__add__)
    assert key(dict.fromkeys) != key(dict)
    with pytest.raises(UnhashableInputError):
        key(list[int])
    with pytest.raises(UnhashableInputError):
        make_hash({"func": list[int], "args": (), "kwargs": {}})
    assert key(np.add) != key(np.multiply)
    cached_len = functools.lru_cache(len)
    assert len(key(cached_len)) == 64


def test_parsl_task_with_bare_str_ignore() -> None:
    """A Parsl task with ignore_for_cache='log' gets the TypeError, not letter-wise ignoring."""
    pytest.importorskip("parsl")
    from aiomemo import _parsl_keys as aparsl

    view = aparsl.view_of({"func": f, "args": (), "kwargs": {"log": 1}, "ignore_for_cache": "log"})  # type: ignore[arg-type,typeddict-item]
    with pytest.raises(TypeError, match="bare str"):
        H.hash_task(view, aparsl.KEY_HOOKS)
    ok = aparsl.view_of({"func": f, "args": (), "kwargs": {"log": 1}, "ignore_for_cache": ("log",)})  # type: ignore[arg-type,typeddict-item]
    assert H.hash_task(ok) == H.hash_task(task())


async def test_async_threaded_path_orders_like_sync(tmp_path: pathlib.Path) -> None:
    """Over the thread threshold, tied big members in sets and Files order as in make_hash."""
    n = H.THREAD_THRESHOLD
    p = tmp_path / "f"
    p.write_bytes(b"z" * 10)
    v = [{big(1, n), big(2, n)}, {0: big(3, n), 1: File(p)}, frozenset({(big(4, n), File(p))})]
    w = [{big(2, n), big(1, n)}, {1: File(p), 0: big(3, n)}, frozenset({(big(4, n), File(p))})]
    assert await akey(v) == key(v) == key(w) == await akey(w)
    assert key(v) != key([{big(1, n), big(5, n)}, *v[1:]])
