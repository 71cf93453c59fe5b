"""RedisStore's options: their checks, and the redis-py client they describe."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = [
    "ERRORS",
    "check_options",
    "close_pubsub",
    "is_auth_error",
    "make_client",
    "open_connections",
    "strip_url",
]

# what a failing redis-py call raises (the cluster client's topology errors
# are not RedisErrors)
ERRORS = (RedisError, OSError, RedisClusterException)


def strip_url(url: str) -> str:
    """``url`` without its credentials, for messages."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"


def check_options(
    url: object,
    *,
    namespace: object,
    ttl: float | None,
    lease_ttl: float,
    recheck_interval: float | None,
    socket_timeout: float,
    connect_timeout: float,
    batch_size: object,
    max_connections: object,
    cluster: bool,
    tls_ca_file: str | os.PathLike[str] | None,
) -> None:
    """Raise TypeError/ValueError naming the first bad constructor argument."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"bad Redis URL {url!r}: {exc}") from None
    if not isinstance(namespace, str) or not namespace:
        raise ValueError("namespace must be a non-empty str")
    if "{" in namespace or "}" in namespace:
        raise ValueError(
            f"namespace {namespace!r} must not contain braces (they are the hash tag "
            "that keeps a task's result and lease keys in one cluster slot)"
        )
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds or None, not {ttl!r}")
    if not lease_ttl > 0:
        raise ValueError(f"lease_ttl must be > 0 seconds, not {lease_ttl!r}")
    if recheck_interval is not None and not recheck_interval > 0:
        raise ValueError(f"recheck_interval must be > 0, not {recheck_interval!r}")
    if not socket_timeout > 0 or not connect_timeout > 0:
        raise ValueError("socket_timeout and connect_timeout must be > 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be an int >= 1, not {max_connections!r}")
    if cluster and url.startswith("unix:"):
        raise ValueError("a Redis Cluster is reached over TCP, not a unix socket URL")
    if tls_ca_file is not None and not url.startswith("rediss://"):
        raise ValueError(f"tls_ca_file needs a rediss:// URL, not {strip_url(url)!r}")
    if tls_ca_file is not None and not os.path.isfile(tls_ca_file):
        raise ValueError(f"tls_ca_file {os.fspath(tls_ca_file)!r} is not a file")


def make_client(
    url: str,
    *,
    cluster: bool,
    max_connections: int,
    socket_timeout: float,
    connect_timeout: float,
    tls_ca_file: str | None,
    client_kwargs: Mapping[str, Any],
) -> Any:
    """A redis-py client (``Redis`` over a blocking pool, or ``RedisCluster``).

    At most ``max_connections`` + 1 connections (the one more: pub/sub).
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "decode_responses": False,
        "client_name": f"aiomemo:{os.getpid()}",
    }
    if tls_ca_file is not None:
        kwargs["ssl_ca_certs"] = tls_ca_file
    kwargs.update(client_kwargs)
    # One immediate retry on a broken connection: it re-establishes a
    # pooled connection that a server restart broke. No retry on a
    # timeout (a hung server would double the wait) and no back-off loop.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if cluster:
        return RedisCluster.from_url(
            url,
            retry=retry,
            require_full_coverage=False,
            max_connections=max_connections + 1,
            **kwargs,
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections + 1,  # + the pub/sub connection
        timeout=socket_timeout,
        retry=retry,
        **kwargs,
    )
    return aioredis.Redis.from_pool(pool)


def open_connections(client: Any, *, cluster: bool) -> int:
    """Connections open now (pub/sub included; all nodes of a cluster); -1 if unknown."""
    if client is None:
        return 0
    try:  # redis-py internals: a count for stats only, never relied upon
        if cluster:
            conns = [c for node in client.get_nodes() for c in node._connections]
        else:
            pool = client.connection_pool
            conns = [*pool._get_free_connections(), *pool._get_in_use_connections()]
        return sum(1 for c in conns if c.is_connected)
    except Exception:
        return -1


async def close_pubsub(pubsub: PubSub) -> None:
    """Close a pub/sub connection, ignoring what a broken one raises."""
    with contextlib.suppress(*ERRORS, RuntimeError):
        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]


def is_auth_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the server refused the credentials."""
    if isinstance(exc, AuthenticationError):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and ("NOAUTH" in text or "WRONGPASS" in text)


def open_failure(safe_url: str, cause: BaseException) -> str:
    """The one warning of a store whose server did not answer its PING at open."""
    if is_auth_error(cause):
        return (
            f"Redis at {safe_url} refused the credentials ({cause}): check the user and "
            "password in the URL; continuing without it"
        )
    return f"Redis at {safe_url} is unreachable at open ({cause}); continuing without it"
