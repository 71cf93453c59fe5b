"""Property: two values share a key exactly when no function could tell them apart.

Hypothesis draws pairs of nested values (containers of every kind, large
out-of-band buffers, numpy arrays incl. structured and masked, enums and
flags, callables, dates with time zones) and checks ``key(a) == key(b)``
against a strict, independent notion of sameness: the same types all the
way down, equal values, and the same order wherever order is observable.
"""

from __future__ import annotations

import collections
import copy
import datetime as dt
import decimal
import enum
import functools
import math
import random
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aiomemo._hashing import make_hash

BIG = 4096  # the inline limit: from here on, buffers go out of band


def f(*args: Any, **kwargs: Any) -> None:
    """A task function."""


def g(*args: Any, **kwargs: Any) -> None:
    """Another function, drawn as a value."""


class Perm(enum.IntFlag):
    """Flags: canonical members and pseudo-members."""

    R = 4
    W = 2
    X = 1


class Color(enum.Enum):
    """A plain enum."""

    RED = 1
    BLUE = 2


def key(v: Any) -> str:
    return make_hash({"func": f, "args": (v,), "kwargs": {}})


# --------------------------------------------------------------------------- values
DTYPES = [
    np.dtype("<i8"),
    np.dtype(">i8"),
    np.dtype("<f4"),
    np.dtype("M8[s]"),
    np.dtype("m8[ms]"),
    np.dtype([("a", "<i4"), ("b", "<f8")]),
    np.dtype([("x", "<i4"), ("y", "<f8")]),
    np.dtype([("a", "u1"), ("b", "<i4")], align=True),
    np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [4, 0]}),
    np.dtype([("a", "<i4", (2,))]),
]
ZONES = [
    None,
    dt.UTC,
    dt.timezone(dt.timedelta(hours=1)),
    dt.timezone(dt.timedelta(hours=1), "CET"),
]


def make_array(di: int, n: int, fill: int, masked: bool) -> Any:
    d = DTYPES[di]
    if d.fields is None:
        arr = (np.arange(n) % 3 + fill).astype(d)
    else:
        arr = np.zeros(n, dtype=d)
        arr[d.names[0]] = fill
    if masked:
        return np.ma.masked_array(arr, mask=np.arange(n) % 2 == 0)
    return arr


arrays = st.builds(
    make_array,
    st.integers(0, len(DTYPES) - 1),
    st.sampled_from([0, 1, 3, 600]),  # 600 items: several KiB, out of band
    st.integers(0, 1),
    st.booleans(),
)
big_buffers = st.builds(
    lambda c, extra, kind: kind(bytes([c]) * (BIG + extra)),
    st.integers(0, 2),
    st.sampled_from([0, 1, 1000]),
    st.sampled_from([bytes, bytearray]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(min_value=2**63, max_value=2**63 + 2),
    st.sampled_from([0.0, -0.0, 1.0, math.nan, math.inf]),
    st.sampled_from(["", "a", "b", "ab"]),
    st.sampled_from([b"", b"a", b"ab"]),
    st.sampled_from([decimal.Decimal("1"), decimal.Decimal("1.0")]),
    st.sampled_from([Perm(0), Perm.R, Perm.W, Perm.R | Perm.W, Perm(8), Perm(6)]),
    st.sampled_from([Color.RED, Color.BLUE]),
    st.sampled_from([dt.date(2024, 1, 1), dt.timedelta(0), dt.timedelta(1)]),
    st.builds(
        lambda h, z: dt.datetime(2024, 1, 1, h, tzinfo=ZONES[z]),
        st.integers(0, 1),
        st.integers(0, len(ZONES) - 1),
    ),
    st.sampled_from([f, g, len, "ab".upper, "ba".upper]),
    st.builds(functools.partial, st.sampled_from([f, g]), st.integers(0, 1)),
    big_buffers.filter(lambda b: type(b) is bytes),
)
hashables = st.recursive(
    scalars,
    lambda c: st.tuples(c) | st.tuples(c, c) | st.frozensets(c, max_size=3),
    max_leaves=4,
)


def _ordered(pairs: list[tuple[Any, Any]]) -> collections.OrderedDict[Any, Any]:
    return collections.OrderedDict(pairs)


values = st.recursive(
    st.one_of(scalars, arrays, big_buffers),
    lambda c: (
        st.lists(c, max_size=3)
        | st.lists(c, max_size=3).map(tuple)
        | st.lists(c, max_size=3).map(collections.deque)
        | st.dictionaries(st.sampled_from(["a", "b", "c"]), c, max_size=3)
        | st.dictionaries(hashables, c, max_size=3)
        | st.lists(st.tuples(hashables, c), max_size=3).map(_ordered)
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
        | st.builds(
            lambda d: collections.defaultdict(list, d), st.dictionaries(hashables, c, max_size=2)
        )
        | st.builds(functools.partial, st.sampled_from([f, g]), c)
    ),
    max_leaves=8,
)


# --------------------------------------------------------------------------- sameness
def _match_unordered(xs: list[Any], ys: list[Any], eq: Any) -> bool:
    if len(xs) != len(ys):
        return False
    rest = list(ys)
    for x in xs:
        for i, y in enumerate(rest):
            if eq(x, y):
                del rest[i]
                break
        else:
            return False
    return True


def same(a: Any, b: Any) -> bool:
    """No function (short of ``is``/``id``) could tell ``a`` and ``b`` apart."""
    if type(a) is not type(b):
        return False
    t = type(a)
    if t is float:
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if t is decimal.Decimal:
        return str(a) == str(b)
    if t in (list, tuple, collections.deque):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if t is collections.OrderedDict:
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if t is dict or t is collections.defaultdict:
        if t is collections.defaultdict and a.default_factory is not b.default_factory:
            return False
        return _match_unordered(
            list(a.items()), list(b.items()), lambda p, q: same(p[0], q[0]) and same(p[1], q[1])
        )
    if t is set or t is frozenset:
        return _match_unordered(list(a), list(b), same)
    if t is functools.partial:
        return same(a.func, b.func) and same(a.args, b.args) and same(a.keywords, b.keywords)
    if t is np.ma.MaskedArray:
        return (
            same(a.data, b.data)
            and same(np.ma.getmaskarray(a), np.ma.getmaskarray(b))
            and same(a.fill_value, b.fill_value)
            and a.hardmask == b.hardmask
        )
    if t is np.ndarray:
        if a.shape != b.shape or a.dtype != b.dtype or repr(a.dtype) != repr(b.dtype):
            return False
        if a.dtype.fields is None:
            return a.tobytes() == b.tobytes()
        # padding bytes are not data: numpy's own copies leave them undefined
        return all(a[n].tobytes() == b[n].tobytes() for n in a.dtype.names)
    if isinstance(a, np.generic):
        if a.dtype != b.dtype or repr(a.dtype) != repr(b.dtype):
            return False
        if a.dtype.fields is None:
            return a.tobytes() == b.tobytes()
        return all(a[n].tobytes() == b[n].tobytes() for n in a.dtype.names)
    if t is dt.datetime:
        return (
            a == b
            and a.fold == b.fold
            and type(a.tzinfo) is type(b.tzinfo)
            and (a.tzinfo is None or a.tzinfo.tzname(a) == b.tzinfo.tzname(b))
        )
    if t is type("".upper):  # a bound C method
        return a.__name__ == b.__name__ and same(a.__self__, b.__self__)
    if isinstance(a, enum.Enum):
        return a is b
    if callable(a):
        return a is b
    return bool(a == b)


def shuffled_copy(v: Any, rng: random.Random) -> Any:
    """A deep copy with every order-free container rebuilt in another order."""
    t = type(v)
    if t is list:
        return [shuffled_copy(x, rng) for x in v]
    if t is tuple:
        return tuple(shuffled_copy(x, rng) for x in v)
    if t is collections.deque:
        return collections.deque(shuffled_copy(x, rng) for x in v)
    if t is collections.OrderedDict:
        return collections.OrderedDict((k, shuffled_copy(x, rng)) for k, x in v.items())
    if t is dict or t is collections.defaultdict:
        items = list(v.items())
        rng.shuffle(items)
        d = {k: shuffled_copy(x, rng) for k, x in items}
        return collections.defaultdict(v.default_factory, d) if t is collections.defaultdict else d
    if t is set or t is frozenset:
        items = list(v)
        rng.shuffle(items)
        return t(items)
    if t is functools.partial:
        return functools.partial(v.func, *shuffled_copy(v.args, rng), **v.keywords)
    return copy.deepcopy(v)


class TestKeyProperty:
    """key(a) == key(b) exactly when a and b are indistinguishable."""

    @given(values, values)
    @settings(max_examples=600, deadline=None)
    def test_independent_pairs(self, a: Any, b: Any) -> None:
        """Two drawn values share a key only when they are the same value."""
        assert (key(a) == key(b)) == same(a, b), (a, b)

    @given(values, st.randoms(use_true_random=False))
    @settings(max_examples=300, deadline=None)
    def test_copies_key_alike(self, a: Any, rng: random.Random) -> None:
        """A deep copy with dicts and sets in another order has the same key."""
        b = shuffled_copy(a, rng)
        assert same(a, b)
        assert key(a) == key(b)

    @given(values, values, values)
    @settings(max_examples=200, deadline=None)
    def test_pairs_inside_sorted_containers(self, a: Any, b: Any, c: Any) -> None:
        """Values under the keys of a dict keep their pairing whatever the insertion order."""
        d1 = {1: a, 0: b, 2: c}
        d2 = {0: b, 2: c, 1: a}
        swapped = {1: b, 0: a, 2: c}
        assert key(d1) == key(d2)
        assert (key(d1) == key(swapped)) == same(a, b)
