"""The contract every Store keeps, run over MemoryStore, LogStore and RedisStore.

Each store kind provides ``make()`` (a new store) and ``read_back(store, keys)``
(what a later reader finds: the same MemoryStore's ``load()``, a new LogStore's
``load()`` over the same directory, a new RedisStore's ``get_many`` in the same
namespace).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from aiomemo.stores import Lease, LeaseStore, Record, Store
from aiomemo.stores._log import LogStore
from aiomemo.stores._memory import MemoryStore


class Kind:
    """How to make one kind of store and read back what it holds."""

    name = ""

    def make(self) -> Store:
        raise NotImplementedError

    async def read_back(self, store: Store, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        raise NotImplementedError


class MemoryKind(Kind):
    name = "memory"

    def make(self) -> Store:
        return MemoryStore()

    async def read_back(self, store: Store, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        table = (await store.load()).table
        return {k: table[k] for k in keys if k in table}


class LogKind(Kind):
    name = "log"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def make(self) -> Store:
        return LogStore(self.directory)

    async def read_back(self, store: Store, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        await store.aclose()
        async with self.make() as again:
            table = (await again.load()).table
        return {k: table[k] for k in keys if k in table}


class RedisKind(Kind):
    name = "redis"

    def __init__(self, url: str) -> None:
        if not os.environ.get("CI"):  # redis-py is the optional extra aiomemo[redis]
            pytest.importorskip("redis")
        from aiomemo.stores._redis import RedisStore

        self.cls = RedisStore
        self.url = url
        self.namespace = f"contract-{uuid.uuid4().hex[:10]}"

    def make(self) -> Store:
        return self.cls(self.url, namespace=self.namespace)

    async def read_back(self, store: Store, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        # per key on the writer, in one MGET from another connection
        mine = {k: v for k in keys if (v := await store.get(k)) is not None}
        async with self.make() as other:
            theirs = dict(await other.get_many(keys))
        assert mine == theirs
        return theirs


@pytest.fixture(params=["memory", "log", "redis"])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    if request.param == "memory":
        return MemoryKind()
    if request.param == "log":
        return LogKind(tmp_path / "checkpoint")
    return RedisKind(request.getfixturevalue("redis_url"))


def rec(i: int, value: bytes | None = None, *, t: float = 1.7e9) -> Record:
    return Record(
        key=bytes([i]) * 32,
        value=value if value is not None else b"result-%d" % i,
        func="tests.contract.f",
        time=t + i,
    )


async def test_put_then_read_back(kind: Kind) -> None:
    records = [rec(1), rec(2), rec(3, b"\x00\xff" * 1000)]
    async with kind.make() as store:
        await store.put_many(records)
        got = await kind.read_back(store, [r.key for r in records] + [bytes([9]) * 32])
    assert got == {r.key: r.value for r in records}


async def test_same_record_twice_is_fine(kind: Kind) -> None:
    r = rec(1)
    async with kind.make() as store:
        await store.put_many([r, r])
        await store.put_many([r])  # a retry after a failure resends what was sent
        assert await kind.read_back(store, [r.key]) == {r.key: r.value}


async def test_newest_wins(kind: Kind) -> None:
    old, new = rec(1, b"old"), rec(1, b"new", t=1.8e9)
    async with kind.make() as store:
        await store.put_many([old])
        await store.put_many([new])
        assert await kind.read_back(store, [old.key]) == {old.key: b"new"}
    older, newer = rec(2, b"older"), rec(2, b"newer", t=1.8e9)
    async with kind.make() as store:
        await store.put_many([older, newer])  # within one batch, too
        assert await kind.read_back(store, [older.key]) == {older.key: b"newer"}


async def test_empty_put(kind: Kind) -> None:
    async with kind.make() as store:
        await store.put_many([])
        assert await kind.read_back(store, [rec(1).key]) == {}


async def test_open_and_aclose_are_idempotent(kind: Kind) -> None:
    store = kind.make()
    await store.aclose()  # never opened
    await store.open()
    await store.open()
    await store.put_many([rec(1)])
    await store.aclose()
    await store.aclose()


async def test_async_context_manager(kind: Kind) -> None:
    store = kind.make()
    async with store as entered:
        assert entered is store
        await store.put_many([rec(1)])


async def test_flags_and_load(kind: Kind) -> None:
    async with kind.make() as store:
        assert isinstance(store.shared, bool)
        if isinstance(store, LeaseStore):
            assert store.shared  # a lease store is a shared store
        report = await store.load()
        assert report.skipped == 0
        if store.shared:
            assert report.table == {}  # shared stores are asked per key


async def test_leases_without_competition(kind: Kind) -> None:
    # a lease store grants an uncontested claim; the lease renews, releases
    # (idempotently) and completes; other stores have no claim API at all
    key, other = rec(1).key, rec(2)
    async with kind.make() as store:
        if not isinstance(store, LeaseStore):
            assert not hasattr(store, "claim")
            return
        lease = await store.claim(key, 5.0)
        assert isinstance(lease, Lease) and lease.key == key and lease.ttl == 5.0
        assert await lease.renew()
        await lease.release()
        await lease.release()
        assert await store.wait_for(key, 0.1) is None
        lease = await store.claim(other.key, 5.0)
        assert lease is not None
        assert await lease.complete(other)
        assert await store.get(other.key) == other.value
        assert await store.claim(other.key, 5.0) is None  # the result exists
