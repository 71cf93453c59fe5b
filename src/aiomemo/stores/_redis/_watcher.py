"""The watcher: wait_for's waiters, woken by pub/sub and re-checked in batches.

All the keys a store's callers wait for are watched by one task: one pub/sub
subscription (its reader marks the keys an event names as due), and one
batched round of PTTL + GET for the keys due together (woken, a lease about to
expire, or ``recheck_interval`` passed).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub

from aiomemo._exceptions import StoreError
from aiomemo.stores._redis._config import ERRORS, close_pubsub
from aiomemo.stores._redis._values import parse_key_list

if TYPE_CHECKING:
    from aiomemo.stores._redis._store import RedisStore

__all__ = ["Watcher"]


class _Waiting:
    """The processes' waiters on one key (all answered by the same check)."""

    __slots__ = ("futs", "gen")

    def __init__(self) -> None:
        self.futs: set[asyncio.Future[bytes | None]] = set()
        self.gen = 0


class Watcher:
    """The waiters of one store, indexed by key, and the task that answers them."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._counts = store._counts
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sub_lock: asyncio.Lock | None = None
        self._waiting: dict[bytes, _Waiting] = {}
        self._due: set[bytes] = set()
        self._timers: list[tuple[float, int, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        # a cluster whose channel's master failed to subscribe: not before this
        self._resubscribe_at = 0.0

    def __len__(self) -> int:
        """The keys waited for now."""
        return len(self._waiting)

    def bind_loop(self) -> None:
        """Make the loop-bound primitives in the running loop (at (re)connect)."""
        self._sub_lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def take_tasks(self) -> list[asyncio.Task[None]]:
        """The watch and event-reader tasks, forgotten here (for aclose to cancel)."""
        tasks = [t for t in (self._task, self._reader) if t is not None]
        self._task = self._reader = None
        return tasks

    def fail_waiters(self, err: StoreError) -> None:
        """Fail every waiter with ``err``."""
        for w in self._waiting.values():
            for fut in w.futs:
                if not fut.done():
                    fut.set_exception(err)

    def reset(self) -> PubSub | None:
        """Forget the waiters; return the pub/sub connection for the caller to close."""
        self._waiting.clear()
        self._due.clear()
        self._timers.clear()
        self._resubscribe_at = 0.0
        pubsub, self._pubsub = self._pubsub, None
        return pubsub

    async def _ensure_subscribed(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        client = self._store._conn()
        assert self._sub_lock is not None
        async with self._sub_lock:
            if self._reader is not None and not self._reader.done():
                return
            old, self._pubsub = self._pubsub, None
            if old is not None:
                await close_pubsub(old)
            pubsub = client.pubsub()
            try:
                if self._store.cluster:
                    await self._store._call("SSUBSCRIBE", pubsub.ssubscribe(self._store.channel))
                else:
                    await self._store._call("SUBSCRIBE", pubsub.subscribe(self._store.channel))
                # Wait for the confirmation: only then is no later publish missed.
                deadline = (
                    time.monotonic() + self._store.connect_timeout + self._store.socket_timeout
                )
                want = "ssubscribe" if self._store.cluster else "subscribe"
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreError(f"Redis {want} not confirmed at {self._store._safe_url()}")
                    msg = await self._store._call(want, self._next_message(pubsub, left))
                    if self._store._closed:
                        # aclose() cancelled us meanwhile, and redis-py's read
                        # can swallow a cancellation that meets its own
                        # timeout: no reader may outlive the store
                        raise StoreError(f"{self._store!r} was closed")
                    if msg is not None and msg.get("type") == want:
                        break
            except BaseException:
                await close_pubsub(pubsub)
                raise
            self._pubsub = pubsub
            self._reader = asyncio.create_task(
                self._read_events(pubsub), name="aiomemo-redis-events"
            )

    async def _next_message(self, pubsub: Any, wait: float | None) -> dict[str, Any] | None:
        # the next pub/sub message, waiting up to ``wait`` seconds (None: no limit)
        if self._store.cluster:
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
        except ERRORS as exc:
            # Lost the subscription: every waiter re-checks (the watcher
            # re-subscribes first, or reports the StoreError).
            self._counts["errors"] += 1
            self._store.last_error = f"event listener: {type(exc).__name__}: {exc}"
            self._due.update(self._waiting)
            self._wake_watcher()

    def _wake_watcher(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:  # noqa: ASYNC109
        """RedisStore.wait_for (see there): register a waiter and await its answer."""
        loop = self._store._own_loop()
        self._counts["waits"] += 1
        fut: asyncio.Future[bytes | None] = loop.create_future()
        w = self._waiting.get(key)
        if w is None:
            w = self._waiting[key] = _Waiting()
        w.futs.add(fut)
        self._due.add(key)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="aiomemo-redis-watch")
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
        return min(0.05, self._store.recheck_interval / 10)

    async def _watch(self) -> None:
        """The one task that checks every waited-for key: batched, when due."""
        wake = self._wake
        assert wake is not None
        # re-checks due within ``slack`` of each other go in the same round
        slack = self._slack()
        while not self._store._closed:
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
        if time.monotonic() >= self._resubscribe_at:
            try:
                await self._ensure_subscribed()
            except StoreError as exc:
                if not self._store.cluster:
                    for k in due:
                        self._answer(k, exc)
                    return
                # The master of the channel's slot is down: the keys' own
                # masters may well answer, so they are checked all the same,
                # and re-checked every recheck_interval (no wake-ups) until
                # the subscription is back; tried again no sooner than that.
                self._resubscribe_at = time.monotonic() + self._store.recheck_interval
        self._counts["wait_rounds"] += 1
        self._counts["wait_checks"] += len(due)
        # The lease first, then the value: the two reads are pipelined, not
        # atomic, and a completion sets the value before it drops the lease (one
        # script). So "no lease" read first means any completion before it is
        # visible to the value read after it; value then lease could read
        # "no value" just before a completion and "no lease" just after it.
        futs = [
            self._store._submit(
                [("PTTL", self._store.lease_key(k)), ("GET", self._store.value_key(k))]
            )
            for k in due
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
            lease_ms, blob = reply
            rec, drop = self._store._check(k, blob)
            if drop is not None:
                self._store._background(drop)
            if rec is not None:
                self._answer(k, rec.value)
            elif lease_ms == -2:  # no lease: nobody computes it
                self._answer(k, None)
            else:
                nap = self._store.recheck_interval
                if lease_ms > 0:
                    # look again right after the lease would expire: a dead
                    # holder is noticed within its lease time, a live one
                    # renews before that (every ttl/3), so this is no busy poll
                    # (+ slack: a round taken up to ``slack`` early is still after it)
                    nap = min(nap, lease_ms / 1000 + 0.01 + self._slack())
                w.gen += 1
                heapq.heappush(self._timers, (now + nap, w.gen, k))
