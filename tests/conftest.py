"""Shared fixtures.

Redis: tests that use ``redis_url``/``redis_server``/``make_redis_server`` get a
real ``redis-server`` on a free 127.0.0.1 port in a temp dir (never any other
address). When the binary is missing those tests are skipped, unless the
environment variable ``CI`` is set: then they fail, saying so.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from _redis_server import RedisServer, redis_server_binary


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of redis-server; skip (or fail with CI set) when it is missing."""
    binary = redis_server_binary()
    if binary is None:
        msg = (
            "redis-server is not installed (apt-get install redis-server, "
            "or set REDIS_SERVER=/path/to/redis-server)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI is set, so the Redis tests must run", pytrace=False)
        pytest.skip(msg)
    return binary


@pytest.fixture(scope="session")
def redis_server(redis_binary: str) -> Iterator[RedisServer]:
    """One redis-server for the whole session (tests keep apart by namespace)."""
    server = RedisServer(redis_binary)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, (re)started if a test stopped it."""
    redis_server.start()
    return redis_server.url


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Any]:
    """A plain redis-py client of the session's redis-server (to look behind a store)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_namespace() -> str:
    """A namespace no other test uses."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_redis_server(redis_binary: str) -> Iterator[Callable[[], RedisServer]]:
    """Factory of private redis-servers (for tests that stop/restart/kill them)."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(redis_binary)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for s in servers:
            s.close()
