"""RedisStore and RedisLease (see the package docstring for the design)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from aiomemo._exceptions import StoreError
from aiomemo.stores._base import Lease, LeaseStore, LoadReport, Record
from aiomemo.stores._redis._values import (
    MAGIC,
    MAGIC_SIGNED,
    decode_value,
    derive_key,
    encode_value,
    key_list,
    parse_key_list,
)

__all__ = ["RedisLease", "RedisStore"]

log = logging.getLogger("aiomemo.redis")

_T = TypeVar("_T")

# what a failing redis-py call raises (the cluster client's topology errors
# are not RedisErrors)
_ERRORS = (RedisError, OSError, RedisClusterException)

# KEYS[1] lease, KEYS[2] value; ARGV[1] token, ARGV[2] ttl ms, ARGV[3] magic.
# 1: taken; 0: held by another or a result (a value with our header) exists.
_CLAIM_LUA = """
if redis.call('getrange', KEYS[2], 0, 3) == ARGV[3] then return 0 end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS[1] lease; ARGV[1] token, ARGV[2] ttl ms.
_RENEW_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lease; ARGV[1] token.
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# KEYS[1] value; ARGV[1] the bad value read: delete it only if still the same.
_DROP_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# KEYS[1] value, KEYS[2] lease; ARGV[1] blob, ARGV[2] ttl ms (0: none), ARGV[3] token.
# Returns 1 when the lease was ours (and is now released).
_COMPLETE_LUA = """
if tonumber(ARGV[2]) > 0 then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('set', KEYS[1], ARGV[1])
end
if redis.call('get', KEYS[2]) == ARGV[3] then
  redis.call('del', KEYS[2])
  return 1
end
return 0
"""

_SCRIPTS = {
    "claim": _CLAIM_LUA,
    "renew": _RENEW_LUA,
    "release": _RELEASE_LUA,
    "drop": _DROP_LUA,
    "complete": _COMPLETE_LUA,
}
_SHA = {name: hashlib.sha1(lua.encode()).hexdigest() for name, lua in _SCRIPTS.items()}

# One command of a batched operation: ("GET", key), ("PTTL", key), ("SET", ...),
# or ("script", name, keys, args).
_Cmd = tuple[Any, ...]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class _Op:
    """One queued operation: its commands, the future of their replies, the keys to announce."""

    __slots__ = ("cmds", "fut", "on_orphan", "wake", "weight")

    def __init__(
        self,
        cmds: list[_Cmd],
        fut: asyncio.Future[list[Any]],
        wake: Sequence[bytes],
        on_orphan: Callable[[list[Any]], None] | None,
        weight: int = 1,
    ) -> None:
        self.cmds = cmds
        self.fut = fut
        self.wake = wake
        self.on_orphan = on_orphan
        self.weight = weight  # operations it counts for in a batch (bulk ops: their records)


class _Waiting:
    """The processes' waiters on one key (all answered by the same check)."""

    __slots__ = ("futs", "gen")

    def __init__(self) -> None:
        self.futs: set[asyncio.Future[bytes | None]] = set()
        self.gen = 0


class RedisLease(Lease):
    """A lease on one key in a :class:`RedisStore`, held under a random token.

    Only this object (its token) can renew, release or complete it; another
    holder's lease on the same key is never touched.
    """

    __slots__ = ("_released", "_store")

    def __init__(self, store: RedisStore, key: bytes, token: str, ttl: float) -> None:
        super().__init__(key, token, ttl)
        self._store = store
        self._released = False

    def __repr__(self) -> str:
        return f"RedisLease({self.key.hex()[:12]}…, ttl={self.ttl})"

    async def renew(self) -> bool:
        """Extend the lease by ``ttl``; False when it was lost (expired or taken)."""
        if self._released:
            return False
        return await self._store._renew(self)

    async def release(self) -> None:
        """Give the lease up and wake the waiters. Idempotent."""
        if self._released:
            return
        await self._store._release(self)
        self._released = True

    async def complete(self, record: Record) -> bool:
        """Store ``record``, drop the lease and wake waiters: one atomic call.

        Waiters never see the lease gone without the result. Returns whether
        the lease was still held.
        """
        held = await self._store._complete(self, record)
        self._released = True
        return held


async def _close_pubsub(pubsub: PubSub) -> None:
    with contextlib.suppress(*_ERRORS, RuntimeError):
        await pubsub.aclose()  # type: ignore[no-untyped-call]


def _is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, AuthenticationError):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and ("NOAUTH" in text or "WRONGPASS" in text)


class RedisStore(LeaseStore):
    """Results shared through Redis (one server or a cluster), with cross-process collapse.

    Args:
        url: ``redis://[user:pass@]host[:port][/db]``, ``rediss://...`` (TLS) or
            ``unix:///path.sock``; with ``cluster=True`` the address of any
            node. Parsed (not connected) at construction, a bad one raises
            ``ValueError``. The user (Redis 6 ACL) and password go in the URL.
        namespace: prefix of every key and of the event channel; two workflows
            with different namespaces never see each other's results.
        ttl: seconds a result lives in Redis (None: until evicted/deleted).
        lease_ttl: the lease time a Memoizer should pass to :meth:`claim`
            (a dead holder delays its waiters by at most this long).
        recheck_interval: longest time a waiter goes without reading its key,
            in case a wake-up message was lost (default ``lease_ttl/4``; an
            expiring lease is looked at when it expires, whatever this is).
        socket_timeout, connect_timeout: seconds before a Redis call gives up;
            a failing call raises ``StoreError`` after about this long.
        batch_size: operations per pipelined round trip.
        max_connections: round trips in flight at once, hence connections
            (pub/sub takes one more).
        cluster: talk to a Redis Cluster (redis-py's cluster client, sharded
            pub/sub for the wake-ups).
        secret: sign every value with blake3's keyed mode (key derived from
            this); a value that does not verify is a miss, counted in
            ``stats()["bad_values"]``. Without it, anyone who can write to the
            database can plant results.
        tls_ca_file: CA certificate file that verifies a ``rediss://`` server.
        client_kwargs: extra keyword arguments for redis-py's connections.

    Use it as ``async with RedisStore(url) as store:`` (or ``open``/``aclose``).
    ``load()`` returns nothing: ask :meth:`get`/:meth:`get_many` on a local miss.
    """

    shared: ClassVar[bool] = True

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "aiomemo",
        ttl: float | None = None,
        lease_ttl: float = 30.0,
        recheck_interval: float | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        batch_size: int = 500,
        max_connections: int = 4,
        cluster: bool = False,
        secret: str | bytes | None = None,
        tls_ca_file: str | os.PathLike[str] | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
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
            raise ValueError(f"tls_ca_file needs a rediss:// URL, not {self._strip(url)!r}")
        if tls_ca_file is not None and not os.path.isfile(tls_ca_file):
            raise ValueError(f"tls_ca_file {os.fspath(tls_ca_file)!r} is not a file")
        self.url = url
        self.namespace = namespace
        self.ttl = ttl
        self.lease_ttl = float(lease_ttl)
        self.recheck_interval = (
            float(recheck_interval) if recheck_interval is not None else self.lease_ttl / 4
        )
        self.socket_timeout = float(socket_timeout)
        self.connect_timeout = float(connect_timeout)
        self.batch_size = batch_size
        self.max_connections = max_connections
        self.cluster = bool(cluster)
        self.tls_ca_file = os.fspath(tls_ca_file) if tls_ca_file is not None else None
        self._mac_key = derive_key(secret) if secret is not None else None
        self._magic = MAGIC if self._mac_key is None else MAGIC_SIGNED
        self._client_kwargs = dict(client_kwargs or {})
        self._ns = namespace.encode("utf-8")
        self.channel = self._ns + b":events"
        self._client: Any = None  # aioredis.Redis or RedisCluster
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # batching
        self._queue: deque[_Op] = deque()
        self._kick_scheduled = False
        self._in_flight = 0
        self._flushes: set[asyncio.Task[None]] = set()
        self._bg: set[asyncio.Future[Any]] = set()
        # waiting
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sub_lock: asyncio.Lock | None = None
        self._waiting: dict[bytes, _Waiting] = {}
        self._due: set[bytes] = set()
        self._timers: list[tuple[float, int, bytes]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._watch_wake: asyncio.Event | None = None
        self._failing = False
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "gets",
                "hits",
                "misses",
                "bad_values",
                "errors",
                "puts",
                "put_batches",
                "claims_won",
                "claims_lost",
                "renewals_lost",
                "releases",
                "waits",
                "wait_checks",
                "wait_rounds",
                "wait_wakeups",
                "round_trips",
                "batched_ops",
                "batch_max",
                "in_flight_max",
            ),
            0,
        )
        self.last_error: str | None = None

    async def __aenter__(self) -> RedisStore:
        await self.open()
        return self

    def __repr__(self) -> str:
        kind = ", cluster=True" if self.cluster else ""
        return f"RedisStore({self._safe_url()!r}, namespace={self.namespace!r}{kind})"

    # -- keys ---------------------------------------------------------------
    def value_key(self, key: bytes) -> bytes:
        """The Redis key holding the result of task ``key``."""
        return self._ns + b":r:{" + key.hex().encode() + b"}"

    def lease_key(self, key: bytes) -> bytes:
        """The Redis key holding the lease on task ``key``."""
        return self._ns + b":l:{" + key.hex().encode() + b"}"

    # -- lifecycle ----------------------------------------------------------
    def _connection_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            "decode_responses": False,
            "client_name": f"aiomemo:{os.getpid()}",
        }
        if self.tls_ca_file is not None:
            kwargs["ssl_ca_certs"] = self.tls_ca_file
        kwargs.update(self._client_kwargs)
        return kwargs

    def _make_client(self) -> Any:
        kwargs = self._connection_kwargs()
        # One immediate retry on a broken connection: it re-establishes a
        # pooled connection that a server restart broke. No retry on a
        # timeout (a hung server would double the wait) and no back-off loop.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        if self.cluster:
            return RedisCluster.from_url(
                self.url,
                retry=retry,
                require_full_coverage=False,
                max_connections=self.max_connections + 1,
                **kwargs,
            )
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections + 1,  # + the pub/sub connection
            timeout=self.socket_timeout,
            retry=retry,
            **kwargs,
        )
        return aioredis.Redis.from_pool(pool)

    async def open(self, *, run_dir: Path | None = None) -> None:
        """Create the client and check the server with a PING.

        Does not raise when Redis is unreachable or refuses the credentials: it
        logs one warning, counts the error, and every later operation raises
        ``StoreError`` until the server answers. Idempotent; re-opens a closed store.
        """
        if self._client is not None:
            return
        self._closed = False
        self._new_client()
        try:
            client = self._conn()
            await client.ping()
            # load the Lua scripts now (on every master of a cluster), so the
            # first batches need no NOSCRIPT retry; a server that lost them
            # later (restart) is served by that retry
            for lua in _SCRIPTS.values():
                await client.script_load(lua)
        except _ERRORS as cause:
            # one warning, here; later failures stay quiet until Redis answers
            self._counts["errors"] += 1
            self.last_error = f"PING: {type(cause).__name__}: {cause}"
            self._failing = True
            if _is_auth_error(cause):
                log.warning(
                    "Redis at %s refused the credentials (%s): check the user and password "
                    "in the URL; continuing without it",
                    self._safe_url(),
                    cause,
                )
            else:
                log.warning(
                    "Redis at %s is unreachable at open (%s); continuing without it",
                    self._safe_url(),
                    cause,
                )

    def _new_client(self) -> Any:
        self._client = self._make_client()
        self._loop = asyncio.get_running_loop()
        self._sub_lock = asyncio.Lock()
        self._watch_wake = asyncio.Event()
        return self._client

    async def aclose(self) -> None:
        """Stop the event listener and close every connection. Idempotent.

        From another event loop than the one the store was opened in (that
        loop may be gone), it drops the store's connections without awaiting them.
        """
        self._closed = True
        try:
            same_loop = self._loop is None or asyncio.get_running_loop() is self._loop
        except RuntimeError:
            same_loop = False
        closed = StoreError(f"{self!r} was closed")
        tasks = [t for t in (self._watcher, self._reader, *self._flushes) if t is not None]
        self._watcher = self._reader = None
        if same_loop:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            while self._queue:
                op = self._queue.popleft()
                if not op.fut.done():
                    op.fut.set_exception(closed)
            for w in self._waiting.values():
                for fut in w.futs:
                    if not fut.done():
                        fut.set_exception(closed)
        self._queue.clear()
        self._flushes.clear()
        self._in_flight = 0
        self._kick_scheduled = False
        self._waiting.clear()
        self._due.clear()
        self._timers.clear()
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        if same_loop:
            if pubsub is not None:
                await _close_pubsub(pubsub)
            if client is not None:
                with contextlib.suppress(*_ERRORS):
                    await client.aclose()

    @staticmethod
    def _strip(url: str) -> str:
        head, sep, tail = url.rpartition("@")
        if not sep:
            return url
        scheme, _, _ = head.partition("://")
        return f"{scheme}://***@{tail}"

    def _safe_url(self) -> str:
        """The URL without its credentials, for messages."""
        return self._strip(self.url)

    def _conn(self) -> Any:
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        if self._client is None:
            # used without open(): connect lazily
            return self._new_client()
        return self._client

    def _own_loop(self) -> asyncio.AbstractEventLoop:
        """The store's event loop (connecting lazily); StoreError when closed or in another loop."""
        self._conn()
        loop = self._loop
        assert loop is not None
        if asyncio.get_running_loop() is not loop:
            raise StoreError(
                f"{self!r} was opened in another event loop; open it (or aclose and "
                "re-open it) in the loop that uses it"
            )
        return loop

    def _error(self, op: str, exc: BaseException) -> StoreError:
        """Count a failed Redis call and make the StoreError that reports it."""
        self._counts["errors"] += 1
        self.last_error = f"{op}: {type(exc).__name__}: {exc}"
        if not self._failing:
            self._failing = True
            log.warning("Redis at %s failed (%s)", self._safe_url(), self.last_error)
        err = StoreError(f"Redis {op} failed at {self._safe_url()}: {exc}")
        err.__cause__ = exc
        return err

    def _answered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("Redis at %s answers again", self._safe_url())

    async def _call(self, op: str, aw: Awaitable[_T]) -> _T:
        """Await a direct redis-py call, translating its errors into StoreError."""
        try:
            result = await aw
        except _ERRORS as exc:
            raise self._error(op, exc) from exc
        self._answered()
        return result

    async def ping(self) -> None:
        """Check that the server answers; raise ``StoreError`` when it does not."""
        await self._call("PING", self._conn().ping())

    def stats(self) -> dict[str, int]:
        """Counters since construction.

        ``round_trips`` (pipelines sent), ``batched_ops`` (operations they
        carried; ``batched_ops / round_trips`` is the mean batch), ``batch_max``,
        ``in_flight_max`` (most round trips at once: the connections used, plus
        one for pub/sub), ``max_connections``, ``connections`` (open now); gets, hits, misses, puts,
        claims_won/lost, waits, wait_rounds (batched re-check rounds),
        wait_checks (keys checked), wait_wakeups (keys woken by an event);
        ``bad_values`` counts values that failed their checksum or signature
        (read as misses), ``errors`` every Redis call that raised
        ``StoreError`` (see also :attr:`last_error`).
        """
        out = dict(self._counts)
        out["max_connections"] = self.max_connections
        out["connections"] = self._open_connections()
        out["waiting_keys"] = len(self._waiting)
        return out

    def _open_connections(self) -> int:
        """Connections open now (pub/sub included; all nodes of a cluster); -1 if unknown."""
        client = self._client
        if client is None:
            return 0
        try:  # redis-py internals: a count for stats only, never relied upon
            if self.cluster:
                conns = [c for node in client.get_nodes() for c in node._connections]
            else:
                pool = client.connection_pool
                conns = [*pool._get_free_connections(), *pool._get_in_use_connections()]
            return sum(1 for c in conns if c.is_connected)
        except Exception:
            return -1

    # -- batching -----------------------------------------------------------
    def _submit(
        self,
        cmds: list[_Cmd],
        *,
        wake: bytes | Sequence[bytes] = (),
        on_orphan: Callable[[list[Any]], None] | None = None,
        urgent: bool = False,
        weight: int = 1,
    ) -> asyncio.Future[list[Any]]:
        """Queue one operation; it goes out with the others of this loop iteration.

        ``urgent`` (lease renewals) jumps the queue: a deep backlog of lookups
        must not let a live holder's lease expire.
        """
        loop = self._own_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        op = _Op(cmds, fut, (wake,) if isinstance(wake, bytes) else wake, on_orphan, weight)
        if urgent:
            self._queue.appendleft(op)
        else:
            self._queue.append(op)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return fut

    def _kick(self) -> None:
        self._kick_scheduled = False
        while self._queue and self._in_flight < self.max_connections and not self._closed:
            ops: list[_Op] = []
            weight = 0
            queue = self._queue
            while queue and (not ops or weight + queue[0].weight <= self.batch_size):
                op = queue.popleft()
                ops.append(op)
                weight += op.weight
            self._in_flight += 1
            if self._in_flight > self._counts["in_flight_max"]:
                self._counts["in_flight_max"] = self._in_flight
            task = asyncio.ensure_future(self._flush(ops))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    def _fill(self, pipe: Any, ops: Sequence[_Op], *, use_eval: bool) -> None:
        for op in ops:
            for cmd in op.cmds:
                if cmd[0] == "script":
                    _, name, keys, args = cmd
                    if use_eval:
                        pipe.execute_command("EVAL", _SCRIPTS[name], len(keys), *keys, *args)
                    else:
                        pipe.execute_command("EVALSHA", _SHA[name], len(keys), *keys, *args)
                else:
                    pipe.execute_command(*cmd)

    async def _send(self, ops: Sequence[_Op], *, use_eval: bool) -> list[list[Any]]:
        """One round trip for ``ops``: the replies of each op's commands, in order."""
        client = self._client
        pipe = client.pipeline(transaction=False)
        gets: list[int] = []
        if not self.cluster:
            # plain lookups go as one MGET: far less client work than N GETs
            # (a cluster cannot: its keys are in many slots)
            gets = [i for i, op in enumerate(ops) if len(op.cmds) == 1 and op.cmds[0][0] == "GET"]
            if len(gets) > 1:
                pipe.execute_command("MGET", *(ops[i].cmds[0][1] for i in gets))
            else:
                gets = []
        in_mget = set(gets)
        rest = [i for i in range(len(ops)) if i not in in_mget]
        self._fill(pipe, [ops[i] for i in rest], use_eval=use_eval)
        wake = [k for op in ops for k in op.wake]
        if wake and not self.cluster:
            # same connection, after the writes: a woken waiter sees them
            pipe.execute_command("PUBLISH", self.channel, key_list(b"p", wake))
        self._counts["round_trips"] += 1
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if wake and self.cluster:
            # after the writes (they may be on other nodes): a second round trip
            with contextlib.suppress(*_ERRORS):
                await client.execute_command("SPUBLISH", self.channel, key_list(b"p", wake))
                self._counts["round_trips"] += 1
        out: list[list[Any]] = [[] for _ in ops]
        pos = 0
        if gets:
            values = results[0]
            pos = 1
            for j, i in enumerate(gets):
                out[i] = [values if isinstance(values, Exception) else values[j]]
        for i in rest:
            n = len(ops[i].cmds)
            out[i] = results[pos : pos + n]
            pos += n
        return out

    async def _round_trip(self, ops: list[_Op], *, use_eval: bool) -> list[_Op]:
        """Send ``ops`` and settle them; return those that met NOSCRIPT (only without EVAL)."""
        try:
            replies = await self._send(ops, use_eval=use_eval)
        except _ERRORS as exc:
            err = self._error(f"pipeline of {len(ops)} operations", exc)
            for op in ops:
                self._settle(op, err)
            # Redis is down or hung (redis-py already retried a broken
            # connection once): what is queued behind this round trip
            # fails now too, rather than one socket_timeout per batch
            while self._queue:
                self._settle(self._queue.popleft(), err)
            return []
        self._answered()
        retry: list[_Op] = []
        for op, res in zip(ops, replies, strict=True):
            failed = next((r for r in res if isinstance(r, Exception)), None)
            if isinstance(failed, NoScriptError) and not use_eval:
                retry.append(op)
            elif failed is not None:
                self._settle(op, self._error("batched command", failed))
            else:
                self._settle(op, res)
        return retry

    async def _flush(self, ops: list[_Op]) -> None:
        try:
            size = sum(op.weight for op in ops)
            self._counts["batched_ops"] += size
            if size > self._counts["batch_max"]:
                self._counts["batch_max"] = size
            # EVALSHA first; the operations whose script the server lost (a
            # restart) go again with EVAL, once
            retry = await self._round_trip(ops, use_eval=False)
            if retry:
                await self._round_trip(retry, use_eval=True)
        except asyncio.CancelledError:
            # only aclose() cancels a flush: its callers learn the store closed
            closed = StoreError(f"{self!r} was closed before Redis answered")
            for op in ops:
                if not op.fut.done():
                    op.fut.set_exception(closed)
            raise
        finally:
            self._in_flight -= 1
            if self._queue and not self._closed:
                self._kick()

    def _settle(self, op: _Op, res: list[Any] | StoreError) -> None:
        if op.fut.done():
            # the caller gave up (cancelled): undo what it can no longer use
            if op.on_orphan is not None and not isinstance(res, StoreError):
                op.on_orphan(res)
            return
        if isinstance(res, StoreError):
            op.fut.set_exception(res)
        else:
            op.fut.set_result(res)

    def _background(self, fut: asyncio.Future[Any]) -> None:
        self._bg.add(fut)
        fut.add_done_callback(self._bg.discard)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    # -- results ------------------------------------------------------------
    async def load(self) -> LoadReport:
        """Nothing: a shared store is asked per key (``get``) on a local miss."""
        return LoadReport()

    def _check(self, key: bytes, blob: Any) -> tuple[Record | None, asyncio.Future[Any] | None]:
        """Decode ``blob``; count a bad one, and start dropping it when it is a damaged one of ours."""
        if blob is None:
            return None, None
        if isinstance(blob, str):  # only with decode_responses=True in client_kwargs
            blob = blob.encode("utf-8", "surrogateescape")
        rec = decode_value(key, blob, self._mac_key)
        if rec is not None:
            return rec, None
        self._counts["bad_values"] += 1
        log.warning("bad value in Redis under %r: ignored (read as a miss)", self.value_key(key))
        if not blob.startswith(self._magic):
            # not one of ours (or signed differently): never blocks a claim,
            # and the next result simply overwrites it
            return None, None
        # Damaged (it claims to be ours): delete it, if unchanged, so that
        # claim() lets someone recompute and rewrite it.
        drop = self._submit([("script", "drop", [self.value_key(key)], [blob])])
        return None, drop

    async def get_record(self, key: bytes) -> Record | None:
        """The whole record for ``key`` (with func, time), or None."""
        (blob,) = await self._submit([("GET", self.value_key(key))])
        counts = self._counts
        counts["gets"] += 1
        if blob is None:
            counts["misses"] += 1
            return None
        rec, drop = self._check(key, blob)
        if drop is not None:
            with contextlib.suppress(StoreError):
                await drop
        counts["hits" if rec is not None else "misses"] += 1
        return rec

    async def get(self, key: bytes) -> bytes | None:
        """The encoded result for ``key``, or None (absent, expired or damaged).

        Batched with the other operations of this loop iteration (one MGET per
        batch). Raises ``StoreError`` when Redis fails.
        """
        # (get_record's body, inlined: this is the hot path of every hit)
        (blob,) = await self._submit([("GET", self.value_key(key))])
        counts = self._counts
        counts["gets"] += 1
        if blob is None:
            counts["misses"] += 1
            return None
        if type(blob) is bytes:
            rec = decode_value(key, blob, self._mac_key)
            if rec is not None:
                counts["hits"] += 1
                return rec.value
        rec, drop = self._check(key, blob)
        if drop is not None:
            with contextlib.suppress(StoreError):
                await drop
        if rec is None:
            counts["misses"] += 1
            return None
        counts["hits"] += 1
        return rec.value

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        """Encoded results for the keys present (``batch_size`` keys per round trip)."""
        out: dict[bytes, bytes] = {}
        if not keys:
            return out
        replies: list[Any]
        if self.cluster:  # keys in many slots: one GET each (batched all the same)
            futs = [self._submit([("GET", self.value_key(k))]) for k in keys]
            replies = await asyncio.gather(*futs, return_exceptions=True)
        else:  # one MGET operation per batch_size keys
            chunks = [keys[i : i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
            futs = [
                self._submit([("MGET", *(self.value_key(k) for k in c))], weight=len(c))
                for c in chunks
            ]
            replies = []
            for c, got in zip(
                chunks, await asyncio.gather(*futs, return_exceptions=True), strict=True
            ):
                if isinstance(got, BaseException):
                    replies += [got] * len(c)
                else:
                    replies += [[v] for v in got[0]]
        drops: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        for k, reply in zip(keys, replies, strict=True):
            if isinstance(reply, BaseException):
                error = error or reply
                continue
            self._counts["gets"] += 1
            rec, drop = self._check(k, reply[0])
            if drop is not None:
                drops.append(drop)
            if rec is None:
                self._counts["misses"] += 1
            else:
                self._counts["hits"] += 1
                out[k] = rec.value
        if drops:
            await asyncio.gather(*drops, return_exceptions=True)
        if error is not None:
            raise error
        return out

    def _px(self) -> int | None:
        return None if self.ttl is None else _ms(self.ttl)

    def _set_cmd(self, rec: Record) -> _Cmd:
        blob = encode_value(rec, self._mac_key)
        px = self._px()
        if px is None:
            return ("SET", self.value_key(rec.key), blob)
        return ("SET", self.value_key(rec.key), blob, "PX", px)

    async def put_many(self, records: Sequence[Record]) -> None:
        """Write the records (SET with optional PX ttl), ``batch_size`` per round trip.

        Each round trip also publishes one event that wakes the waiters on its
        keys. Writing the same record twice is harmless; the last write of a
        key wins. Raises ``StoreError`` when Redis fails (some may already be
        written; retrying all of them is safe).
        """
        if not records:
            return
        chunks = [records[i : i + self.batch_size] for i in range(0, len(records), self.batch_size)]
        futs = [
            self._submit([self._set_cmd(r) for r in c], wake=[r.key for r in c], weight=len(c))
            for c in chunks
        ]
        replies = await asyncio.gather(*futs, return_exceptions=True)
        self._counts["put_batches"] += len(chunks)
        error = None
        for c, got in zip(chunks, replies, strict=True):
            if isinstance(got, BaseException):
                error = error or got
            else:
                self._counts["puts"] += len(c)
        if error is not None:
            raise error

    # -- cross-process collapse ---------------------------------------------
    async def claim(self, key: bytes, ttl: float) -> RedisLease | None:
        """Take the lease on ``key`` for ``ttl`` seconds (atomic SET NX PX).

        Returns the :class:`RedisLease` (with a fresh random token) when taken;
        None when another holder has it, or when the result already exists:
        either way call :meth:`wait_for`, which returns an existing result at once.
        """
        if not isinstance(ttl, int | float) or not ttl > 0:
            raise ValueError(f"RedisStore.claim: ttl must be positive seconds, not {ttl!r}")
        token = uuid.uuid4().hex
        lkey = self.lease_key(key)

        def orphan(res: list[Any]) -> None:
            # the claimer was cancelled after Redis granted the lease: give it back
            if res and res[0]:
                self._background(self._submit([("script", "release", [lkey], [token])], wake=key))

        (got,) = await self._submit(
            [("script", "claim", [lkey, self.value_key(key)], [token, _ms(ttl), self._magic])],
            on_orphan=orphan,
        )
        won = bool(got)
        self._counts["claims_won" if won else "claims_lost"] += 1
        return RedisLease(self, key, token, float(ttl)) if won else None

    async def _renew(self, lease: RedisLease) -> bool:
        (got,) = await self._submit(
            [("script", "renew", [self.lease_key(lease.key)], [lease.token, _ms(lease.ttl)])],
            urgent=True,
        )
        if not got:
            self._counts["renewals_lost"] += 1
        return bool(got)

    async def _release(self, lease: RedisLease) -> None:
        (got,) = await self._submit(
            [("script", "release", [self.lease_key(lease.key)], [lease.token])], wake=lease.key
        )
        if got:
            self._counts["releases"] += 1

    async def _complete(self, lease: RedisLease, record: Record) -> bool:
        if record.key != lease.key:
            raise ValueError(
                f"RedisLease.complete: the record's key {record.key.hex()[:12]}… is not "
                f"the lease's key {lease.key.hex()[:12]}…"
            )
        cmd: _Cmd = (
            "script",
            "complete",
            [self.value_key(record.key), self.lease_key(record.key)],
            [encode_value(record, self._mac_key), self._px() or 0, lease.token],
        )
        (got,) = await self._submit([cmd], wake=record.key)
        self._counts["puts"] += 1
        if got:
            self._counts["releases"] += 1
        return bool(got)

    async def lease_token(self, key: bytes) -> str | None:
        """The token of the lease on ``key`` now (None: nobody holds it)."""
        (raw,) = await self._submit([("GET", self.lease_key(key))])
        if raw is None or isinstance(raw, str):
            return raw
        return bytes(raw).decode("utf-8", "replace")

    # -- waiting ------------------------------------------------------------
    async def _ensure_subscribed(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        client = self._conn()
        assert self._sub_lock is not None
        async with self._sub_lock:
            if self._reader is not None and not self._reader.done():
                return
            old, self._pubsub = self._pubsub, None
            if old is not None:
                await _close_pubsub(old)
            pubsub = client.pubsub()
            try:
                if self.cluster:
                    await self._call("SSUBSCRIBE", pubsub.ssubscribe(self.channel))
                else:
                    await self._call("SUBSCRIBE", pubsub.subscribe(self.channel))
                # Wait for the confirmation: only then is no later publish missed.
                deadline = time.monotonic() + self.connect_timeout + self.socket_timeout
                want = "ssubscribe" if self.cluster else "subscribe"
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreError(f"Redis {want} not confirmed at {self._safe_url()}")
                    msg = await self._call(want, self._next_message(pubsub, left))
                    if msg is not None and msg.get("type") == want:
                        break
            except BaseException:
                await _close_pubsub(pubsub)
                raise
            self._pubsub = pubsub
            self._reader = asyncio.create_task(
                self._read_events(pubsub), name="aiomemo-redis-events"
            )

    async def _next_message(self, pubsub: Any, wait: float | None) -> dict[str, Any] | None:
        # the next pub/sub message, waiting up to ``wait`` seconds (None: no limit)
        if self.cluster:
            msg: dict[str, Any] | None = await cast("ClusterPubSub", pubsub).get_sharded_message(
                timeout=wait if wait is not None else 1.0
            )
        else:
            msg = await pubsub.get_message(timeout=wait)
        return msg

    async def _read_events(self, pubsub: PubSub) -> None:
        try:
            while True:
                msg = await self._next_message(pubsub, None)
                if msg is None or msg.get("type") not in ("message", "smessage"):
                    continue
                data = msg.get("data")
                if not isinstance(data, bytes) or not data:
                    continue
                woke = 0
                for k in parse_key_list(data):
                    if k in self._waiting:
                        self._due.add(k)
                        woke += 1
                if woke:
                    self._counts["wait_wakeups"] += woke
                    self._wake_watcher()
        except _ERRORS as exc:
            # Lost the subscription: every waiter re-checks (the watcher
            # re-subscribes first, or reports the StoreError).
            self._counts["errors"] += 1
            self.last_error = f"event listener: {type(exc).__name__}: {exc}"
            self._due.update(self._waiting)
            self._wake_watcher()

    def _wake_watcher(self) -> None:
        if self._watch_wake is not None:
            self._watch_wake.set()

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:  # noqa: ASYNC109
        """Wait until ``key`` has a result (return it) or nobody holds its lease (None).

        Woken by the event channel (a put or a release anywhere), with a
        re-check every ``recheck_interval`` seconds for lost messages, and just
        after the lease's expiry time (for a holder that died and stopped
        renewing: it is noticed within one lease time). The checks of all the
        keys due at once go out in one batch. None also when ``timeout``
        passes first (claim again, then wait again). Raises ``StoreError``
        when Redis fails: the caller may then compute the task itself.
        """
        loop = self._own_loop()
        self._counts["waits"] += 1
        fut: asyncio.Future[bytes | None] = loop.create_future()
        w = self._waiting.get(key)
        if w is None:
            w = self._waiting[key] = _Waiting()
        w.futs.add(fut)
        self._due.add(key)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="aiomemo-redis-watch")
        self._wake_watcher()
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                return await fut
        except TimeoutError:
            return None
        finally:
            w.futs.discard(fut)
            if not w.futs and self._waiting.get(key) is w:
                del self._waiting[key]

    def _answer(self, key: bytes, result: bytes | StoreError | None) -> None:
        w = self._waiting.pop(key, None)
        if w is None:
            return
        for fut in w.futs:
            if fut.done():
                continue
            if isinstance(result, StoreError):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def _slack(self) -> float:
        return min(0.05, self.recheck_interval / 10)

    async def _watch(self) -> None:
        """The one task that checks every waited-for key: batched, when due."""
        wake = self._watch_wake
        assert wake is not None
        # re-checks due within ``slack`` of each other go in the same round
        slack = self._slack()
        while not self._closed:
            now = time.monotonic()
            timers = self._timers
            while timers and timers[0][0] <= now + slack:
                _, gen, k = heapq.heappop(timers)
                w = self._waiting.get(k)
                if w is not None and w.gen == gen:
                    self._due.add(k)
            due = [k for k in self._due if k in self._waiting]
            self._due.clear()
            if not due:
                wake.clear()
                delay = timers[0][0] - now if timers else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wake.wait()
                continue
            await self._check_round(due)

    async def _check_round(self, due: list[bytes]) -> None:
        try:
            await self._ensure_subscribed()
        except StoreError as exc:
            for k in due:
                self._answer(k, exc)
            return
        self._counts["wait_rounds"] += 1
        self._counts["wait_checks"] += len(due)
        futs = [
            self._submit([("GET", self.value_key(k)), ("PTTL", self.lease_key(k))]) for k in due
        ]
        replies = await asyncio.gather(*futs, return_exceptions=True)
        now = time.monotonic()
        for k, reply in zip(due, replies, strict=True):
            w = self._waiting.get(k)
            if w is None:
                continue  # every waiter gave up meanwhile
            if isinstance(reply, BaseException):
                self._answer(k, reply if isinstance(reply, StoreError) else StoreError(str(reply)))
                continue
            blob, lease_ms = reply
            rec, drop = self._check(k, blob)
            if drop is not None:
                self._background(drop)
            if rec is not None:
                self._answer(k, rec.value)
            elif lease_ms == -2:  # no lease: nobody computes it
                self._answer(k, None)
            else:
                nap = self.recheck_interval
                if lease_ms > 0:
                    # look again right after the lease would expire: a dead
                    # holder is noticed within its lease time, a live one
                    # renews before that (every ttl/3), so this is no busy poll
                    # (+ slack: a round taken up to ``slack`` early is still after it)
                    nap = min(nap, lease_ms / 1000 + 0.01 + self._slack())
                w.gen += 1
                heapq.heappush(self._timers, (now + nap, w.gen, k))
