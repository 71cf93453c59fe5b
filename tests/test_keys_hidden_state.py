"""Keys that see every bit of state a function could read.

Classes of defect found by a hostile review (each with several examples, not
only the one that was found):

* subclasses of built-ins read through methods they override (``__str__``,
  ``__iter__``, ``items``...): the value is read with the built-in's own methods;
* state beside the value (``__slots__``, a dataclass that is also a list, a
  File or a slotted base, a field deleted and another attribute set) raises
  or is keyed, never dropped;
* names that stopped leading to the object (a class redefined after its first
  key, a lambda or closure as an argument, a class-based decorator, a local
  subclass of a registered base) never stand for it;
* ``outputs=None`` is not "no outputs"; floats by their bits; named timezones.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import functools
import math
import pathlib
import subprocess
import sys
import textwrap
import types
from contextlib import contextmanager as contextlib_contextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiomemo
from aiomemo import File, UnhashableInputError
from aiomemo._hashing import make_hash, make_hash_async

ROOT = pathlib.Path(__file__).resolve().parent.parent


def f(*args: Any, **kwargs: Any) -> None:
    """A task function."""


def key(*args: Any, **kwargs: Any) -> str:
    return make_hash({"func": f, "args": args, "kwargs": kwargs})


# ---- subclasses of built-ins that lie through their dunders


class LyingStr(str):
    def __str__(self) -> str:
        return "***"


class LyingInt(int):
    def __int__(self) -> int:
        return 0

    def __index__(self) -> int:
        return 0


class LyingFloat(float):
    def __float__(self) -> float:
        return 0.0


class LyingBytes(bytes):
    def __bytes__(self) -> bytes:
        return b""


class LyingList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


class LyingTuple(tuple):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter(())


class LyingDict(dict):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter(())

    def keys(self) -> Any:
        return []

    def items(self) -> Any:
        return []


class LyingSet(set):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter(())


class LyingFrozenset(frozenset):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter(())


class LyingOrdered(collections.OrderedDict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return []

    def __iter__(self) -> Any:
        return iter(())


class LyingDefault(collections.defaultdict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return []

    def __iter__(self) -> Any:
        return iter(())


LIARS: list[tuple[type, Any, Any]] = [
    (LyingStr, "a", "b"),
    (LyingInt, 1, 2),
    (LyingFloat, 1.5, 2.5),
    (LyingBytes, b"a", b"b"),
    (LyingList, [1], [2]),
    (LyingTuple, (1,), (2,)),
    (LyingDict, {"a": 1}, {"a": 2}),
    (LyingSet, {1}, {2}),
    (LyingFrozenset, {1}, {2}),
    (LyingOrdered, {"a": 1}, {"a": 2}),
]


class TestDundersOfSubclasses:
    """A subclass's value is read with the built-in's methods, not its overrides."""

    @pytest.mark.parametrize(("cls", "a", "b"), LIARS, ids=[c.__name__ for c, _, _ in LIARS])
    def test_values_differ(self, cls: type, a: Any, b: Any) -> None:
        assert key(cls(a)) != key(cls(b))
        assert key(cls(a)) == key(cls(a))
        assert key(cls(a)) != key(a)  # the class is part of the key

    def test_defaultdict_subclass(self) -> None:
        assert key(LyingDefault(list, a=1)) != key(LyingDefault(list, a=2))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.integers() | st.text(max_size=3) | st.floats(allow_nan=False), max_size=5),
        st.lists(st.integers() | st.text(max_size=3) | st.floats(allow_nan=False), max_size=5),
    )
    def test_lists_key_as_their_items(self, a: list[Any], b: list[Any]) -> None:
        """Property: two lying lists share a key exactly when their items do."""
        assert (key(LyingList(a)) == key(LyingList(b))) == (key(a) == key(b))
        assert (key(LyingTuple(a)) == key(LyingTuple(b))) == (key(tuple(a)) == key(tuple(b)))

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.text(max_size=3), st.integers(), max_size=5), st.text(max_size=5))
    def test_dicts_and_strs(self, d: dict[str, int], s: str) -> None:
        assert (key(LyingDict(d)) == key(LyingDict({}))) == (d == {})
        assert (key(LyingStr(s)) == key(LyingStr("***"))) == (s == "***")


# ---- state beside the built-in value


class Qty(float):
    __slots__ = ("unit",)


class Tagged(list):  # type: ignore[type-arg]
    __slots__ = ("tag",)


class Mangled(dict):  # type: ignore[type-arg]
    __slots__ = ("__secret",)


class MidSlots(str):
    __slots__ = ("note",)


class Below(MidSlots):
    __slots__ = ()


class Bare(tuple):  # type: ignore[type-arg]
    __slots__ = ()


class SlottedOrdered(collections.OrderedDict):  # type: ignore[type-arg]
    __slots__ = ("x",)


class HidesDict(list):  # type: ignore[type-arg]
    @property  # type: ignore[misc]
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        return {}


class HidesAll(list):  # type: ignore[type-arg]
    def __getattribute__(self, name: str) -> Any:
        if name == "__dict__":
            return {}
        return super().__getattribute__(name)


@dataclasses.dataclass
class HiddenDataclass:
    a: int

    @property  # type: ignore[misc]
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        return {"a": self.a}


class TestSlotsOfSubclasses:
    """A set slot is state the key cannot see: it raises, naming the slot."""

    @pytest.mark.parametrize(
        ("make", "slot"),
        [
            (lambda: Qty(1.0), "unit"),
            (lambda: Tagged([1]), "tag"),
            (lambda: Mangled(a=1), "_Mangled__secret"),
            (lambda: Below("x"), "note"),
            (lambda: SlottedOrdered(a=1), "x"),
        ],
    )
    def test_set_slot_raises(self, make: Any, slot: str) -> None:
        v = make()
        assert key(v) == key(make())  # unset: nothing beside the value
        setattr(v, slot, "m")
        with pytest.raises(UnhashableInputError, match=slot):
            key(v)

    def test_attributes_a_class_would_hide(self) -> None:
        """A ``__dict__`` property or ``__getattribute__`` cannot hide attributes."""
        v = HidesAll([1])
        assert key(v) == key(HidesAll([1]))
        v.secret = 1  # type: ignore[attr-defined]
        with pytest.raises(UnhashableInputError, match="instance attributes"):
            key(v)
        for hidden in (HidesDict([1]), HiddenDataclass(1)):
            with pytest.raises(UnhashableInputError, match="redefines __dict__"):
                key(hidden)

    def test_empty_slots_key(self) -> None:
        assert key(Bare((1, 2))) != key(Bare((1, 3)))
        assert key(Bare((1, 2))) != key((1, 2))


# ---- dataclasses


@dataclasses.dataclass
class Bag(list):  # type: ignore[type-arg]
    name: str = "bag"


@dataclasses.dataclass
class Table(dict):  # type: ignore[type-arg]
    name: str = "t"


@dataclasses.dataclass
class Label(str):
    size: int = 1


@dataclasses.dataclass
class Queue(collections.deque):  # type: ignore[type-arg]
    name: str = "q"


class SlottedBase:
    __slots__ = ("hidden",)


@dataclasses.dataclass
class OnSlots(SlottedBase):
    a: int = 0


@dataclasses.dataclass
class Plain:
    a: int = 0
    b: int = 0


@dataclasses.dataclass
class Broken:
    a: int
    b: int


def _fails(self: Broken) -> int:
    raise ValueError("no b today")


Broken.b = property(_fails, lambda self, v: None)  # type: ignore[assignment]


@dataclasses.dataclass
class NoDefaults:
    a: int


@dataclasses.dataclass
class Late:
    a: int = 0
    later: int = dataclasses.field(init=False)


@dataclasses.dataclass(frozen=True)
class MyFile(File):
    pass


class TestDataclassState:
    def test_builtin_bases_key_their_content(self) -> None:
        assert key(Bag([1])) != key(Bag([2]))
        assert key(Bag([1])) == key(Bag([1]))
        assert key(Table({"a": 1})) != key(Table({"a": 2}))
        assert key(Label("x")) != key(Label("y"))

    def test_other_stateful_bases_raise(self) -> None:
        with pytest.raises(UnhashableInputError, match="deque"):
            key(Queue([1]))

    def test_slots_of_a_base(self) -> None:
        v = OnSlots(1)
        assert key(v) == key(OnSlots(1))
        v.hidden = 5
        with pytest.raises(UnhashableInputError, match="hidden"):
            key(v)

    def test_deleted_field_and_extra_attribute(self) -> None:
        """Names are compared, not counts: del a field, add an attribute."""
        v = Plain(1, 2)
        del v.b
        v.c = 3  # type: ignore[attr-defined]
        with pytest.raises(UnhashableInputError, match="'c'"):
            key(v)
        w = Plain(1, 2)
        del w.b
        assert key(w) == key(Plain(1, 0))  # w.b reads the class default, 0
        n = NoDefaults(1)
        del n.a
        with pytest.raises(UnhashableInputError, match=r"args\[0\]\.a: .*not set"):
            key(n)

    def test_unset_init_false_field(self) -> None:
        with pytest.raises(UnhashableInputError, match=r"\.later.*not set"):
            key(Late(1))
        v = Late(1)
        v.later = 2
        w = Late(1)
        w.later = 3
        assert key(v) == key(v) != key(w)

    def test_field_that_fails_to_read(self) -> None:
        with pytest.raises(UnhashableInputError, match=r"\.b: .*ValueError: no b today"):
            key(Broken(1, 2))

    def test_file_subclass_keys_content(self, tmp_path: pathlib.Path) -> None:
        p = tmp_path / "in.txt"
        p.write_text("one")
        before = key(MyFile(str(p)))
        assert key(MyFile(str(p))) == before
        p.write_text("two")
        assert key(MyFile(str(p))) != before
        assert key(MyFile(str(p))) != key(File(str(p)))

    async def test_file_subclass_async(self, tmp_path: pathlib.Path) -> None:
        p = tmp_path / "in.txt"
        p.write_text("one")
        t = {"func": f, "args": (MyFile(str(p)),), "kwargs": {}}
        assert await make_hash_async(t) == make_hash(t)


# ---- names that do not lead back


class Deco:
    """A class-based decorator: its state decides what the call does."""

    def __init__(self, fn: Any, times: int = 1) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.times = times

    def __call__(self, *a: Any) -> Any:
        return [self.fn(*a) for _ in range(self.times)]


def plain(x: int) -> int:
    return x


@Deco
def decorated(x: int) -> int:
    return x


class Holder:
    @classmethod
    def build(cls) -> Holder:
        return cls()

    def method(self) -> int:
        return 1


@functools.lru_cache
def wrapped_fn(x: int) -> int:
    return x


@dataclasses.dataclass
class DataErr(Exception):
    x: int


@contextlib_contextmanager
def cm_fn() -> Any:
    yield 1


class TestNames:
    def test_class_based_decorator(self) -> None:
        with pytest.raises(UnhashableInputError, match="callable object"):
            key(Deco(plain, 2))
        t = {"func": Deco(plain, 2), "args": (1,), "kwargs": {}}
        with pytest.raises(UnhashableInputError, match="func"):
            make_hash(t)
        # found under its name: that one object, by name
        assert key(decorated) == key(decorated) != key(plain)

    def test_wrappers(self) -> None:
        assert key(staticmethod(plain)) != key(plain)
        assert key(staticmethod(plain)) != key(classmethod(plain))

        def a(x: int) -> int:
            return x

        def b(x: int) -> int:
            return -x

        assert key(functools.lru_cache(a)) != key(functools.lru_cache(b))
        assert key(functools.lru_cache(maxsize=1)(a)) != key(functools.lru_cache(maxsize=2)(a))

    def test_closures_and_lambdas_as_arguments(self) -> None:
        def make(n: Any) -> Any:
            return lambda x: x + n

        assert key(make(1)) != key(make(2))
        assert key(make(1)) == key(make(1))
        assert key(lambda x: x + 1) != key(lambda x: x - 1)
        assert key(lambda x=1: x) != key(lambda x=2: x)
        fs = [lambda i=i: i for i in range(3)]
        assert len({key(g) for g in fs}) == 3
        with pytest.raises(UnhashableInputError, match="closure variable 'n'"):
            key(make(object()))

    def test_found_functions_key_by_name(self) -> None:
        """Methods, class methods and decorated functions found through their
        name key by it, as before (editing their body keeps the key)."""
        from aiomemo._hashing import _M_FUNC, _canon, _Ctx

        for fn, qn in [(plain, "plain"), (Holder.method, "Holder.method"), (wrapped_fn, "wrapped_fn")]:
            assert _canon(fn, _Ctx(), 0) == [_M_FUNC, __name__, qn]
        # reached through what the name leads to: by name + the steps taken, so a
        # decorated function and its original (which may do something else) differ
        for fn, qn in [
            (Holder.build.__func__, "Holder.build"),  # type: ignore[attr-defined]
            (wrapped_fn.__wrapped__, "wrapped_fn"),  # type: ignore[attr-defined]
        ]:
            assert _canon(fn, _Ctx(), 0) == [_M_FUNC, __name__, qn, 1]
        assert key(wrapped_fn) != key(wrapped_fn.__wrapped__)  # type: ignore[attr-defined]

    def test_probe_round_two(self) -> None:
        """More examples of the same classes (a second hostile review)."""
        import zoneinfo

        with pytest.raises(UnhashableInputError, match=r"also a builtins\.Exception"):
            key(DataErr(1))
        assert key(cm_fn) != key(cm_fn.__wrapped__)  # type: ignore[attr-defined]
        g = functools.lru_cache(lambda s: 1)
        h = functools.lru_cache(lambda s: 2)
        assert key(types.MethodType(g, 5)) != key(types.MethodType(h, 5))
        with pytest.raises(UnhashableInputError):
            key(types.MethodType(Deco(plain, 1), 5))
        n1, n2 = float("nan"), float("nan")
        od1 = collections.OrderedDict([(n1, "b"), (n2, "a")])
        od2 = collections.OrderedDict([(n1, "a"), (n2, "b")])
        assert key(od1) != key(od2)
        assert key(np.ma.array([1, 2])) != key(np.ma.array([1, 2], mask=[False, False]))

        class ZI(zoneinfo.ZoneInfo):
            pass

        with pytest.raises(UnhashableInputError, match="time zone"):
            key(dt.datetime(2020, 1, 1, tzinfo=ZI("UTC")))
        ns1: dict[str, Any] = {"__name__": __name__, "X": 1}
        exec("fn = lambda: X", ns1)
        with pytest.raises(UnhashableInputError, match="namespace"):
            key(ns1["fn"])
        c = collections.ChainMap({"a": 1})
        c.extra = 5  # type: ignore[attr-defined]
        with pytest.raises(UnhashableInputError, match="ChainMap"):
            key(c)

        class BadRepr:
            def __repr__(self) -> str:
                raise RuntimeError("no repr")

        with pytest.raises(UnhashableInputError):
            key({BadRepr()})
        mv = memoryview(b"ab")
        mv.release()
        with pytest.raises(UnhashableInputError, match="released"):
            key(mv)
        assert key(lambda: "\udcff") == key(lambda: "\udcff")

    def test_closure_back_references(self) -> None:
        def make(k: int) -> Any:
            g: Any = None

            def fn(n: int, k: int = k) -> Any:
                return k if n == 0 else g(n - 1)

            return fn

        a, b = make(1), make(2)
        a.__closure__[0].cell_contents = b  # type: ignore[index]
        b.__closure__[0].cell_contents = a  # type: ignore[index]
        a2, b2 = make(1), make(2)
        a2.__closure__[0].cell_contents = b2  # type: ignore[index]
        b2.__closure__[0].cell_contents = b2  # type: ignore[index]
        assert a(2) != a2(2)
        assert key(a) != key(a2)

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=3),
        st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=3),
    )
    def test_closures_key_as_what_they_capture(self, a: Any, b: Any) -> None:
        """Property: two closures of one code share a key iff their captures do."""

        def make(v: Any) -> Any:
            return lambda: v

        assert (key(make(a)) == key(make(b))) == (key(a) == key(b))

    def test_function_attributes(self) -> None:
        def make(n: int) -> Any:
            def g() -> Any:
                return g.n  # type: ignore[attr-defined]

            g.n = n  # type: ignore[attr-defined]
            return g

        assert key(make(1)) != key(make(2))
        assert key(make(1)) == key(make(1))

    def test_recursive_closure(self) -> None:
        def outer(n: int) -> Any:
            def rec(k: int) -> int:
                return n if k == 0 else rec(k - 1)

            return rec

        assert key(outer(1)) == key(outer(1)) != key(outer(2))

        def mutual(n: int) -> Any:
            def a(k: int) -> int:
                return n if k == 0 else b(k - 1)

            def b(k: int) -> int:
                return a(k)

            return a

        assert key(mutual(1)) == key(mutual(1)) != key(mutual(2))

    def test_closure_keys_across_processes(self, tmp_path: pathlib.Path) -> None:
        code = textwrap.dedent(
            """
            from aiomemo._hashing import make_hash
            def f(*a): pass
            def make(n):
                return lambda x: x * n
            print(make_hash({"func": f, "args": (make(3), lambda: {1, 2}), "kwargs": {}}))
            """
        )
        script = tmp_path / "k.py"
        script.write_text(code)
        outs = {
            subprocess.run(
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                check=True,
                env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"},
                cwd=ROOT,
            ).stdout
            for seed in (1, 2)
        }
        assert len(outs) == 1

    def test_class_redefined_after_its_first_key(self) -> None:
        mod = types.ModuleType("aiomemo_redefined")
        sys.modules[mod.__name__] = mod
        try:
            src = "import dataclasses\n@dataclasses.dataclass\nclass P:\n    a: int\n"
            exec(src, mod.__dict__)
            old = mod.P(1)
            first = key(old)
            exec(src + "    def twice(self):\n        return 2 * self.a\n", mod.__dict__)
            with pytest.raises(UnhashableInputError, match="cannot be found"):
                key(old)
            assert key(mod.P(1)) == first  # the name leads to the new class now
        finally:
            del sys.modules[mod.__name__]

    def test_local_subclasses_of_a_registered_base(self) -> None:
        class Base:
            def __init__(self, v: int) -> None:
                self.v = v

        aiomemo.id_for_memo.register(Base, lambda obj, output_ref=False: obj.v)

        def make() -> type:
            class Child(Base):
                pass

            return Child

        one, two = make(), make()
        assert one.__qualname__ == two.__qualname__
        with pytest.raises(UnhashableInputError, match="cannot be found"):
            key(one(1))
        assert key(Base(1)) != key(Base(2))  # registered itself: the registration vouches


class MyF64(np.float64):
    pass


# ---- the rest


class TestMore:
    def test_outputs_none_is_given(self) -> None:
        def k(**kw: Any) -> str:
            return make_hash({"func": f, "args": (), "kwargs": kw})

        assert len({k(), k(outputs=None), k(outputs=[]), k(outputs=())}) == 4

    def test_named_utc(self) -> None:
        utc = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        named = dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(0), "UTC"))
        unnamed = dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(0)))
        assert key(utc) == key(unnamed) != key(named)

    def test_partial_attributes(self) -> None:
        p = functools.partial(plain, 1)
        assert key(p) == key(functools.partial(plain, 1))
        p.note = 1  # type: ignore[attr-defined]
        with pytest.raises(UnhashableInputError, match="partial"):
            key(p)

    def test_dtype_titles(self) -> None:
        t1 = np.dtype({"names": ["a"], "formats": ["i4"], "titles": ["x"]})
        t2 = np.dtype({"names": ["a"], "formats": ["i4"], "titles": ["y"]})
        assert key(np.zeros(2, t1)) != key(np.zeros(2, t2))
        assert key(np.zeros(2, t1)) == key(np.zeros(2, t1))
        t3 = np.dtype({"names": ["a"], "formats": ["i4"], "titles": [(1, 2)]})
        with pytest.raises(UnhashableInputError, match="title"):
            key(np.zeros(2, t3))

    def test_numpy_scalar_subclasses_raise(self) -> None:
        m = MyF64(1.0)
        with pytest.raises(UnhashableInputError, match="numpy scalar subclass"):
            key(m)
        assert key(np.float64(1.0)) != key(np.float32(1.0))

    def test_nan_bits(self) -> None:
        assert key(math.nan) != key(-math.nan)
        assert key(np.float64(math.nan)) != key(np.float64(-math.nan))
