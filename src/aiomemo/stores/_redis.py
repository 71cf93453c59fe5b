"""RedisStore: results shared by many processes and machines through Redis.

A :class:`RedisStore` keeps one Redis string per finished task and, for
cross-process collapse, one short-lived *lease* key per task being computed::

    {namespace}:r:{hex key}   checksummed record (see "Values" below), optional TTL
    {namespace}:l:{hex key}   lease: the random token of the holder's lease, PX expiry
    {namespace}:events        pub/sub channel: "a result was put" / "a lease was released"

Values
    ``b"AMR\x01"`` + 16-byte blake3 checksum over (task key + body) + body, where
    body = ``>dHI`` (time, len(func), len(digests)) + func + digests + encoded result.
    The checksum binds the value to its key: a damaged value, or one copied
    under another key, reads as a miss and is counted (``stats()["bad_values"]``);
    a damaged value with our header is deleted (if unchanged) so the task can be
    recomputed; a value without it is left alone and never blocks a claim.
    Nothing read from Redis is ever unpickled.

Lease protocol (what a Memoizer does on a local miss)
    1. ``lease = await store.claim(key, ttl)``: atomic ``SET lease token NX PX ttl``
       (Lua; it also refuses when the result already exists) with a fresh random
       token. A :class:`RedisLease`: this process computes; None: somebody else does.
    2. While computing: ``await lease.renew()`` every ``ttl/3``; False means the
       lease was lost (expired), the result may be computed twice but stays correct.
    3. On success: ``await lease.complete(record)`` (stores it and drops the lease
       in one atomic round trip); on an exception or cancellation:
       ``await lease.release()`` only.
    4. A process whose claim returned None calls ``wait_for(key, timeout)``: it
       returns the result as soon as it is put (woken by pub/sub, no busy poll),
       or None when the lease is gone without a result (the holder failed, or
       died and its lease expired: noticed right at the expiry time, found with
       PTTL) or when ``timeout`` passed: then it claims again; exactly one wins.

Faults
    Every Redis failure surfaces as :class:`~aiomemo.StoreError` (chained to the
    redis-py error) within about ``connect_timeout``/``socket_timeout``: no long
    retry loops. ``open()`` does not raise when Redis is unreachable (it logs a
    warning and counts the error) so a workflow can start and degrade to local
    work; redis-py reconnects by itself once the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from blake3 import blake3

from aiomemo._exceptions import StoreError
from aiomemo.stores._base import Lease, LeaseStore, LoadReport, Record

try:
    import redis.asyncio as aioredis
    from redis.asyncio.client import PubSub
    from redis.asyncio.connection import parse_url
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.commands.core import AsyncScript
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
except ImportError as _exc:  # pragma: no cover - exercised only without redis-py
    raise ImportError(
        "aiomemo's RedisStore needs redis-py: install the extra with `pip install 'aiomemo[redis]'`"
    ) from _exc

__all__ = ["RedisLease", "RedisStore", "decode_value", "encode_value"]

log = logging.getLogger("aiomemo.redis")

_T = TypeVar("_T")

MAGIC = b"AMR\x01"  # aiomemo redis record, format 1
_SUM_LEN = 16
_HEAD = struct.Struct(">dHI")  # time, len(func), len(digests)
_MIN_LEN = len(MAGIC) + _SUM_LEN + _HEAD.size

# KEYS[1] lease, KEYS[2] value; ARGV[1] token, ARGV[2] ttl ms, ARGV[3] MAGIC.
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

# KEYS[1] lease; ARGV[1] token, ARGV[2] channel, ARGV[3] message.
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('publish', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] value; ARGV[1] the bad value read: delete it only if still the same.
_DROP_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# KEYS[1] value, KEYS[2] lease; ARGV[1] blob, ARGV[2] ttl ms (0: none), ARGV[3] token,
# ARGV[4] channel, ARGV[5] message. Returns 1 when the lease was ours (and released).
_COMPLETE_LUA = """
if tonumber(ARGV[2]) > 0 then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('set', KEYS[1], ARGV[1])
end
local mine = 0
if redis.call('get', KEYS[2]) == ARGV[3] then
  redis.call('del', KEYS[2])
  mine = 1
end
redis.call('publish', ARGV[4], ARGV[5])
return mine
"""


def _checksum(key: bytes, body: bytes | memoryview) -> bytes:
    h = blake3(key)
    h.update(body)
    digest: bytes = h.digest(length=_SUM_LEN)
    return digest


def encode_value(record: Record) -> bytes:
    """The bytes RedisStore keeps for ``record`` (header, checksum, body)."""
    func = record.func.encode("utf-8")
    if len(func) > 0xFFFF:  # absurd, but keep it decodable
        func = func[:0xFFFF].decode("utf-8", "ignore").encode("utf-8")
    head = _HEAD.pack(record.time, len(func), len(record.digests))
    h = blake3(record.key)
    for part in (head, func, record.digests, record.value):
        h.update(part)
    checksum: bytes = h.digest(length=_SUM_LEN)
    return b"".join((MAGIC, checksum, head, func, record.digests, record.value))


def decode_value(key: bytes, blob: bytes) -> Record | None:
    """The record kept in ``blob`` under ``key``, or None when it is not sound."""
    if len(blob) < _MIN_LEN or blob[: len(MAGIC)] != MAGIC:
        return None
    mv = memoryview(blob)
    start = len(MAGIC) + _SUM_LEN
    body = mv[start:]
    if _checksum(key, body) != blob[len(MAGIC) : start]:
        return None
    t, flen, dlen = _HEAD.unpack_from(blob, start)
    pos = start + _HEAD.size
    if pos + flen + dlen > len(blob):
        return None
    try:
        func = bytes(mv[pos : pos + flen]).decode("utf-8")
    except UnicodeDecodeError:
        return None
    pos += flen
    digests = bytes(mv[pos : pos + dlen])
    pos += dlen
    return Record(key=key, value=bytes(mv[pos:]), func=func, time=t, digests=digests)


_KLEN = struct.Struct(">H")


def _key_list(kind: bytes, keys: Sequence[bytes]) -> bytes:
    # Event message: kind byte (b"p" put, b"r" released), then (u16 length + key) per key.
    parts = [kind]
    for k in keys:
        parts.append(_KLEN.pack(len(k)))
        parts.append(k)
    return b"".join(parts)


def _parse_key_list(msg: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos = 1
    n = len(msg)
    while pos + _KLEN.size <= n:
        (ln,) = _KLEN.unpack_from(msg, pos)
        pos += _KLEN.size
        out.append(msg[pos : pos + ln])
        pos += ln
    return out


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisLease(Lease):
    """A lease on one key in a :class:`RedisStore`, held under a random token.

    Only this object (its token) can renew, release or complete it; another
    process's lease on the same key is never touched.
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
    with contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisStore(LeaseStore):
    """Results shared through one Redis server, with cross-process collapse.

    Args:
        url: ``redis://[user:pass@]host[:port][/db]``, ``rediss://...`` or
            ``unix:///path.sock``; parsed (not connected) at construction, a bad
            one raises ``ValueError``.
        namespace: prefix of every key and of the event channel; two workflows
            with different namespaces never see each other's results.
        ttl: seconds a result lives in Redis (None: until evicted/deleted).
        lease_ttl: the lease time a Memoizer should pass to :meth:`claim`
            (a dead holder delays its waiters by at most this long).
        recheck_interval: longest sleep of :meth:`wait_for` between two reads of
            the key, in case a wake-up message was lost (default ``lease_ttl/4``;
            an expiring lease is looked at when it expires, whatever this is).
        socket_timeout, connect_timeout: seconds before a Redis call gives up;
            a failing call raises ``StoreError`` after about this long.
        batch_size: records per pipelined round trip in :meth:`put_many`.
        client_kwargs: extra keyword arguments for ``redis.asyncio.Redis.from_url``.

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
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds or None, not {ttl!r}")
        if not lease_ttl > 0:
            raise ValueError(f"lease_ttl must be > 0 seconds, not {lease_ttl!r}")
        if recheck_interval is not None and not recheck_interval > 0:
            raise ValueError(f"recheck_interval must be > 0, not {recheck_interval!r}")
        if not socket_timeout > 0 or not connect_timeout > 0:
            raise ValueError("socket_timeout and connect_timeout must be > 0")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
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
        self._client_kwargs = dict(client_kwargs or {})
        self._ns = namespace.encode("utf-8")
        self.channel = self._ns + b":events"
        self._client: aioredis.Redis | None = None
        self._closed = False
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sub_lock: asyncio.Lock | None = None
        self._waiters: dict[bytes, set[asyncio.Event]] = {}
        self._scripts: dict[str, AsyncScript] = {}
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
                "wait_wakeups",
            ),
            0,
        )
        self.last_error: str | None = None

    async def __aenter__(self) -> RedisStore:
        await self.open()
        return self

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, namespace={self.namespace!r})"

    # -- keys ---------------------------------------------------------------
    def value_key(self, key: bytes) -> bytes:
        """The Redis key holding the result of task ``key``."""
        return self._ns + b":r:" + key.hex().encode()

    def lease_key(self, key: bytes) -> bytes:
        """The Redis key holding the lease on task ``key``."""
        return self._ns + b":l:" + key.hex().encode()

    # -- lifecycle ----------------------------------------------------------
    def _make_client(self) -> aioredis.Redis:
        kwargs: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            # One immediate retry on a broken connection: it re-establishes a
            # pooled connection that a server restart broke. No retry on a
            # timeout (a hung server would double the wait) and no back-off loop.
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            "decode_responses": False,
        }
        kwargs.update(self._client_kwargs)
        client: aioredis.Redis = aioredis.Redis.from_url(self.url, **kwargs)
        return client

    async def open(self, *, run_dir: Path | None = None) -> None:
        """Create the client and check the server with a PING.

        Does not raise when Redis is unreachable: it logs a warning, counts the
        error, and every later operation raises ``StoreError`` until the
        server answers. Idempotent; re-opens a closed store.
        """
        if self._client is not None:
            return
        self._closed = False
        self._new_client()
        try:
            await self.ping()
        except StoreError as exc:
            log.warning(
                "Redis at %s is unreachable at open (%s); continuing without it",
                self._safe_url(),
                exc.__cause__,
            )

    async def aclose(self) -> None:
        """Stop the event listener and close every connection. Idempotent."""
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await _close_pubsub(pubsub)
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
        for events in self._waiters.values():
            for ev in events:
                ev.set()

    def _safe_url(self) -> str:
        # the URL without its password, for messages
        head, sep, tail = self.url.rpartition("@")
        if not sep:
            return self.url
        scheme, _, _ = head.partition("://")
        return f"{scheme}://***@{tail}"

    def _conn(self) -> aioredis.Redis:
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        if self._client is None:
            # used without open(): connect lazily
            return self._new_client()
        return self._client

    def _new_client(self) -> aioredis.Redis:
        client = self._make_client()
        self._client = client
        self._sub_lock = asyncio.Lock()
        self._scripts = {
            name: client.register_script(lua)
            for name, lua in (
                ("claim", _CLAIM_LUA),
                ("renew", _RENEW_LUA),
                ("release", _RELEASE_LUA),
                ("complete", _COMPLETE_LUA),
                ("drop", _DROP_LUA),
            )
        }
        return client

    async def _call(self, op: str, aw: Awaitable[_T]) -> _T:
        """Await a redis-py call, translating its errors into StoreError."""
        try:
            result = await aw
        except (RedisError, OSError) as exc:
            self._counts["errors"] += 1
            self.last_error = f"{op}: {type(exc).__name__}: {exc}"
            if not self._failing:
                self._failing = True
                log.warning("Redis at %s failed (%s)", self._safe_url(), self.last_error)
            raise StoreError(f"Redis {op} failed at {self._safe_url()}: {exc}") from exc
        if self._failing:
            self._failing = False
            log.info("Redis at %s answers again", self._safe_url())
        return result

    async def ping(self) -> None:
        """Check that the server answers; raise ``StoreError`` when it does not."""
        await self._call("PING", self._conn().ping())

    def stats(self) -> dict[str, int]:
        """Counters since construction: gets, hits, misses, bad_values, errors, puts, ...

        ``bad_values`` counts values that failed their checksum (read as misses),
        ``errors`` every Redis call that raised ``StoreError``; see also
        :attr:`last_error`.
        """
        return dict(self._counts)

    # -- results ------------------------------------------------------------
    async def load(self) -> LoadReport:
        """Nothing: a shared store is asked per key (``get``) on a local miss."""
        return LoadReport()

    async def _check(self, key: bytes, blob: bytes | str | None) -> Record | None:
        """Decode ``blob``; count a bad one and drop it when it is a damaged record of ours."""
        if blob is None:
            return None
        if isinstance(blob, str):  # only with decode_responses=True in client_kwargs
            blob = blob.encode("utf-8", "surrogateescape")
        rec = decode_value(key, blob)
        if rec is None:
            self._counts["bad_values"] += 1
            log.warning(
                "bad value in Redis under %r: ignored (read as a miss)", self.value_key(key)
            )
            if blob.startswith(MAGIC):
                # Damaged (it claims to be ours): delete it, if unchanged, so
                # that claim() lets someone recompute and rewrite it. Values
                # without our header never block a claim and are just overwritten.
                with contextlib.suppress(StoreError):
                    await self._call(
                        "drop bad value",
                        self._scripts["drop"](keys=[self.value_key(key)], args=[blob]),
                    )
        return rec

    async def get_record(self, key: bytes) -> Record | None:
        """The whole record for ``key`` (with func, time), or None."""
        blob = await self._call("GET", self._conn().get(self.value_key(key)))
        self._counts["gets"] += 1
        rec = await self._check(key, blob)
        self._counts["hits" if rec is not None else "misses"] += 1
        return rec

    async def get(self, key: bytes) -> bytes | None:
        """The encoded result for ``key``, or None (absent, expired or damaged).

        One round trip. Raises ``StoreError`` when Redis fails.
        """
        rec = await self.get_record(key)
        return None if rec is None else rec.value

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        """Encoded results for the keys present, with one MGET per ``batch_size`` keys."""
        out: dict[bytes, bytes] = {}
        if not keys:
            return out
        client = self._conn()
        for i in range(0, len(keys), self.batch_size):
            chunk = list(keys[i : i + self.batch_size])
            blobs = await self._call("MGET", client.mget([self.value_key(k) for k in chunk]))
            self._counts["gets"] += len(chunk)
            for k, blob in zip(chunk, blobs, strict=True):
                rec = await self._check(k, blob)
                if rec is None:
                    self._counts["misses"] += 1
                else:
                    self._counts["hits"] += 1
                    out[k] = rec.value
        return out

    def _px(self) -> int | None:
        return None if self.ttl is None else max(1, round(self.ttl * 1000))

    async def put_many(self, records: Sequence[Record]) -> None:
        """Write the records (SET with optional PX ttl), pipelined in batches.

        Each batch also publishes one event that wakes this namespace's
        waiters. Writing the same record twice is harmless; the last write of
        a key wins. Raises ``StoreError`` when Redis fails (some batches may
        already be written; retrying all of them is safe).
        """
        if not records:
            return
        client = self._conn()
        px = self._px()
        for i in range(0, len(records), self.batch_size):
            chunk = records[i : i + self.batch_size]
            pipe = client.pipeline(transaction=False)
            for rec in chunk:
                pipe.set(self.value_key(rec.key), encode_value(rec), px=px)
            pipe.publish(self.channel, _key_list(b"p", [r.key for r in chunk]))
            await self._call("pipelined SET", pipe.execute())
            self._counts["puts"] += len(chunk)
            self._counts["put_batches"] += 1

    # -- cross-process collapse ---------------------------------------------
    async def claim(self, key: bytes, ttl: float) -> RedisLease | None:
        """Take the lease on ``key`` for ``ttl`` seconds (atomic SET NX PX).

        Returns the :class:`RedisLease` (with a fresh random token) when taken;
        None when another holder has it, or when the result already exists:
        either way call :meth:`wait_for`, which returns an existing result at once.
        """
        if not ttl > 0:
            raise ValueError(f"RedisStore.claim: ttl must be positive seconds, not {ttl!r}")
        self._conn()
        token = uuid.uuid4().hex
        got = await self._call(
            "claim",
            self._scripts["claim"](
                keys=[self.lease_key(key), self.value_key(key)],
                args=[token, _ms(ttl), MAGIC],
            ),
        )
        won = bool(got)
        self._counts["claims_won" if won else "claims_lost"] += 1
        return RedisLease(self, key, token, ttl) if won else None

    async def _renew(self, lease: RedisLease) -> bool:
        self._conn()
        got = await self._call(
            "renew",
            self._scripts["renew"](
                keys=[self.lease_key(lease.key)], args=[lease.token, _ms(lease.ttl)]
            ),
        )
        if not got:
            self._counts["renewals_lost"] += 1
        return bool(got)

    async def _release(self, lease: RedisLease) -> None:
        self._conn()
        got = await self._call(
            "release",
            self._scripts["release"](
                keys=[self.lease_key(lease.key)],
                args=[lease.token, self.channel, _key_list(b"r", [lease.key])],
            ),
        )
        if got:
            self._counts["releases"] += 1

    async def _complete(self, lease: RedisLease, record: Record) -> bool:
        if record.key != lease.key:
            raise ValueError(
                f"RedisLease.complete: the record's key {record.key.hex()[:12]}… is not "
                f"the lease's key {lease.key.hex()[:12]}…"
            )
        self._conn()
        got = await self._call(
            "complete",
            self._scripts["complete"](
                keys=[self.value_key(record.key), self.lease_key(record.key)],
                args=[
                    encode_value(record),
                    self._px() or 0,
                    lease.token,
                    self.channel,
                    _key_list(b"p", [record.key]),
                ],
            ),
        )
        self._counts["puts"] += 1
        if got:
            self._counts["releases"] += 1
        return bool(got)

    async def lease_token(self, key: bytes) -> str | None:
        """The token of the lease on ``key`` now (None: nobody holds it)."""
        raw = await self._call("GET", self._conn().get(self.lease_key(key)))
        if raw is None or isinstance(raw, str):
            return raw
        return raw.decode("utf-8", "replace")

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
                await self._call("SUBSCRIBE", pubsub.subscribe(self.channel))
                # Wait for the confirmation: only then is no later publish missed.
                deadline = time.monotonic() + self.connect_timeout + self.socket_timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreError(f"Redis SUBSCRIBE not confirmed at {self._safe_url()}")
                    msg = await self._call("SUBSCRIBE", pubsub.get_message(timeout=left))
                    if msg is not None and msg.get("type") == "subscribe":
                        break
            except BaseException:
                await _close_pubsub(pubsub)
                raise
            self._pubsub = pubsub
            self._reader = asyncio.create_task(
                self._read_events(pubsub), name="aiomemo-redis-events"
            )

    async def _read_events(self, pubsub: PubSub) -> None:
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if msg is None or msg.get("type") != "message":
                    continue
                data = msg.get("data")
                if not isinstance(data, bytes) or not data:
                    continue
                for k in _parse_key_list(data):
                    for ev in self._waiters.get(k, ()):
                        ev.set()
        except (RedisError, OSError) as exc:
            # Lost the subscription: wake every waiter so it re-checks (and
            # re-subscribes, or sees the StoreError).
            self._counts["errors"] += 1
            self.last_error = f"event listener: {type(exc).__name__}: {exc}"
            for events in list(self._waiters.values()):
                for ev in events:
                    ev.set()

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:  # noqa: ASYNC109
        """Wait until ``key`` has a result (return it) or nobody holds its lease (None).

        Woken by the event channel (a put or a release anywhere), with a re-check
        every ``recheck_interval`` seconds for lost messages, and just after the
        lease's expiry time (for a holder that died and stopped renewing: it is
        noticed within one lease time). None also when ``timeout`` passes
        first (claim again, then wait again). Raises ``StoreError`` when Redis
        fails: the caller may then compute the task itself.
        """
        self._counts["waits"] += 1
        deadline = time.monotonic() + max(0.0, timeout)
        ev = asyncio.Event()
        self._waiters.setdefault(key, set()).add(ev)
        vkey, lkey = self.value_key(key), self.lease_key(key)
        try:
            while True:
                await self._ensure_subscribed()
                ev.clear()
                pipe = self._conn().pipeline(transaction=False)
                pipe.get(vkey)
                pipe.pttl(lkey)
                blob, lease_ms = await self._call("wait check", pipe.execute())
                self._counts["wait_checks"] += 1
                rec = await self._check(key, blob)
                if rec is not None:
                    return rec.value
                if lease_ms == -2:  # no lease: nobody computes it
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                nap = min(left, self.recheck_interval)
                if lease_ms > 0:
                    # look again right after the lease would expire: a dead
                    # holder is noticed within its lease time, a live one
                    # renews before that (every ttl/3), so this is no busy poll
                    nap = min(nap, lease_ms / 1000 + 0.01)
                try:
                    await asyncio.wait_for(ev.wait(), nap)
                    self._counts["wait_wakeups"] += 1
                except TimeoutError:
                    pass
                if self._closed:
                    raise StoreError(f"{self!r} was closed while waiting")
        finally:
            events = self._waiters.get(key)
            if events is not None:
                events.discard(ev)
                if not events:
                    del self._waiters[key]
