"""RedisStore access control: password, ACL user, TLS, and signed (authenticated) results."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # redis-py is the optional extra aiomemo[redis]
    pytest.importorskip("redis")

import redis.asyncio as aioredis

from _redis_server import RedisServer, tls_support
from aiomemo import Memoizer, StoreError
from aiomemo.stores import Record
from aiomemo.stores._redis import RedisStore, decode_value, derive_key, encode_value

pytestmark = pytest.mark.redis


def rec(i: int, value: bytes | None = None) -> Record:
    return Record(i.to_bytes(4, "big") * 8, value or b"v%d" % i, "m.f", 1e9 + i)


@pytest.fixture(scope="module")
def auth_server(redis_binary: str) -> Iterator[RedisServer]:
    """A server with ``requirepass`` and an ACL user ``alice``."""
    server = RedisServer(redis_binary, password="s3cret pw", acl_user=("alice", "alice-pw"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def tls_server(redis_binary: str) -> Iterator[RedisServer]:
    """A TLS-only server with a throwaway certificate (skipped when the build lacks TLS)."""
    msg = ""
    if not tls_support(redis_binary):
        msg = f"{redis_binary} was built without TLS"
    elif shutil.which("openssl") is None:
        msg = "openssl is not installed (it makes the test certificate)"
    if msg:
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI is set, so the TLS test must run", pytrace=False)
        pytest.skip(msg)
    server = RedisServer(redis_binary, tls=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


# -- passwords and ACL users -------------------------------------------------------


async def test_password_in_the_url(auth_server: RedisServer, redis_namespace: str) -> None:
    url = auth_server.url_with(None, "s3cret pw".replace(" ", "%20"))
    async with RedisStore(url, namespace=redis_namespace) as s:
        await s.put_many([rec(1)])
        assert await s.get(rec(1).key) == rec(1).value
        lease = await s.claim(rec(2).key, 5)
        assert lease is not None and await lease.complete(rec(2))
        assert await s.wait_for(rec(2).key, 5) == rec(2).value
        assert "s3cret" not in repr(s)


async def test_acl_user_in_the_url(auth_server: RedisServer, redis_namespace: str) -> None:
    async with RedisStore(
        auth_server.url_with("alice", "alice-pw"), namespace=redis_namespace
    ) as s:
        await s.put_many([rec(1)])
        assert await s.get_many([rec(1).key]) == {rec(1).key: rec(1).value}
        assert s.stats()["errors"] == 0


@pytest.mark.parametrize(
    ("user", "password"), [(None, "wrong"), ("alice", "wrong"), ("mallory", "alice-pw")]
)
async def test_wrong_credentials_warn_once_and_the_workflow_carries_on_locally(
    auth_server: RedisServer,
    redis_namespace: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    user: str | None,
    password: str,
) -> None:
    store = RedisStore(auth_server.url_with(user, password), namespace=redis_namespace)
    memo = Memoizer(store=store, checkpoint_mode=None, config_run_dir=tmp_path)
    runs: list[int] = []

    @memo.cached
    async def work(i: int) -> int:
        runs.append(i)
        return i + 1

    with caplog.at_level(logging.WARNING, logger="aiomemo.redis"):
        async with memo:
            assert await asyncio.gather(*(work(i % 50) for i in range(200))) == [
                i % 50 + 1 for i in range(200)
            ]
    assert sorted(runs) == list(range(50))  # computed here, once each
    store_warnings = [r for r in caplog.records if r.name == "aiomemo.redis"]
    assert len(store_warnings) == 1, [r.getMessage() for r in store_warnings]
    assert "refused the credentials" in store_warnings[0].getMessage()
    assert password not in store_warnings[0].getMessage()
    assert store.stats()["errors"] >= 1


async def test_no_password_on_a_server_that_wants_one(
    auth_server: RedisServer, redis_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aiomemo.redis"):
        async with RedisStore(auth_server.url, namespace=redis_namespace) as s:
            with pytest.raises(StoreError):
                await s.get(rec(1).key)
    assert any("refused the credentials" in r.getMessage() for r in caplog.records)


# -- TLS -----------------------------------------------------------------------------


async def test_rediss_with_a_ca_file(tls_server: RedisServer, redis_namespace: str) -> None:
    assert tls_server.cert is not None
    async with RedisStore(
        tls_server.url, namespace=redis_namespace, tls_ca_file=tls_server.cert
    ) as s:
        await s.put_many([rec(1)])
        assert await s.get(rec(1).key) == rec(1).value
        lease = await s.claim(rec(2).key, 5)
        assert lease is not None
        waiter = asyncio.create_task(s.wait_for(rec(2).key, 5))  # pub/sub over TLS too
        await asyncio.sleep(0.1)
        assert await lease.complete(rec(2))
        assert await waiter == rec(2).value


async def test_rediss_without_the_ca_is_refused(
    tls_server: RedisServer, redis_namespace: str
) -> None:
    # the self-signed certificate does not verify against the system CAs
    async with RedisStore(tls_server.url, namespace=redis_namespace) as s:
        with pytest.raises(StoreError):
            await s.get(rec(1).key)


def test_tls_ca_file_needs_rediss_and_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rediss"):
        RedisStore("redis://127.0.0.1:1/0", tls_ca_file="/tmp/ca.pem")
    with pytest.raises(ValueError, match="not a file"):
        RedisStore("rediss://127.0.0.1:1/0", tls_ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="secret"):
        RedisStore("redis://127.0.0.1:1/0", secret="")


# -- signed results ---------------------------------------------------------------------


def test_signed_values_verify_only_under_their_key() -> None:
    r = Record(b"k" * 32, b"payload", "m.f", 5.0, b"dg")
    k1, k2 = derive_key("one"), derive_key(b"two")
    assert len(k1) == 32 and k1 != k2 and derive_key("one") == k1
    blob = encode_value(r, k1)
    assert decode_value(r.key, blob, k1) == r
    assert decode_value(r.key, blob, k2) is None
    assert decode_value(r.key, blob) is None  # an unsigned reader does not accept it
    assert decode_value(r.key, encode_value(r), k1) is None  # nor a signed one an unsigned value
    assert decode_value(b"j" * 32, blob, k1) is None
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 1
        assert decode_value(r.key, bytes(bad), k1) is None
    with pytest.raises(ValueError, match="secret"):
        derive_key("")


async def test_a_planted_or_tampered_value_is_a_counted_miss(
    redis_url: str, redis_namespace: str, raw: aioredis.Redis
) -> None:
    r1, r2, r3 = rec(1), rec(2), rec(3)
    async with (
        RedisStore(redis_url, namespace=redis_namespace, secret="team secret") as s,
        RedisStore(redis_url, namespace=redis_namespace) as unsigned,
        RedisStore(redis_url, namespace=redis_namespace, secret="guessed") as other,
    ):
        await s.put_many([r1])
        assert await s.get(r1.key) == r1.value
        # a client without the secret (or with another one) plants results
        await unsigned.put_many([rec(2, b"planted")])
        await other.put_many([rec(3, b"forged")])
        assert await s.get(r2.key) is None
        assert await s.get(r3.key) is None
        # tampering with a signed value
        blob = await raw.get(s.value_key(r1.key))
        assert blob is not None
        await raw.set(s.value_key(r1.key), blob[:-1] + b"X")
        assert await s.get_many([r1.key, r2.key, r3.key]) == {}
        # r2, r3, then r1 (tampered) and r2 again: r3 carried our signed header,
        # so, like a damaged value of ours, it was deleted at the first read
        assert s.stats()["bad_values"] == 4
        assert await raw.exists(s.value_key(r3.key)) == 0
        # none of them blocks the real computation, which then wins
        for r in (r1, r2, r3):
            lease = await s.claim(r.key, 5)
            assert lease is not None, r
            assert await lease.complete(r)
            assert await s.get(r.key) == r.value
        # and the planted value never reaches a Memoizer as a result
        assert await unsigned.get(r1.key) is None


_RUNS: list[int] = []


async def _planted_work(i: int) -> int:
    _RUNS.append(i)
    return i * 10


async def test_memoizer_never_returns_a_planted_result(
    redis_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    _RUNS.clear()

    def make() -> tuple[Memoizer, RedisStore]:
        store = RedisStore(redis_url, namespace=redis_namespace, secret=b"\x00key")
        return Memoizer(store=store, checkpoint_mode=None, config_run_dir=tmp_path), store

    memo, _ = make()
    async with memo:
        assert await memo.cached(_planted_work)(1) == 10
    # a writer without the secret replaces every result in the namespace
    async with RedisStore(redis_url, namespace=redis_namespace) as attacker:
        client = attacker._conn()
        keys = [k async for k in client.scan_iter(match=f"{redis_namespace}:r:*")]
        assert len(keys) == 1
        planted = Record(keys[0].split(b"{")[1][:-1], b"\x00planted", "x.y", 0.0)
        await client.set(keys[0], encode_value(planted))
    memo2, store2 = make()
    async with memo2:  # a new run: it asks the shared store, rejects, recomputes
        assert await memo2.cached(_planted_work)(1) == 10
    assert _RUNS == [1, 1]
    assert store2.stats()["bad_values"] == 1
