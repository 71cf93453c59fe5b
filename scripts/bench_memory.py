#!/usr/bin/env python
"""Memory benchmark children for ``scripts/bench memory`` (one figure per process).

Each figure runs in a fresh process so that its RSS cannot hide another's
garbage; the parent (``bench.py``) runs them side by side with Parsl's
BasicMemoizer and prints the table. Usage (JSON on stdout, last line)::

    python scripts/bench_memory.py produce  DIR N SIZE [LIMIT]  # aiomemo, task_exit
    python scripts/bench_memory.py loadhit  DIR N SIZE [LIMIT]  # aiomemo, load then hit all
    python scripts/bench_memory.py pproduce DIR N SIZE          # Parsl, task_exit
    python scripts/bench_memory.py ploadhit DIR N SIZE          # Parsl, load then hit all
    python scripts/bench_memory.py readhash SIZE                # reading + hashing SIZE bytes

LIMIT is bytes or ``none``; it is passed as ``memory_limit`` only when this
version of aiomemo has that keyword (so the same script measures the code
before and after). No psutil needed (reads /proc, Linux only).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size now, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def task_fn(i: int) -> None:
    """The benchmark tasks' function (never called: results are given)."""


def value_of(i: int, size: int) -> bytes:
    """Result ``i``: ``size`` bytes that differ from every other result's."""
    return struct.pack("<Q", i) * (size // 8)


def _task(i: int) -> dict[str, Any]:
    return {
        "func": task_fn,
        "args": (i,),
        "kwargs": {},
        "ignore_for_cache": [],
        "memoize": True,
        "id": i,
    }


def _memo_kw(limit: str | None) -> dict[str, Any]:
    import aiomemo

    if limit is None or "memory_limit" not in inspect.signature(aiomemo.Memoizer).parameters:
        return {}
    return {"memory_limit": None if limit == "none" else int(limit)}


def _extra_stats(memo: Any) -> dict[str, Any]:
    s = memo.stats()
    return {f: getattr(s, f) for f in ("bytes_held", "bytes_on_disk", "disk_reads") if hasattr(s, f)}


async def produce(root: Path, n: int, size: int, limit: str | None) -> dict[str, Any]:
    """A task_exit run producing ``n`` results of ``size`` bytes; the caller drops each."""
    import aiomemo

    await asyncio.to_thread(lambda: None)  # the worker pool exists before the baseline
    gc.collect()
    base = rss()
    peak = 0
    t0 = time.perf_counter()
    async with aiomemo.Memoizer(
        run_dir=root / "run", config_run_dir=root, checkpoint_mode="task_exit", **_memo_kw(limit)
    ) as memo:
        for i in range(n):
            task = _task(i)
            assert await memo.check_memo(task) is None
            await memo.update_memo_result(task, value_of(i, size))
            del task
            peak = max(peak, rss() - base)
        gc.collect()
        end = rss() - base
        extra = _extra_stats(memo)
        checkpointed = memo.stats().checkpointed
    return {
        "seconds": time.perf_counter() - t0,
        "rss_end": end,
        "rss_peak": peak,
        "checkpointed": checkpointed,
        "supports_limit": bool(_memo_kw(limit)),
        **extra,
    }


async def loadhit(root: Path, n: int, size: int, limit: str | None) -> dict[str, Any]:
    """Load ``root``'s checkpoints, then hit all ``n`` tasks (each value dropped)."""
    import aiomemo

    await asyncio.to_thread(lambda: None)
    # The segments into the page cache first: the run of Parsl's side in
    # between may have pushed them out, and the hits should be timed against
    # the reference (which reads hot pages) in the same state, not the disk's.
    _warm(root / "run" / "checkpoint")
    gc.collect()
    base = rss()
    memo = aiomemo.Memoizer(
        checkpoint_files=[str(root / "run" / "checkpoint")],
        run_dir=root / "hit-run",
        config_run_dir=root / "hit-root",
        **_memo_kw(limit),
    )
    t0 = time.perf_counter()
    await memo.start()
    load_s = time.perf_counter() - t0
    gc.collect()
    load_rss = rss() - base
    entries = memo.stats().entries
    wrong = 0
    peak = load_rss
    times: list[float] = []
    for i in range(n):
        task = _task(i)
        t0 = time.perf_counter()
        fut = await memo.check_memo(task)
        value = None if fut is None else fut.result()
        times.append(time.perf_counter() - t0)
        if value != value_of(i, size):
            wrong += 1
        del fut, value
        peak = max(peak, rss() - base)
    gc.collect()
    end = rss() - base
    extra = _extra_stats(memo)
    hits = memo.stats().hits
    await memo.close()
    times.sort()
    ref = readhash(size)["seconds"]  # the reference, measured in the same process, right after
    return {
        "readhash_median_s": ref,
        "readhash_each_median_s": readhash_each(root),
        "readhash_held_median_s": (
            readhash_held(root, int(limit)) if limit not in (None, "none") else None
        ),
        "load_seconds": load_s,
        "load_rss": load_rss,
        "entries": entries,
        "hits": hits,
        "wrong": wrong,
        "hit_rss_peak": peak,
        "hit_rss_end": end,
        "hit_median_s": times[len(times) // 2],
        "hit_mean_s": sum(times) / len(times),
        "supports_limit": bool(_memo_kw(limit)),
        **extra,
    }


def _parsl_task(i: int) -> dict[str, Any]:
    from concurrent.futures import Future

    t = _task(i)
    t["app_fu"] = Future()
    return t


def pproduce(root: Path, n: int, size: int) -> dict[str, Any]:
    """Parsl's BasicMemoizer, task_exit, ``n`` results of ``size`` bytes."""
    from parsl.dataflow.memoization import BasicMemoizer

    gc.collect()
    base = rss()
    peak = 0
    t0 = time.perf_counter()
    pm = BasicMemoizer(checkpoint_mode="task_exit")
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    pm.start(run_dir=str(run), config_run_dir=str(root))
    for i in range(n):
        task = _parsl_task(i)
        assert pm.check_memo(task) is None  # type: ignore[arg-type]
        v = value_of(i, size)
        task["app_fu"].set_result(v)
        pm.update_memo_result(task, v)  # type: ignore[arg-type]
        del task, v
        peak = max(peak, rss() - base)
    gc.collect()
    end = rss() - base
    pm.close()
    return {"seconds": time.perf_counter() - t0, "rss_end": end, "rss_peak": peak}


def ploadhit(root: Path, n: int, size: int) -> dict[str, Any]:
    """Parsl: load ``root``'s tasks.pkl, then hit all ``n`` tasks."""
    from parsl.dataflow.memoization import BasicMemoizer

    gc.collect()
    base = rss()
    pm = BasicMemoizer(checkpoint_files=[str(root / "run" / "checkpoint")])
    hit_run = root / "hit-run"
    hit_run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pm.start(run_dir=str(hit_run), config_run_dir=str(root / "hit-root"))
    load_s = time.perf_counter() - t0
    gc.collect()
    load_rss = rss() - base
    wrong = 0
    peak = load_rss
    times: list[float] = []
    for i in range(n):
        task = _parsl_task(i)
        t0 = time.perf_counter()
        fut = pm.check_memo(task)  # type: ignore[arg-type]
        value = None if fut is None else fut.result()
        times.append(time.perf_counter() - t0)
        if value != value_of(i, size):
            wrong += 1
        del fut, value
        peak = max(peak, rss() - base)
    gc.collect()
    end = rss() - base
    pm.close()
    times.sort()
    return {
        "load_seconds": load_s,
        "load_rss": load_rss,
        "entries": len(pm.memo_lookup_table),
        "wrong": wrong,
        "hit_rss_peak": peak,
        "hit_rss_end": end,
        "hit_median_s": times[len(times) // 2],
        "hit_mean_s": sum(times) / len(times),
    }


def _warm(directory: Path) -> None:
    """Read every file under ``directory`` once (into the page cache; nothing is kept)."""
    buf = bytearray(16 << 20)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def readhash(size: int, rounds: int = 20) -> dict[str, Any]:
    """Median time to read ``size`` bytes from a (cached) file into a fresh buffer and blake3 them."""
    from blake3 import blake3

    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(size))
        f.flush()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            with open(f.name, "rb", buffering=0) as g:
                data = g.read()
            blake3(data).digest(16)
            times.append(time.perf_counter() - t0)
            del data
    times.sort()
    return {"seconds": times[len(times) // 2], "best": times[0]}


def _value_refs(root: Path) -> list[Any]:
    """Where ``root``'s checkpoints keep their large values (empty: none, or no format 2)."""
    try:
        from aiomemo._checkpoint import load_paths
        from aiomemo._records import ValueRef
    except ImportError:
        return []
    table = load_paths([str(root / "run" / "checkpoint")]).table
    return [v for v in table.values() if isinstance(v, ValueRef)]


def readhash_each(root: Path) -> float | None:
    """Median time to read + blake3 each large value of ``root``'s checkpoints once, as hits read them.

    Unlike :func:`readhash` (one file read again and again, so it stays in the
    CPU caches) every read here is of a different value: what a run of hits
    on distinct results has to do at the least. None: no format-2 values.
    """
    from blake3 import blake3

    refs = _value_refs(root)
    if not refs:
        return None
    times = []
    for ref in refs:
        t0 = time.perf_counter()
        fd = os.open(ref.path, os.O_RDONLY)
        data = os.pread(fd, ref.length, ref.offset)
        os.close(fd)
        blake3(data).digest(16)
        times.append(time.perf_counter() - t0)
        del data
    times.sort()
    return times[len(times) // 2]


def readhash_held(root: Path, limit: int) -> float | None:
    """:func:`readhash_each`, but the values read stay alive as ``memory_limit=limit`` holds them.

    The values that fit in ``limit`` are kept (the oldest let go of before
    the next read, as a hit does), so each read writes into memory that was
    last used many values ago, not into the block the previous read just
    freed (which :func:`readhash_each` gets, still in the CPU caches). For
    scale only: the target's reference stays :func:`readhash_each`.
    """
    from blake3 import blake3

    refs = _value_refs(root)
    if not refs:
        return None
    keep = max(1, limit // max(r.length for r in refs))
    held: list[bytes] = []
    times = []
    for ref in refs:
        t0 = time.perf_counter()
        if len(held) >= keep:
            del held[0]
        fd = os.open(ref.path, os.O_RDONLY)
        data = os.pread(fd, ref.length, ref.offset)
        os.close(fd)
        blake3(data).digest(16)
        times.append(time.perf_counter() - t0)
        held.append(data)
        del data
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    """Run one figure and print its JSON."""
    what, *rest = sys.argv[1:]
    out: dict[str, Any]
    if what == "readhash":
        out = readhash(int(rest[0]))
    else:
        root, n, size = Path(rest[0]), int(rest[1]), int(rest[2])
        limit = rest[3] if len(rest) > 3 else None
        if what == "produce":
            out = asyncio.run(produce(root, n, size, limit))
        elif what == "loadhit":
            out = asyncio.run(loadhit(root, n, size, limit))
        elif what == "pproduce":
            out = pproduce(root, n, size)
        elif what == "ploadhit":
            out = ploadhit(root, n, size)
        else:
            raise SystemExit(f"unknown figure {what!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
