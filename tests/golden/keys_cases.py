"""Golden key vectors: fixed inputs, run by every supported Python.

Run as a script (``python keys_cases.py``) it prints ``{name: key}`` as JSON;
``tests/golden/keys.json`` holds the expected keys. The ``v1_*`` cases keyed
the same before the soundness fixes of the key format (they were not
collisions) and must never change; the ``fix_*`` cases pin the rules added
for inputs whose old key was a collision.

Self-contained on purpose: it is copied into fresh interpreters (3.12, 3.13)
that have aiomemo's core dependencies and numpy, nothing from the tests.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import fractions
import functools
import json
import os
import pathlib
import sys
import types
import uuid
import warnings
import zoneinfo
from typing import Any

import numpy as np

from aiomemo import File, make_hash

#: the classes below live in a module of their own, found by its name
golden_types = types.ModuleType("golden_types")
sys.modules["golden_types"] = golden_types

_CLASSES = """
import dataclasses, enum
from typing import NamedTuple

@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: object

class Color(enum.Enum):
    RED = 1
    BLUE = "b"

class Perm(enum.IntFlag):
    R = 4
    W = 2
    X = 1

class Pair(NamedTuple):
    a: int
    b: object

class Tag(str):
    pass
"""
exec(_CLASSES, golden_types.__dict__)  # fixed source: defines the module


def golden_func(*args: Any, **kwargs: Any) -> None:
    """Stand-in task function with a fixed identity."""


golden_func.__module__ = "golden"
golden_func.__qualname__ = "golden_func"
# found under its name (as an argument, a function not found so is keyed by its code)
_golden = sys.modules.setdefault("golden", types.ModuleType("golden"))
_golden.golden_func = golden_func  # type: ignore[attr-defined]


def _task(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"func": golden_func, "args": args, "kwargs": kwargs}


def cases(data_dir: str) -> dict[str, dict[str, Any]]:
    """Every golden case as a task; Files are written under ``data_dir``."""
    g: Any = golden_types
    big_a = bytes(range(256)) * 20  # 5,120 bytes: out of band
    big_b = b"\x07" * 6000
    fa = os.path.join(data_dir, "a.bin")
    fb = os.path.join(data_dir, "b.bin")
    with open(fa, "wb") as fh:
        fh.write(b"content of a" * 100)
    with open(fb, "wb") as fh:
        fh.write(b"content of b")
    st = np.dtype([("a", "<i4"), ("b", ">f8", (2,))])
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    surrogate = os.fsdecode(b"caf\xe9")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        matrix = np.matrix([[1, 2]])
    return {
        # ---- keyed the same by format version 1 before the fixes: never change
        "v1_empty": _task(),
        "v1_scalars": _task(1, 2.5, "x", None, True, b"b", 2**100, -(2**70), float("nan")),
        "v1_small_task": _task(1, 2.5, "x", a=[1, 2, 3], b={"k": 1, "j": "v"}),
        "v1_containers": _task((1, 2), [1, 2], {3, 1}, frozenset({"a"}), {1: "x", "y": 2}),
        "v1_numbers": _task(-0.0, complex(1, -1), decimal.Decimal("1.10")),
        "v1_times": _task(
            dt.date(2024, 1, 2),
            dt.datetime(2024, 1, 2, 3, 4, 5, 6),
            dt.time(1, 2),
            dt.timedelta(days=1, seconds=2),
            dt.datetime(2024, 1, 2, tzinfo=dt.UTC),
            dt.datetime(2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            dt.datetime(2024, 7, 2, tzinfo=paris),
        ),
        "v1_misc": _task(uuid.UUID(int=12345), pathlib.PurePosixPath("/a/b"), bytearray(b"xy")),
        "v1_large_bytes": _task(big_a, k=bytearray(5000), m=memoryview(big_b)),
        "v1_sorted_big": _task({0: big_a, 1: big_b}, {3: [big_b]}),
        "v1_numpy": _task(
            np.arange(12, dtype=np.int32).reshape(3, 4),
            np.arange(3000, dtype=">f8"),
            np.float32(1.5),
            np.int64(-3),
            np.array("abc"),
            np.zeros(3, dtype=st),
            np.arange(4).astype("M8[D]"),
        ),
        "v1_user_types": _task(
            g.Point(1, (2, 3)),
            g.Color.RED,
            g.Color.BLUE,
            g.Perm.R,
            g.Pair(1, [2]),
            g.Tag("t"),
            collections.OrderedDict(a=1, b=2),
            collections.Counter("abca"),
        ),
        "v1_callables": _task(golden_func, len, int, functools.partial(golden_func, 1, k=2)),
        "v1_file": _task(File(fa)),
        "v1_outputs": _task(1, outputs=[File("/tmp/out.txt")]),
        "v1_ignore": {**_task(1, log=2), "ignore_for_cache": ["log"], "version": "2"},
        # ---- rules of the fixes (old keys were collisions)
        "fix_dict_big_unsorted": _task({1: big_a, 0: big_b}),
        "fix_set_big": _task({big_a, big_b}, frozenset({(big_a,), (big_b,)})),
        "fix_files_in_dict": _task({1: File(fa), 0: File(fb)}, {File(fa), File(fb)}),
        "fix_partial_func": {
            "func": functools.partial(pow, 2),
            "args": (3,),
            "kwargs": {},
        },
        "fix_bound_builtins": _task("abc".upper, {1: 2}.get, (3).__add__),
        "fix_numpy": _task(
            np.zeros(1, dtype=st)[0],
            np.ma.masked_array([1, 2, 3], mask=[0, 1, 0]),
            matrix,
            np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
            np.zeros(2, dtype=np.dtype([("a", "u1"), ("b", "i4")], align=True)),
            np.arange(1000).astype("m8[s]"),
        ),
        "fix_flags": _task(g.Perm.R | g.Perm.W, g.Perm(0), g.Perm(8)),
        "fix_types": _task(
            collections.OrderedDict(b=1, a=2),
            collections.defaultdict(list, {"a": [1]}),
            dt.datetime(2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=1), "CET")),
            collections.deque([1, 2], maxlen=5),
            collections.ChainMap({"a": 1}, {"b": 2}),
            range(0, 10, 2),
            slice(1, None, 2),
            fractions.Fraction(1, 3),
            types.SimpleNamespace(a=1),
        ),
        "fix_surrogate": _task(
            surrogate, {surrogate: [surrogate]}, pathlib.PurePosixPath(surrogate)
        ),
    }


def keys(data_dir: str) -> dict[str, str]:
    return {name: make_hash(t) for name, t in cases(data_dir).items()}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(keys(d), indent=1, sort_keys=True))
