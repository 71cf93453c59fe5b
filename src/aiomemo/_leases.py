"""Shared stores: results other processes made, and leases that collapse work across them.

:class:`SharedTier` asks the shared stores for a result on a local miss,
claims a :class:`~aiomemo.stores.Lease` when one of them is a
:class:`~aiomemo.stores.LeaseStore`, keeps it alive while the task runs
(renewal every ``ttl / 3``), and completes or releases it in the
background. A follower of another process's task waits for its result.
Store failures never fail a task: they are counted and the local memo goes
on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiomemo import _codec
from aiomemo._counters import Counters
from aiomemo._exceptions import LeaderCancelledError, MemoizerClosedError, StoreError
from aiomemo._flights import Flight, Flights, follow
from aiomemo._table import MISSING, MemoTable
from aiomemo.stores._base import Lease, LeaseStore, Record, Store

__all__ = ["SharedTier"]

logger = logging.getLogger("aiomemo")


class SharedTier:
    """The shared stores of a Memoizer and the background work their leases need."""

    __slots__ = (
        "_bg",
        "_counters",
        "_flights",
        "_table",
        "_waits",
        "lease_stores",
        "on_publish_failed",
        "stores",
        "ttl",
    )

    def __init__(
        self,
        stores: Sequence[Store],
        counters: Counters,
        ttl: float,
        on_publish_failed: Callable[[Store, Record, BaseException], None],
        table: MemoTable,
        flights: Flights,
    ) -> None:
        self._table = table
        self._flights = flights
        self.stores: list[Store] = []
        self.lease_stores: list[LeaseStore] = []
        self.use(stores)
        self.ttl = ttl
        self._counters = counters
        self.on_publish_failed = on_publish_failed
        self._bg: set[asyncio.Future[Any]] = set()  # completions and releases
        self._waits: set[asyncio.Future[Any]] = set()  # followers of other processes

    def use(self, stores: Sequence[Store]) -> None:
        """Ask the shared ones of ``stores`` (the Memoizer's, once open)."""
        self.stores = [s for s in stores if s.shared]
        self.lease_stores = [s for s in self.stores if isinstance(s, LeaseStore)]

    def __bool__(self) -> bool:
        return bool(self.stores)

    async def lookup(self, key: str, raw: bytes, flight: Flight) -> asyncio.Future[Any] | None:
        """A local miss that leads ``flight``: another process's result, or its running task.

        Returns the settled flight's Future on a shared hit, a follower's
        Future when another process holds the lease, or None: run it here
        (holding the lease, when one could be taken).
        """
        enc = await self.fetch(raw)
        if enc is not None:
            value = self._decode(key, enc)
            if value is not MISSING:
                self._flights.finish(key, flight, value=value)
                self._counters.hits += 1
                self._counters.remote_hits += 1
                return flight.future
            self._counters.misses += 1
            return None
        if self._flights.collapse:
            lease, store = await self.claim(raw)
            if lease is not None and store is not None:
                flight.lease, flight.lease_store = lease, store
                flight.renewal = self.renew_forever(store, lease, key)
            elif store is not None:
                # another process runs it: wait for its result
                self.spawn_wait(self._follow_remote(store, key, raw, flight))
                self._counters.collapsed += 1
                return follow(flight.future, asyncio.get_running_loop())
        self._counters.misses += 1
        return None

    def _decode(self, key: str, enc: bytes) -> Any:
        try:
            value = _codec.decode(enc)
        except _codec.CodecError as exc:
            self._counters.load_errors += 1
            logger.warning("shared result for %s could not be decoded: %s", key, exc)
            return MISSING
        self._table.put(key, value)
        # the shared value's own expiry, when its store tells (RedisStore does)
        raw = bytes.fromhex(key)
        expires = math.inf
        for store in self.stores:
            take = getattr(store, "take_expiry", None)
            if take is not None:
                expires = min(expires, take(raw))
        if expires < math.inf or self._table.expires:
            self._table.expire_at(raw, expires)
        return value

    async def _follow_remote(self, store: LeaseStore, key: str, raw: bytes, flight: Flight) -> None:
        try:
            enc = await self.wait_remote(store, raw)
        except asyncio.CancelledError:
            self._flights.finish(key, flight, exc=MemoizerClosedError("closed while waiting"))
            raise
        if flight.future.done():
            self._flights.finish(key, flight)
            return
        value = self._decode(key, enc) if enc is not None else MISSING
        if value is not MISSING:
            self._counters.remote_hits += 1
            self._flights.finish(key, flight, value=value)
            return
        # the remote holder died or gave up: followers resubmit, one takes over
        self._flights.finish(
            key,
            flight,
            exc=LeaderCancelledError("the process running this task stopped before it finished"),
        )

    def error(self, store: Store, exc: BaseException) -> None:
        """Count a store failure (logged on the first and every 1000th)."""
        self._counters.store_errors += 1
        n = self._counters.store_errors
        if n == 1 or n % 1000 == 0:
            logger.warning(
                "%s unavailable (%s); carrying on with the local memo", type(store).__name__, exc
            )

    async def fetch(self, raw: bytes) -> bytes | None:
        """The first shared store's encoded result for ``raw``, or None."""
        for store in self.stores:
            try:
                enc = await store.get(raw)
            except StoreError as exc:
                self.error(store, exc)
                continue
            if enc is not None:
                return enc
        return None

    async def claim(self, raw: bytes) -> tuple[Lease | None, LeaseStore | None]:
        """Claim ``raw`` on the first lease store that answers.

        Returns ``(lease, store)`` when taken, ``(None, store)`` when another
        holder has it there, ``(None, None)`` when no lease store could
        answer (the caller runs the task unclaimed).
        """
        for store in self.lease_stores:
            try:
                lease = await store.claim(raw, self.ttl)
            except StoreError as exc:
                self.error(store, exc)
                continue
            return lease, store
        return None, None

    def renew_forever(self, store: Store, lease: Lease, key: str) -> asyncio.Task[None]:
        """Keep ``lease`` alive until the task is cancelled (the flight ends)."""
        return asyncio.create_task(self._renew(store, lease, key))

    async def _renew(self, store: Store, lease: Lease, key: str) -> None:
        interval = lease.ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await lease.renew():
                    logger.warning("lease on %s was lost; another process may run it too", key)
                    return
            except StoreError as exc:
                self.error(store, exc)

    async def wait_remote(self, store: LeaseStore, raw: bytes) -> bytes | None:
        """Wait for another process's result for ``raw``; None when its holder gave up."""
        try:
            while True:
                # wait_for returns early with None only when the lease is gone;
                # a None after the full wait means the holder is still running
                window = max(self.ttl * 2, 1.0)
                t0 = time.monotonic()
                enc = await store.wait_for(raw, window)
                if enc is not None or time.monotonic() - t0 < window * 0.9:
                    break
            if enc is None:
                try:
                    enc = await store.get(raw)
                except StoreError:
                    enc = None
        except Exception as exc:  # StoreError, or anything a store does wrong
            self.error(store, exc)
            return None
        return enc

    def spawn_wait(self, coro: Awaitable[Any]) -> None:
        """Run a remote wait in the background (close() cancels these at once)."""
        self._spawn(coro, self._waits)

    def complete(self, store: Store, lease: Lease, record: Record) -> asyncio.Future[Any]:
        """Publish ``record`` and let ``lease`` go, in the background."""
        return self._spawn(self._complete(store, lease, record), self._bg)

    async def _complete(self, store: Store, lease: Lease, record: Record) -> None:
        try:
            # the result and the lease's release in one step: waiters never
            # see the lease gone without the result
            await lease.complete(record)
        except Exception as exc:  # StoreError, or anything a store does wrong
            self.error(store, exc)
            self.on_publish_failed(store, record, exc)  # the drain retries it
            await self._release(store, lease)

    def release_flight(self, flight: Flight) -> None:
        """Let the lease ``flight`` holds (if any) go, in the background."""
        if flight.lease is not None and flight.lease_store is not None:
            self.release(flight.lease_store, flight.lease)

    def release(self, store: Store, lease: Lease) -> None:
        """Let ``lease`` go in the background (the task failed or was cancelled)."""
        self._spawn(self._release(store, lease), self._bg)

    async def _release(self, store: Store, lease: Lease) -> None:
        try:
            await lease.release()
        except Exception as exc:  # the lease then expires by itself
            self.error(store, exc)

    def _spawn(self, coro: Awaitable[Any], into: set[asyncio.Future[Any]]) -> asyncio.Future[Any]:
        t = asyncio.ensure_future(coro)
        into.add(t)
        t.add_done_callback(into.discard)
        return t

    def stop_waits(self) -> None:
        """Followers of other processes' tasks stop waiting (close)."""
        for w in list(self._waits):
            w.cancel()

    async def settle(self, seconds: float) -> None:
        """Give background completions a moment (bounded) so shared results land."""
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=seconds)

    def cancel_all(self) -> None:
        for t in list(self._bg):
            t.cancel()
