#!/usr/bin/env python3
"""Benchmark RedisStore over loopback; prints JSON.

Starts its own ``redis-server`` on a free 127.0.0.1 port in a temp dir (no
persistence), then measures:

* hit latency: ``RedisStore.get`` (GET + checksum check + decode) vs a bare
  redis-py ``GET`` of the same Redis key, sequential round trips; the ratio is
  the store's overhead;
* ``put_many`` throughput in records/s (pipelined batches), and unpipelined
  (batch_size=1) for comparison; ``get_many`` (MGET) throughput;
* ``wait_for`` wake-up latency after a put from another connection;
* a 4-process shared workflow (``Memoizer`` + ``RedisStore``, ``memo.cached``
  tasks with overlapping keys): executions vs tasks submitted.

Usage: ``python scripts/bench_redis.py [--quick]`` (``REDIS_SERVER`` may name
the binary).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import redis.asyncio as aioredis  # noqa: E402

from aiomemo.stores import Record  # noqa: E402
from aiomemo.stores._redis import RedisStore  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server on a free loopback port; return (process, url)."""
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        sys.exit("redis-server not found (apt-get install redis-server)")
    port = _free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", tmp]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("redis-server did not start")


def _rec(i: int, size: int) -> Record:
    return Record(key=i.to_bytes(8, "big") * 4, value=os.urandom(size), func="bench.f", time=1e9)


async def hit_latency(url: str, size: int, n: int) -> dict[str, float]:
    """Median/mean microseconds of RedisStore.get vs bare GET (same key, same value)."""
    async with RedisStore(url, namespace=f"bench-hit-{size}") as store:
        r = _rec(1, size)
        await store.put_many([r])
        bare = aioredis.Redis.from_url(url)
        vkey = store.value_key(r.key)
        try:
            for _ in range(200):  # warm both connections
                await bare.get(vkey)
                await store.get(r.key)
            t_store: list[float] = []
            t_bare: list[float] = []
            for _ in range(n):  # interleaved, so drift hits both alike
                t0 = time.perf_counter()
                await bare.get(vkey)
                t1 = time.perf_counter()
                await store.get(r.key)
                t2 = time.perf_counter()
                t_bare.append(t1 - t0)
                t_store.append(t2 - t1)
        finally:
            await bare.aclose()
    med_s, med_b = statistics.median(t_store), statistics.median(t_bare)
    return {
        f"hit_{size}B_store_median_us": med_s * 1e6,
        f"hit_{size}B_bare_median_us": med_b * 1e6,
        f"hit_{size}B_ratio_median": med_s / med_b,
        f"hit_{size}B_ratio_mean": statistics.fmean(t_store) / statistics.fmean(t_bare),
    }


async def throughput(url: str, n: int, size: int) -> dict[str, float]:
    """put_many / get_many records per second."""
    records = [_rec(i, size) for i in range(n)]
    out: dict[str, float] = {}
    async with RedisStore(url, namespace="bench-put", batch_size=500) as store:
        t0 = time.perf_counter()
        await store.put_many(records)
        out[f"put_many_{size}B_records_per_s"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = await store.get_many([r.key for r in records])
        out[f"get_many_{size}B_records_per_s"] = n / (time.perf_counter() - t0)
        assert len(got) == n
    m = max(1, n // 20)
    async with RedisStore(url, namespace="bench-put1", batch_size=1) as store:
        t0 = time.perf_counter()
        await store.put_many(records[:m])
        out[f"put_unpipelined_{size}B_records_per_s"] = m / (time.perf_counter() - t0)
    return out


async def wake_latency(url: str, n: int) -> dict[str, float]:
    """How long after a put (other connection) a waiting wait_for returns."""
    lat: list[float] = []
    async with (
        RedisStore(url, namespace="bench-wait", recheck_interval=30) as follower,
        RedisStore(url, namespace="bench-wait") as leader,
    ):
        for i in range(n):
            r = _rec(i, 64)
            lease = await leader.claim(r.key, 30)
            assert lease is not None
            w = asyncio.create_task(follower.wait_for(r.key, 30))
            await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            await lease.complete(r)
            await w
            lat.append(time.perf_counter() - t0)
        checks = follower.stats()["wait_checks"] / n
    return {
        "wait_wake_median_us": statistics.median(lat) * 1e6,
        "wait_checks_per_wait": checks,
    }


_WORKER = """
import asyncio, sys, tempfile
sys.path.insert(0, sys.argv[5])
import redis.asyncio as aioredis
from aiomemo import Memoizer
from aiomemo.stores._redis import RedisStore

async def main(url, ns, n, offset):
    counter = aioredis.Redis.from_url(url)
    with tempfile.TemporaryDirectory() as rundir:
        memo = Memoizer(
            store=RedisStore(url, namespace=ns, lease_ttl=5),
            checkpoint_mode=None,
            config_run_dir=rundir,
            lease_ttl=5,
        )

        @memo.cached
        async def task(i):
            await counter.incr(ns + ":executions")
            await asyncio.sleep(0.002)  # the "work"
            return i

        sem = asyncio.Semaphore(16)

        async def one(i):
            async with sem:
                await task(i % {distinct})

        async with memo:
            await asyncio.gather(*(one(i) for i in range(offset, offset + n)))
    await counter.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def shared_workflow(url: str, procs: int, tasks: int, distinct: int) -> dict[str, float]:
    """N processes, each running a Memoizer on the same Redis, submit overlapping tasks."""
    ns = f"bench-wf-{uuid.uuid4().hex[:12]}"
    code = _WORKER.replace("{distinct}", str(distinct))
    t0 = time.perf_counter()
    ps = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            url,
            ns,
            str(tasks),
            str(w * (distinct // procs)),
            str(ROOT / "src"),
            stdout=subprocess.PIPE,
        )
        for w in range(procs)
    ]
    for p in ps:
        await p.communicate()
    wall = time.perf_counter() - t0
    counter = aioredis.Redis.from_url(url)
    try:
        executions = int(await counter.get(ns + ":executions") or 0)
    finally:
        await counter.aclose()
    return {
        "workflow_processes": procs,
        "workflow_tasks_submitted": procs * tasks,
        "workflow_distinct_keys": distinct,
        "workflow_executions": executions,
        "workflow_wall_s": wall,
    }


async def bench(url: str, quick: bool) -> dict[str, float]:
    """Run every measurement against ``url``."""
    n = 2000 if quick else 20000
    out: dict[str, float] = {}
    for size in (100, 10_000):
        out.update(await hit_latency(url, size, n))
    out.update(await throughput(url, 20_000 if quick else 200_000, 100))
    out.update(await throughput(url, 2_000 if quick else 20_000, 10_000))
    out.update(await wake_latency(url, 100 if quick else 500))
    out.update(await shared_workflow(url, 4, 200, 300))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="aiomemo-bench-redis-") as tmp:
        proc, url = start_redis(tmp)
        try:
            result = asyncio.run(bench(url, args.quick))
        finally:
            proc.terminate()
            proc.wait(10)
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    print(
        json.dumps(
            {"redis_server": "loopback", "python": sys.version.split()[0], **result}, indent=2
        )
    )


if __name__ == "__main__":
    main()
