#!/usr/bin/env python
"""Checkpoint log benchmark: load time and memory for N records, write throughput.

Writes N records (32-byte keys, small encoded-int values) with
``SegmentWriter``, then loads them with ``load_paths`` in a fresh child
process (so the writer's freed memory cannot hide the table's cost) and
prints one JSON object:

* ``load_s``: best of ``--repeat`` loads (each in its own process), seconds
  (``load_cpu_s``: its process CPU time, steadier on a shared machine);
* ``final_bytes_per_entry``: RSS after the load minus RSS before, per entry;
* ``peak_bytes_per_entry``: peak RSS during the load minus RSS before
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; sampled
  ``/proc/self/statm`` when that is not allowed);
* ``write``: records/s writing N records in batches of ``--load-batch``
  without fsync (one fsync at the end);
* ``fsync_write``: batches/s and records/s of ``write_batch(fsync=True)``
  with batches of ``--fsync-batch`` records (64) for ``--fsync-seconds``.

Usage: ``python scripts/bench_load.py [--records 1000000] [--load-batch 1024] [--repeat 3]``
(JSON on stdout only, for the main benchmark to read).
No psutil needed (reads /proc, Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from aiomemo._checkpoint import SegmentWriter, load_paths
from aiomemo.stores import Record

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size now, bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak() -> int:
    """VmHWM (peak RSS since the last reset), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_records(n: int, start: int = 0) -> list[Record]:
    """n records as a Memoizer would write them for small int results."""
    now = time.time()
    return [
        Record(
            key=(i).to_bytes(8, "little") * 4,  # 32 bytes, unique, cheap to make
            value=msgpack.packb(i),
            func="bench.tasks.square",
            time=now,
        )
        for i in range(start, start + n)
    ]


async def write_records(directory: Path, n: int, batch: int) -> dict[str, Any]:
    """Write n records in batches; one fsync at the end."""
    w = await SegmentWriter.create(directory)
    t_total = 0.0
    written = 0
    chunk = 100_000  # build records a chunk at a time to keep the writer's memory low
    for lo in range(0, n, chunk):
        recs = make_records(min(chunk, n - lo), lo)
        t0 = time.perf_counter()
        for i in range(0, len(recs), batch):
            written += await w.write_batch(recs[i : i + batch], fsync=False)
        t_total += time.perf_counter() - t0
    t0 = time.perf_counter()
    await w.sync()
    await w.close()
    t_total += time.perf_counter() - t0
    return {
        "records": n,
        "batch": batch,
        "seconds": round(t_total, 3),
        "records_per_s": round(n / t_total),
        "file_bytes": written + 16,
        "bytes_per_record": round(written / n, 1),
    }


async def fsync_throughput(directory: Path, batch: int, seconds: float) -> dict[str, Any]:
    """write_batch(fsync=True) of `batch` records, back to back, for `seconds`."""
    w = await SegmentWriter.create(directory)
    recs = make_records(batch * 64)
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    i = 0
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        lo = (i % 64) * batch
        t1 = time.perf_counter()
        await w.write_batch(recs[lo : lo + batch], fsync=True)
        lat.append(time.perf_counter() - t1)
        i += 1
    elapsed = time.perf_counter() - t0
    await w.close()
    lat.sort()
    return {
        "batch": batch,
        "batches": i,
        "batches_per_s": round(i / elapsed, 1),
        "records_per_s": round(i * batch / elapsed),
        "median_ms": round(lat[len(lat) // 2] * 1e3, 3),
        "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 3),
    }


def child_load(path: str) -> None:
    """Run in a fresh process: load `path`, print time and memory as JSON."""
    gc.collect()
    base = rss()
    hwm_ok = reset_peak()
    samples = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            samples.append(rss())

    sampler = None
    if not hwm_ok:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    report = load_paths([path])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    if sampler is not None:
        sampler.join()
    final = rss()
    top = peak() if hwm_ok else max(*samples, final)
    n = len(report.table)
    print(
        json.dumps(
            {
                "load_s": round(dt, 3),
                "load_cpu_s": round(cpu, 3),
                "entries": n,
                "records": report.records,
                "skipped": report.skipped,
                "errors": len(report.errors),
                "final_bytes_per_entry": round((final - base) / n, 1) if n else None,
                "peak_bytes_per_entry": round((top - base) / n, 1) if n else None,
                "peak_method": "VmHWM" if hwm_ok else "statm sampling",
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--load-batch", type=int, default=1024, help="records per batch when writing")
    ap.add_argument("--fsync-batch", type=int, default=64)
    ap.add_argument("--fsync-seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3, help="loads to run (best is reported)")
    ap.add_argument("--dir", help="where to write (default: a temporary directory)")
    ap.add_argument("--child-load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_load:
        child_load(args.child_load)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpt = Path(tmp) / "run" / "checkpoint"
        result: dict[str, Any] = {"records": args.records}
        result["write"] = asyncio.run(write_records(ckpt, args.records, args.load_batch))
        loads = []
        for _ in range(args.repeat):
            out = subprocess.run(
                [sys.executable, __file__, "--child-load", str(ckpt)],
                check=True,
                capture_output=True,
                text=True,
            )
            loads.append(json.loads(out.stdout))
        best = min(loads, key=lambda r: r["load_s"])
        result["load"] = best
        result["load_s_all"] = [r["load_s"] for r in loads]
        result["load_cpu_s_all"] = [r["load_cpu_s"] for r in loads]
        result["fsync_write"] = asyncio.run(
            fsync_throughput(Path(tmp) / "fsync", args.fsync_batch, args.fsync_seconds)
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
