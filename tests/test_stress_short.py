"""Every scripts/stress scenario in miniature (seeded; no wall-clock assertions).

The full runs (200 kills, 10,000 corruption cases, 100k coroutines, 10M
records, a 2-minute soak, Redis kill/restart) are ``scripts/stress``; these
run the same scenario functions small enough for the default test run.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from _redis_server import RedisServer
from aiomemo import Memoizer, StoreError
from aiomemo._checkpoint import FILE_HEADER_SIZE, SegmentWriter, load_paths
from aiomemo.stores import Lease, LeaseStore, LoadReport, Record, Store
from helpers import PutLease, load_script

stress = load_script("stress")  # the scenario functions of scripts/stress, in miniature


@pytest.fixture(autouse=True)
def _quiet_aiomemo() -> Iterator[None]:
    # damaged files and failed writes are the point here: warnings are expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("aiomemo").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("aiomemo").setLevel(logging.NOTSET)


def _ok(res: Any) -> None:
    assert res.cases > 0, res
    assert (res.failures, res.lost, res.wrong) == (0, 0, 0), res.notes


# -- kill -9 ------------------------------------------------------------------------


async def test_kill_9_of_a_writer_in_every_mode(tmp_path: Path) -> None:
    """SIGKILLs in every mode (~256 KiB value frames too): every acknowledged record loads and hits."""
    res = await stress.scenario_kill(
        len(stress.KILL_MODES), seed=3, max_delay=1.0, workdir=tmp_path
    )
    _ok(res)
    assert res.details["acked"] > 0


# -- corruption ---------------------------------------------------------------------


async def test_corruption_300_cases(tmp_path: Path) -> None:
    """Truncations, bit flips, zeroed pages, junk, duplicated/shuffled chunks."""
    res = await stress.scenario_corrupt(300, seed=7, workdir=tmp_path)
    _ok(res)
    assert res.details["intact_records"] > 0


async def test_damage_to_one_large_value_loses_only_it(tmp_path: Path) -> None:
    """Truncated, bit-flipped, zeroed value regions and zeroed frame headers (format 2)."""
    res = await stress.scenario_value_damage(80, seed=5, workdir=tmp_path)
    _ok(res)
    assert all(res.details["ops"][op] > 0 for op in stress.VALUE_DAMAGE)
    assert res.details["ops"]["bitflip: damaged value a miss"] > 0


async def test_a_batch_after_a_cut_short_batch_loads_whole(tmp_path: Path) -> None:
    """Regression: batch A cut in the middle of its payload, then batch B appended.

    The reader trusted A's length, walked A's claimed payload record by record
    (which runs into B) and resumed at A's claimed end, in the middle of a B
    record: that record was lost although B's bytes were intact. Now a sound
    batch header inside a damaged payload ends the damage there.
    """

    def rec(i: int) -> Record:
        return Record(blake3(b"%d" % i).digest(), b"v%d" % i * (1 + i % 13), "f", 0.0)

    writer = await SegmentWriter.create(tmp_path / "ck")
    spans = []
    for start, n in ((0, 20), (100, 40), (200, 3)):
        begin = writer.offset or FILE_HEADER_SIZE
        await writer.write_batch([rec(i) for i in range(start, start + n)], fsync=False)
        spans.append((begin, writer.offset))
    path = writer.path
    await writer.close()
    assert path is not None
    data = path.read_bytes()
    (a0, a1), (b0, _b1), _c = spans
    damaged = tmp_path / "damaged.amlog"
    damaged.write_bytes(data[: a0 + (a1 - a0) // 2] + data[b0:])
    rep = load_paths([damaged])
    want = {r.key: r.value for r in map(rec, [*range(100, 140), *range(200, 203)])}
    assert {k: rep.table.get(k) for k in want} == want
    every = {r.key: r.value for r in map(rec, range(300))}
    assert all(every.get(k) == v for k, v in rep.table.items())


# -- disk full / I/O errors ---------------------------------------------------------


async def test_disk_full_and_io_errors(tmp_path: Path) -> None:
    """A real 1 MiB tmpfs when mounting is allowed (else injected ENOSPC), and EIO on fsync.

    The workflow keeps running, records stay queued and are all written once
    space returns; if it never does, close() raises CheckpointError with the
    number of records missing on disk.
    """
    res = await stress.scenario_diskfull(
        1, seed=5, n_tasks=120, hold=0.2, loop_ext4=False, workdir=tmp_path
    )
    _ok(res)
    # 6 cases per way of failing: injected ENOSPC, injected EIO, (root) real tmpfs
    assert res.cases == 6 * len(res.details["hows"]) >= 12


# -- load ---------------------------------------------------------------------------


async def test_collapse_10k_coroutines_on_1k_keys(tmp_path: Path) -> None:
    """Exactly 1,000 executions for 10,000 concurrent calls; all 1,000 records written."""
    res = await stress.scenario_collapse(10_000, 1_000, seed=2, workdir=tmp_path)
    _ok(res)
    assert res.details["executions"] == 1_000


async def test_load_100k_records(tmp_path: Path) -> None:
    """100k records written in big batches load through a Memoizer; sampled hits are right."""
    res = await stress.scenario_bigload(100_000, seed=4, workdir=tmp_path, subprocess_=False)
    _ok(res)
    assert res.details["entries"] == 100_000


async def test_soak_3_seconds_of_periodic_drains(tmp_path: Path) -> None:
    """Completions every 10 ms with a 10 ms period: every one lands on disk."""
    res = await stress.scenario_soak(3, 1000, workdir=tmp_path, subprocess_=False)
    _ok(res)
    assert res.details["completions"] >= 100


# -- Redis --------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_killed_and_restarted_under_load(
    make_redis_server: Callable[[], RedisServer], tmp_path: Path
) -> None:
    """Tiered [LogStore, RedisStore], task_exit: kill -9 of redis-server, restart (no
    persistence): every task started after the kill reaches Redis, the log keeps all."""
    res = await stress.scenario_redis(
        restarts=1,
        lease_rounds=0,
        seconds=3,
        seed=6,
        server_factory=lambda persist: make_redis_server(),
        workdir=tmp_path,
    )
    _ok(res)
    case = res.details["restarts"][0]
    assert case["during_outage"] > 0 and case["in_redis"] >= case["must_be_in_redis"] > 0


@pytest.mark.redis
async def test_lease_holder_killed_one_takes_over(
    make_redis_server: Callable[[], RedisServer], tmp_path: Path
) -> None:
    """A holder killed -9 mid-task: of 3 waiting processes exactly one executes."""
    res = await stress.scenario_redis(
        restarts=0,
        lease_rounds=1,
        seed=8,
        server_factory=lambda persist: make_redis_server(),
        workdir=tmp_path,
    )
    _ok(res)


# -- regressions: bugs found in _memoizer.py by the stress work, now fixed -------------


class _GatedStore(Store):
    """Records what it is given; put_many waits for ``gate`` (to line calls up)."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.gate = asyncio.Event()
        self.calls = 0

    async def load(self) -> LoadReport:
        return LoadReport()

    async def put_many(self, records: Sequence[Record]) -> None:
        self.calls += 1
        await self.gate.wait()
        self.records.extend(records)


async def _complete(memo: Memoizer, i: int) -> None:
    task = stress.task_for(i)
    assert await memo.check_memo(task) is None
    await memo.update_memo_result(task, stress.expected(i))


async def test_concurrent_checkpoints_lose_nothing(tmp_path: Path) -> None:
    """Overlapping checkpoint() calls write every record, those queued meanwhile too."""
    store = _GatedStore()
    async with Memoizer(checkpoint_mode="manual", store=store, config_run_dir=tmp_path) as memo:
        for i in range(10):
            await _complete(memo, i)
        c1 = asyncio.create_task(memo.checkpoint())
        c2 = asyncio.create_task(memo.checkpoint())
        for _ in range(100):
            if store.calls == 2:
                break
            await asyncio.sleep(0)
        for i in range(10, 15):  # completions while both writes are in flight
            await _complete(memo, i)
        store.gate.set()
        await asyncio.gather(c1, c2)
        await memo.checkpoint()
    written = {r.key for r in store.records}
    want = {bytes.fromhex(stress.key_of(i)) for i in range(15)}
    assert want - written == set()


class _SharedStore(_GatedStore, LeaseStore):
    """A shared store with claims (like RedisStore) whose writes take a round trip."""

    shared = True

    async def get(self, key: bytes) -> bytes | None:
        return None

    async def claim(self, key: bytes, ttl: float) -> Lease | None:
        return PutLease(self, key, ttl)

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:
        return None

    async def put_many(self, records: Sequence[Record]) -> None:
        self.calls += 1
        await asyncio.sleep(0.05)  # network latency
        self.records.extend(records)


async def test_task_exit_with_only_a_shared_store_returns_once_stored(tmp_path: Path) -> None:
    """task_exit with a leased shared store returns only once the store holds the record."""
    store = _SharedStore()
    async with Memoizer(checkpoint_mode="task_exit", store=store, config_run_dir=tmp_path) as memo:
        await _complete(memo, 1)
        assert [r.key for r in store.records] == [bytes.fromhex(stress.key_of(1))]


class _FlakySharedStore(_SharedStore):
    """A shared store (claims, like RedisStore) that is unreachable while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def put_many(self, records: Sequence[Record]) -> None:
        if self.down:
            raise StoreError("connection refused")
        self.records.extend(records)


async def test_mode_none_retries_a_failed_publish(tmp_path: Path) -> None:
    """With mode None a publish that failed is retried once the shared store is back."""
    store = _FlakySharedStore()
    memo = Memoizer(checkpoint_mode=None, store=store, config_run_dir=tmp_path)
    async with memo:
        task = stress.task_for(1)
        assert await memo.check_memo(task) is None  # the lease is ours
        store.down = True  # the shared store goes away while the task runs
        await memo.update_memo_result(task, stress.expected(1))
        for _ in range(20):
            await asyncio.sleep(0)  # the background publish fails
        store.down = False  # and comes back
        await asyncio.sleep(0.2)
    assert [r.key for r in store.records] == [bytes.fromhex(stress.key_of(1))]
