"""RedisStore: the LeaseStore over the batcher, the lease scripts and the watcher.

See the package docstring for the design. The parts: ``_config`` (option
checks, the redis-py client), ``_batcher`` (one pipeline per batch of
operations), ``_lease`` (RedisLease and its Lua scripts), ``_watcher``
(wait_for's waiters and their pub/sub wake-ups), ``_writes`` (records as SET /
DEL with their expiry, forgetting a function), ``_values`` (the record format).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from aiomemo._exceptions import StoreError
from aiomemo.stores._base import LeaseStore, LoadReport, Record
from aiomemo.stores._redis._batcher import Batcher
from aiomemo.stores._redis._config import (
    ERRORS,
    check_options,
    close_pubsub,
    make_client,
    open_connections,
    open_failure,
    strip_url,
)
from aiomemo.stores._redis._lease import SCRIPTS, RedisLease, ms
from aiomemo.stores._redis._values import (
    MAGIC,
    MAGIC_EXP,
    MAGIC_EXP_SIGNED,
    MAGIC_SIGNED,
    decode_value,
    derive_key,
)
from aiomemo.stores._redis._watcher import Watcher
from aiomemo.stores._redis._writes import Writes

__all__ = ["RedisLease", "RedisStore"]

log = logging.getLogger("aiomemo.redis")

_T = TypeVar("_T")

_COUNTERS = (
    "gets",
    "hits",
    "misses",
    "bad_values",
    "errors",
    "puts",
    "forgotten",
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
)


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
        check_options(
            url,
            namespace=namespace,
            ttl=ttl,
            lease_ttl=lease_ttl,
            recheck_interval=recheck_interval,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            batch_size=batch_size,
            max_connections=max_connections,
            cluster=cluster,
            tls_ca_file=tls_ca_file,
        )
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
        self._magic_exp = MAGIC_EXP if self._mac_key is None else MAGIC_EXP_SIGNED
        #: key -> expiry of values read that expire, until take_expiry() asks
        self._expiry: dict[bytes, float] = {}
        self._client_kwargs = dict(client_kwargs or {})
        self._ns = namespace.encode("utf-8")
        self.channel = self._ns + b":events"
        self._client: Any = None  # aioredis.Redis or RedisCluster
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing = False
        self._counts: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.last_error: str | None = None
        self._batch = Batcher(self)
        # the hot path: queue an operation (bound once, no per-call indirection)
        self._submit = self._batch.submit
        self._background = self._batch.background
        self._waits = Watcher(self)
        self._writes = Writes(self)

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

    @property
    def hint_key(self) -> bytes:
        """The Redis key where stores that write large values leave their size."""
        return self._ns + b":large"

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
            for lua in SCRIPTS.values():
                await client.script_load(lua)
        except ERRORS as cause:
            # one warning, here; later failures stay quiet until Redis answers
            self._counts["errors"] += 1
            self.last_error = f"PING: {type(cause).__name__}: {cause}"
            self._failing = True
            log.warning("%s", open_failure(self._safe_url(), cause))
            return
        try:
            # values large enough to be looked up one GET each (see Batcher);
            # a user whose ACL does not cover the key goes without
            hint = await client.get(self.hint_key)
        except ERRORS:
            return
        if isinstance(hint, bytes) and hint.isdigit():
            self._batch.take_hint(int(hint))

    def _new_client(self) -> Any:
        self._client = make_client(
            self.url,
            cluster=self.cluster,
            max_connections=self.max_connections,
            socket_timeout=self.socket_timeout,
            connect_timeout=self.connect_timeout,
            tls_ca_file=self.tls_ca_file,
            client_kwargs=self._client_kwargs,
        )
        self._loop = asyncio.get_running_loop()
        self._waits.bind_loop()
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
        tasks = [*self._waits.take_tasks(), *self._batch.take_tasks()]
        if same_loop:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._batch.fail_queued(closed)
            self._waits.fail_waiters(closed)
        self._batch.reset()
        pubsub = self._waits.reset()
        client, self._client = self._client, None
        if same_loop:
            if pubsub is not None:
                await close_pubsub(pubsub)
            if client is not None:
                with contextlib.suppress(*ERRORS):
                    await client.aclose()

    def _safe_url(self) -> str:
        """The URL without its credentials, for messages."""
        return strip_url(self.url)

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
        except ERRORS as exc:
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
        out["connections"] = open_connections(self._client, cluster=self.cluster)
        out["waiting_keys"] = len(self._waits)
        return out

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
            return self._fresh(key, rec), None
        self._counts["bad_values"] += 1
        log.warning("bad value in Redis under %r: ignored (read as a miss)", self.value_key(key))
        if not blob.startswith((self._magic, self._magic_exp)):
            # not one of ours (or signed differently): never blocks a claim,
            # and the next result simply overwrites it
            return None, None
        # Damaged (it claims to be ours): delete it, if unchanged, so that
        # claim() lets someone recompute and rewrite it.
        drop = self._submit([("script", "drop", [self.value_key(key)], [blob])])
        return None, drop

    def _fresh(self, key: bytes, rec: Record) -> Record:
        """``rec``; remembers its expiry for :meth:`take_expiry` when it has one.

        Whether it has expired is Redis's to say (its ``PX``, on the server's
        clock): a value Redis still returns is a hit, so a reader whose clock
        runs ahead never refuses a value that blocks a claim.
        """
        if rec.expires < math.inf:
            if len(self._expiry) >= 100_000:  # nobody asks: do not grow without end
                self._expiry.clear()
            self._expiry[key] = rec.expires
        return rec

    def take_expiry(self, key: bytes) -> float:
        """When the value last read for ``key`` expires (``math.inf``: never, or not read)."""
        return self._expiry.pop(key, math.inf)

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
                if rec.expires < math.inf:
                    self._fresh(key, rec)
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
        replies = await self._batch.get_blobs(keys)
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

    async def put_many(self, records: Sequence[Record]) -> None:
        """Write the records (SET with optional PX ttl), ``batch_size`` per round trip.

        Each round trip also publishes one event that wakes the waiters on its
        keys. Writing the same record twice is harmless; the last write of a
        key wins. Raises ``StoreError`` when Redis fails (some may already be
        written; retrying all of them is safe).
        """
        await self._writes.put_many(records)

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
            [
                (
                    "script",
                    "claim",
                    [lkey, self.value_key(key)],
                    [token, ms(ttl), self._magic, self._magic_exp],
                )
            ],
            on_orphan=orphan,
        )
        won = bool(got)
        self._counts["claims_won" if won else "claims_lost"] += 1
        return RedisLease(self, key, token, float(ttl)) if won else None

    async def lease_token(self, key: bytes) -> str | None:
        """The token of the lease on ``key`` now (None: nobody holds it)."""
        (raw,) = await self._submit([("GET", self.lease_key(key))])
        if raw is None or isinstance(raw, str):
            return raw
        return bytes(raw).decode("utf-8", "replace")

    # -- waiting ------------------------------------------------------------
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
        return await self._waits.wait_for(key, timeout)
