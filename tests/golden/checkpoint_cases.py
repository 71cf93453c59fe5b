"""A checkpoint written by one Python, loaded by another.

``python checkpoint_cases.py write RUN_DIR`` records every case's result in
``RUN_DIR/checkpoint/``; ``python checkpoint_cases.py check RUN_DIR`` loads
it, looks every case up (by its key, which must be the same) and compares
the result, exact types included. Prints JSON: ``{"hits": n, "bad": [...]}``.

Self-contained on purpose: it runs in fresh interpreters that have
aiomemo's core dependencies and numpy, nothing from the tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import math
import os
import pathlib
import sys
import uuid
import zoneinfo
from typing import Any

import numpy as np

from aiomemo import Memoizer


def produce(name: str) -> None:
    """Stand-in task function with a fixed identity."""


produce.__module__ = "golden"
produce.__qualname__ = "produce"


def results() -> dict[str, Any]:
    return {
        "scalars": [None, True, 0, -1, 2**70, 1.5, -0.0, math.inf, "x", b"y"],
        "nan": float("nan"),
        "containers": {"t": (1, (2,)), "s": {1, 2}, "f": frozenset({"a"}), 3: [4.0]},
        "numbers": [complex(1, -2), decimal.Decimal("1.10"), -(2**100)],
        "times": [
            dt.date(2024, 1, 2),
            dt.time(3, 4, 5, 6),
            dt.datetime(2024, 1, 2, 3, tzinfo=dt.timezone(dt.timedelta(hours=2), "EET")),
            dt.datetime(2024, 7, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
            dt.timedelta(days=-1, microseconds=5),
        ],
        "misc": [uuid.UUID(int=7), pathlib.PurePosixPath("/a/b"), bytearray(b"ab")],
        "big": bytes(range(256)) * 40,
        "numpy": [
            np.arange(12, dtype=">i4").reshape(3, 4),
            np.linspace(0, 1, 2000),
            np.float32(2.5),
            np.array(["ab", "c"]),
        ],
        "surrogate": os.fsdecode(b"caf\xe9"),
    }


def task(name: str) -> dict[str, Any]:
    return {"func": produce, "args": (name,), "kwargs": {"v": 1}}


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, dt.datetime | dt.time):
        return a == b and repr(a.tzinfo) == repr(b.tzinfo)
    return bool(a == b) and repr(a) == repr(b)


async def write(run_dir: str) -> dict[str, Any]:
    async with Memoizer(checkpoint_mode="task_exit", run_dir=run_dir) as memo:
        for name, value in results().items():
            t = task(name)
            assert await memo.check_memo(t) is None  # type: ignore[arg-type]
            await memo.update_memo_result(t, value)  # type: ignore[arg-type]
    return {"written": len(results())}


async def check(run_dir: str) -> dict[str, Any]:
    bad: list[str] = []
    hits = 0
    ckpt = os.path.join(run_dir, "checkpoint")
    async with Memoizer(checkpoint_files=[ckpt]) as memo:
        for name, want in results().items():
            fut = await memo.check_memo(task(name))  # type: ignore[arg-type]
            if fut is None:
                bad.append(f"{name}: miss")
                continue
            hits += 1
            got = fut.result()
            if not same(got, want):
                bad.append(f"{name}: {got!r} != {want!r}")
    return {"hits": hits, "bad": bad}


if __name__ == "__main__":
    mode, where = sys.argv[1], sys.argv[2]
    out = asyncio.run(write(where) if mode == "write" else check(where))
    print(json.dumps(out))
