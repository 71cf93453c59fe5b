"""RedisStore(cluster=True) against a real 3-master Redis Cluster on loopback ports."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if not os.environ.get("CI"):  # redis-py is the optional extra aiomemo[redis]
    pytest.importorskip("redis")

import redis.asyncio as aioredis

from _redis_server import RedisClusterServers, redis_cli_binary
from aiomemo import StoreError
from aiomemo.stores import Record
from aiomemo.stores._redis import RedisStore

pytestmark = pytest.mark.redis

SRC = str(Path(__file__).resolve().parents[1] / "src")


def rec(i: int, value: bytes | None = None) -> Record:
    return Record(i.to_bytes(4, "big") * 8, value or b"v%d" % i, "m.f", 1e9 + i)


@pytest.fixture(scope="module")
def cluster(redis_binary: str) -> Iterator[RedisClusterServers]:
    cli = redis_cli_binary()
    if cli is None:
        msg = "redis-cli is not installed (apt-get install redis-tools)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI is set, so the cluster tests must run", pytrace=False)
        pytest.skip(msg)
    servers = RedisClusterServers(redis_binary, cli)
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


def test_result_and_lease_keys_share_a_slot() -> None:
    from redis.crc import key_slot

    s = RedisStore("redis://127.0.0.1:1", cluster=True, namespace="ns")
    slots = {key_slot(s.value_key(rec(i).key)) for i in range(200)}
    assert len(slots) > 100  # spread over the cluster
    for i in range(200):
        assert key_slot(s.value_key(rec(i).key)) == key_slot(s.lease_key(rec(i).key))
    with pytest.raises(ValueError, match="braces"):
        RedisStore("redis://127.0.0.1:1", cluster=True, namespace="a{b}")
    with pytest.raises(ValueError, match="unix"):
        RedisStore("unix:///tmp/x.sock", cluster=True)


async def test_cluster_round_trip_claims_and_wake_ups(
    cluster: RedisClusterServers, redis_namespace: str
) -> None:
    records = [rec(i) for i in range(600)]
    async with (
        RedisStore(cluster.url, cluster=True, namespace=redis_namespace) as leader,
        RedisStore(
            cluster.url, cluster=True, namespace=redis_namespace, recheck_interval=30
        ) as follower,
    ):
        await leader.put_many(records[:300])
        assert await follower.get_many([r.key for r in records[:300]]) == {
            r.key: r.value for r in records[:300]
        }
        leases = await asyncio.gather(*(leader.claim(r.key, 10) for r in records[300:]))
        assert all(lease is not None for lease in leases)
        assert (
            await asyncio.gather(*(follower.claim(r.key, 10) for r in records[300:]))
            == [None] * 300
        )
        waiters = [asyncio.create_task(follower.wait_for(r.key, 20)) for r in records[300:]]
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        done = await asyncio.gather(
            *(
                lease.complete(r)
                for lease, r in zip(leases, records[300:], strict=True)
                if lease is not None
            )
        )
        assert all(done)
        # woken through sharded pub/sub, not the 30 s re-check
        assert await asyncio.gather(*waiters) == [r.value for r in records[300:]]
        assert time.monotonic() - t0 < 3
        assert leader.stats()["errors"] == 0 and follower.stats()["errors"] == 0
        # connections: per master at most max_connections (4) + pub/sub
        assert 3 <= leader.stats()["connections"] <= 3 * 5, leader.stats()
    # the keys really are spread over the three masters
    for node in cluster.nodes:
        client = aioredis.Redis(host="127.0.0.1", port=node.port)
        try:
            mine = [k async for k in client.scan_iter(match=f"{redis_namespace}:r:*")]
            assert len(mine) > 50, node.port
        finally:
            await client.aclose()


_CLUSTER_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {src!r})
    from aiomemo import CheckpointError, Memoizer
    from aiomemo.stores._redis import RedisStore

    async def main(url, ns, rundir, n, distinct, out, keys_out):
        store = RedisStore(url, cluster=True, namespace=ns, lease_ttl=2,
                           socket_timeout=0.5, connect_timeout=0.5)
        memo = Memoizer(store=store, checkpoint_mode=None, config_run_dir=rundir, lease_ttl=2)
        ran = []

        @memo.cached
        async def work(i):
            ran.append(i)
            await asyncio.sleep(0.01)
            return i * 7

        wrong = 0
        try:
            async with memo:
                if keys_out:  # the task keys, for the test to find their slots
                    with open(keys_out, "w") as f:
                        f.write(" ".join([await work.key(i) for i in range(distinct)]))
                print("ready", flush=True)
                sys.stdin.readline()  # start together
                for start in range(0, n, 100):  # waves of 100 concurrent calls
                    got = await asyncio.gather(
                        *(work(i % distinct) for i in range(start, start + 100))
                    )
                    wrong += sum(
                        g != (i % distinct) * 7 for i, g in zip(range(start, start + 100), got)
                    )
                    await asyncio.sleep(0.05)
                errors = memo.stats().store_errors
        except CheckpointError as exc:
            # close() reports results the shared store could not take at the
            # end (its master was still down): they were returned all the same
            print("unsaved at close:", exc, file=sys.stderr)
        with open(out, "w") as f:
            f.write(" ".join(map(str, ran)))
        print(wrong, errors, flush=True)

    a = sys.argv
    asyncio.run(main(a[1], a[2], a[3], int(a[4]), int(a[5]), a[6], a[7]))
    """
).format(src=SRC)


async def test_lookups_of_large_values_go_one_value_per_pipeline(
    cluster: RedisClusterServers, redis_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server copies a pipeline's replies before it sends the first: never many large ones.

    A store that wrote large values knows their size; one that did not learns
    it from its first replies.
    """
    from aiomemo.stores._redis import _batcher

    values: list[int] = []  # the large values each pipeline brought back
    send = _batcher.Batcher._send_cluster

    async def counting_send(self: _batcher.Batcher, cmds: list[Any], *, use_eval: bool) -> Any:
        out = await send(self, cmds, use_eval=use_eval)
        values.append(sum(1 for v in out if type(v) is bytes and len(v) > 1 << 20))
        return out

    monkeypatch.setattr(_batcher.Batcher, "_send_cluster", counting_send)
    big = [rec(i, bytes([i]) * (2 << 20)) for i in range(32)]
    async with RedisStore(cluster.url, cluster=True, namespace=redis_namespace) as w:
        for r in big:
            await w.put_many([r])
        values.clear()
        assert await asyncio.gather(*(w.get(r.key) for r in big)) == [r.value for r in big]
        assert max(values) == 1, values
    async with RedisStore(cluster.url, cluster=True, namespace=redis_namespace) as s:
        assert s._batch.get_bytes >= 2 << 20  # the writer's hint told it
        await s._client.delete(s.hint_key)
    async with RedisStore(cluster.url, cluster=True, namespace=redis_namespace) as s:
        assert not s._batch.get_bytes
        await s.get(big[0].key)  # no hint: its first reply tells it
        values.clear()
        assert await asyncio.gather(*(s.get(r.key) for r in big)) == [r.value for r in big]
        assert max(values) == 1, values
        assert await s.get_many([r.key for r in big]) == {r.key: r.value for r in big}
        assert s.stats()["errors"] == 0
        await s._client.delete(*(s.value_key(r.key) for r in big))


async def test_three_processes_survive_a_master_killed_and_restarted(
    cluster: RedisClusterServers, redis_namespace: str, tmp_path: Path
) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CLUSTER_WORKER,
            cluster.url,
            redis_namespace,
            str(tmp_path / f"r{w}"),
            "3000",
            "3000",  # every call a new key (shared by the 3 processes)
            str(tmp_path / f"ran{w}"),
            str(tmp_path / "keys") if w == 0 else "",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for w in range(3)
    ]
    victim = cluster.nodes[2]
    victim_slots = await _slot_ranges(cluster, victim.port)
    try:
        for p in procs:
            assert p.stdout is not None and p.stdin is not None
            assert (await asyncio.wait_for(p.stdout.readline(), 30)).strip() == b"ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        await asyncio.sleep(0.4)
        victim.stop(kill=True)  # a master dies mid-run
        await asyncio.sleep(1.0)
        await asyncio.to_thread(victim.start)  # and comes back, empty
        await asyncio.to_thread(cluster.wait_ok)
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 120)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        if not victim.running:
            victim.start()
            cluster.wait_ok()
    assert all(p.returncode == 0 for p in procs), [
        [ln for ln in o[1].decode().splitlines() if not ln.startswith(("Redis at", "RedisStore"))]
        for o in outs
    ]
    wrong_and_errors = [[int(x) for x in o[0].split()] for o in outs]
    assert [w for w, _ in wrong_and_errors] == [0, 0, 0]  # 0 wrong results
    assert sum(e for _, e in wrong_and_errors) > 0  # the kill did land mid-run
    ran = [int(x) for w in range(3) for x in (tmp_path / f"ran{w}").read_text().split()]
    assert set(ran) == set(range(3000))  # the workflow finished every key
    # keys on the surviving masters ran once; the killed one's may have run
    # in each process while it was down
    assert len(ran) < 2 * 3000
    from redis.crc import key_slot

    s = RedisStore("redis://127.0.0.1:1", cluster=True, namespace=redis_namespace)
    keys = (tmp_path / "keys").read_text().split()

    def on_victim(i: int) -> bool:
        slot = key_slot(s.value_key(bytes.fromhex(keys[i])))
        return any(lo <= slot <= hi for lo, hi in victim_slots)

    runs = Counter(ran)
    survivors = [i for i in range(3000) if not on_victim(i)]
    assert 1500 < len(survivors) < 2500  # ~2/3 of the keys
    # the strong form: a master being down cost only the keys in its own slots
    twice = [i for i in survivors if runs[i] != 1]
    assert not twice, f"{len(twice)} keys of the surviving masters ran more than once"


async def _slot_ranges(cluster: RedisClusterServers, port: int) -> list[tuple[int, int]]:
    """The slot ranges the master on ``port`` serves (CLUSTER SLOTS, asked of another node)."""
    other = next(n for n in cluster.nodes if n.port != port)
    client = aioredis.Redis(host="127.0.0.1", port=other.port)
    try:
        reply = await client.execute_command("CLUSTER", "SLOTS")
    finally:
        await client.aclose()
    return [(int(lo), int(hi)) for lo, hi, master, *_ in reply if int(master[1]) == port]


async def test_an_unreachable_cluster_is_a_store_error(redis_namespace: str) -> None:
    s = RedisStore(
        "redis://127.0.0.1:1", cluster=True, namespace=redis_namespace, connect_timeout=0.3
    )
    await s.open()  # warns, does not raise
    with pytest.raises(StoreError):
        await s.get(rec(1).key)
    await s.aclose()
