"""Fault-injecting stores for testing engines (and stores) built on aiomemo.

Everything here is built on the public store API only (:class:`~aiomemo.stores.Store`,
:class:`~aiomemo.stores.LeaseStore`, :class:`~aiomemo.stores.Lease`), the way a
store of your own would be, so what passes against these passes against any
store that keeps the contract::

    from aiomemo import Memoizer
    from aiomemo.testing import FailingStore

    store = FailingStore(failures=2)        # the first two writes fail
    async with Memoizer(checkpoint_mode="task_exit", store=store) as memo:
        ...                                  # the Memoizer retries; nothing is lost
    assert store.failed == 2 and len(store.inner.records) == n

* :class:`FailingStore`: writes raise :class:`~aiomemo.StoreError` N times
  (or until :meth:`~FailingStore.heal`).
* :class:`StallingStore`: writes (or reads) stall for a given time, or until
  released.
* :class:`DiskFullStore`: writes fail once a byte budget is spent, storing
  nothing of the failing batch (as a disk-full ``LogStore`` rolls back).
* :class:`MemoryLeaseStore`: an in-memory :class:`~aiomemo.stores.LeaseStore`:
  share one between several Memoizers to test cross-process collapse without
  Redis; :meth:`~MemoryLeaseStore.expire` makes a holder lose its lease.

The wrappers keep their records in ``inner`` (a
:class:`~aiomemo.stores.MemoryStore` unless another store is given). All of
them are for one event loop at a time, like the Memoizer itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from aiomemo._exceptions import StoreError
from aiomemo.stores import Lease, LeaseStore, LoadReport, MemoryStore, Record, Store

__all__ = [
    "DiskFullStore",
    "FailingStore",
    "MemoryLeaseStore",
    "StallingStore",
    "WrappedStore",
    "record_size",
]


class WrappedStore(Store):
    """A store that passes every call through to ``inner`` (the base of the fault injectors).

    Subclass it and override the calls to disturb; ``inner`` defaults to a
    fresh :class:`~aiomemo.stores.MemoryStore`.
    """

    def __init__(self, inner: Store | None = None) -> None:
        """Wrap ``inner`` (no I/O)."""
        self.inner: Store = inner if inner is not None else MemoryStore()

    @property
    def records(self) -> Mapping[bytes, Record]:
        """What ``inner`` holds, when it is a MemoryStore (else empty)."""
        inner = self.inner
        return inner.records if isinstance(inner, MemoryStore) else {}

    async def open(self, *, run_dir: Path | None = None) -> None:
        """Open ``inner``."""
        await self.inner.open(run_dir=run_dir)

    async def aclose(self) -> None:
        """Close ``inner``."""
        await self.inner.aclose()

    async def load(self) -> LoadReport:
        """``inner``'s load."""
        return await self.inner.load()

    async def get(self, key: bytes) -> bytes | None:
        """``inner``'s get."""
        return await self.inner.get(key)

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        """``inner``'s get_many."""
        return await self.inner.get_many(keys)

    async def put_many(self, records: Sequence[Record]) -> None:
        """``inner``'s put_many."""
        await self.inner.put_many(records)


class FailingStore(WrappedStore):
    """Writes fail the first ``failures`` times (``None``: until :meth:`heal`).

    A failing ``put_many`` stores nothing and raises what ``error`` makes
    (default: :class:`~aiomemo.StoreError` "injected write failure k of n").
    ``attempts`` counts every ``put_many`` call, ``failed`` the ones that raised.
    """

    def __init__(
        self,
        inner: Store | None = None,
        *,
        failures: int | None = 1,
        error: Callable[[int], BaseException] | None = None,
    ) -> None:
        """``error(k)`` builds the exception for the k-th failure (1-based)."""
        super().__init__(inner)
        if failures is not None and failures < 0:
            raise ValueError(f"failures must be >= 0 or None, not {failures}")
        self.failures = failures
        self.error = error
        self.attempts = 0
        self.failed = 0

    def heal(self) -> None:
        """Make every later write succeed."""
        self.failures = self.failed

    async def put_many(self, records: Sequence[Record]) -> None:
        """Fail (storing nothing) while failures remain, else pass through."""
        self.attempts += 1
        if self.failures is None or self.failed < self.failures:
            self.failed += 1
            if self.error is not None:
                raise self.error(self.failed)
            of = "" if self.failures is None else f" of {self.failures}"
            raise StoreError(f"injected write failure {self.failed}{of} ({len(records)} records)")
        await super().put_many(records)


class StallingStore(WrappedStore):
    """Calls named in ``methods`` stall: ``seconds`` each, or until :meth:`release`.

    ``methods`` is a subset of ``{"put_many", "get", "get_many", "load",
    "open"}`` (default: writes only). ``waiting`` is how many calls are
    stalled right now and ``stalled`` how many ever were; :meth:`wait_stalled`
    returns once ``n`` calls are waiting. A stalled call that is cancelled
    stores nothing.
    """

    _METHODS = frozenset({"put_many", "get", "get_many", "load", "open"})

    def __init__(
        self,
        inner: Store | None = None,
        *,
        seconds: float | None = None,
        methods: Collection[str] = ("put_many",),
    ) -> None:
        """``seconds=None`` stalls until :meth:`release` is called."""
        super().__init__(inner)
        unknown = set(methods) - self._METHODS
        if unknown:
            raise ValueError(
                f"unknown methods {sorted(unknown)}; choose from {sorted(self._METHODS)}"
            )
        if seconds is not None and seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
        self.seconds = seconds
        self.methods = frozenset(methods)
        self.waiting = 0
        self.stalled = 0
        self._released: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None

    def release(self) -> None:
        """Let every stalled call (and every later one) go on."""
        self.seconds = 0.0
        if self._released is not None:
            self._released.set()

    async def wait_stalled(self, n: int = 1) -> None:
        """Return once at least ``n`` calls are stalled."""
        while self.waiting < n:
            self._changed = self._changed or asyncio.Event()
            await self._changed.wait()
            self._changed.clear()

    async def _stall(self, method: str) -> None:
        if method not in self.methods or self.seconds == 0.0:
            return
        self.waiting += 1
        self.stalled += 1
        if self._changed is not None:
            self._changed.set()
        try:
            if self.seconds is None:
                self._released = self._released or asyncio.Event()
                await self._released.wait()
            else:
                await asyncio.sleep(self.seconds)
        finally:
            self.waiting -= 1

    async def open(self, *, run_dir: Path | None = None) -> None:
        """Stall (if asked), then open ``inner``."""
        await self._stall("open")
        await super().open(run_dir=run_dir)

    async def load(self) -> LoadReport:
        """Stall (if asked), then load ``inner``."""
        await self._stall("load")
        return await super().load()

    async def get(self, key: bytes) -> bytes | None:
        """Stall (if asked), then ``inner``'s get."""
        await self._stall("get")
        return await super().get(key)

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        """Stall (if asked), then ``inner``'s get_many."""
        await self._stall("get_many")
        return await super().get_many(keys)

    async def put_many(self, records: Sequence[Record]) -> None:
        """Stall (if asked), then ``inner``'s put_many."""
        await self._stall("put_many")
        await super().put_many(records)


def record_size(record: Record) -> int:
    """Bytes a record costs against a :class:`DiskFullStore` budget (its fields' lengths)."""
    return len(record.key) + len(record.value) + len(record.func.encode()) + len(record.digests)


class DiskFullStore(WrappedStore):
    """Writes succeed until ``budget`` bytes are used; then the disk is "full".

    A ``put_many`` whose records would pass the budget stores none of them
    and raises :class:`~aiomemo.StoreError` chained from an ``OSError``
    (``ENOSPC``), like a ``LogStore`` that rolls a failed batch back.
    :meth:`free` gives space back (someone cleaned the disk). ``used`` is
    the bytes stored so far (see :func:`record_size`).
    """

    def __init__(self, inner: Store | None = None, *, budget: int) -> None:
        """``budget``: bytes the "disk" holds."""
        super().__init__(inner)
        if budget < 0:
            raise ValueError(f"budget must be >= 0, not {budget}")
        self.budget = budget
        self.used = 0
        self.refused = 0

    def free(self, n: int | None = None) -> None:
        """Add ``n`` bytes to the budget (None: no limit any more)."""
        self.budget = 2**63 if n is None else self.budget + n

    async def put_many(self, records: Sequence[Record]) -> None:
        """Store all of ``records``, or none when they do not fit."""
        need = sum(record_size(r) for r in records)
        if self.used + need > self.budget:
            self.refused += 1
            left = self.budget - self.used
            cause = OSError(errno.ENOSPC, "No space left on device (injected)")
            raise StoreError(
                f"could not store {len(records)} records ({need} bytes, {left} left): disk full"
            ) from cause
        await super().put_many(records)
        self.used += need


class _MemoryLease(Lease):
    __slots__ = ("store",)

    def __init__(self, store: MemoryLeaseStore, key: bytes, token: str, ttl: float) -> None:
        super().__init__(key, token, ttl)
        self.store = store

    async def renew(self) -> bool:
        return self.store._renew(self)

    async def release(self) -> None:
        self.store._drop(self)

    async def complete(self, record: Record) -> bool:
        return await self.store._complete(self, record)


class MemoryLeaseStore(LeaseStore):
    """An in-memory shared store with leases: cross-process collapse without Redis.

    Give the same instance to several Memoizers (each stands in for a
    process): the first to :meth:`claim` a key holds its lease; the others
    :meth:`wait_for` its result, or claim again once the lease expires
    (``ttl`` seconds after the last renewal, by ``time.monotonic``) or is
    released. :meth:`expire` ends a lease now (a holder that stalled past
    its ttl). ``claims``, ``refused_claims`` and ``completions`` count calls;
    ``lost`` counts completions whose lease was no longer held.
    """

    lease_ttl = 30.0

    def __init__(
        self, *, lease_ttl: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``lease_ttl`` is what a Memoizer uses by default; ``clock`` is for tests."""
        self.lease_ttl = lease_ttl
        self._clock = clock
        self._records: dict[bytes, Record] = {}
        self._leases: dict[bytes, tuple[str, float]] = {}  # key -> (token, expiry)
        # one Event per waiting call, dropped when it returns: none outlives its loop
        self._waiters: dict[bytes, set[asyncio.Event]] = {}
        self.claims = 0
        self.refused_claims = 0
        self.completions = 0
        self.lost = 0

    @property
    def records(self) -> Mapping[bytes, Record]:
        """The records held, by key."""
        return self._records

    def holder(self, key: bytes) -> str | None:
        """The token holding ``key``'s lease now, or None."""
        held = self._leases.get(key)
        if held is None or held[1] <= self._clock():
            return None
        return held[0]

    def expire(self, key: bytes) -> None:
        """End ``key``'s lease now, as if its ttl had passed without renewal."""
        if self._leases.pop(key, None) is not None:
            self._notify(key)

    def _notify(self, key: bytes) -> None:
        for ev in self._waiters.get(key, ()):
            ev.set()

    async def get(self, key: bytes) -> bytes | None:
        """The encoded value for ``key``, or None."""
        r = self._records.get(key)
        return r.value if r is not None else None

    async def put_many(self, records: Sequence[Record]) -> None:
        """Keep ``records`` (newest per key wins); waiters on their keys wake up."""
        for r in records:
            self._records[r.key] = r
            self._notify(r.key)

    async def claim(self, key: bytes, ttl: float) -> Lease | None:
        """The lease on ``key`` for ``ttl`` seconds, or None (held elsewhere, or already stored)."""
        self.claims += 1
        if key in self._records or self.holder(key) is not None:
            self.refused_claims += 1
            return None
        token = uuid.uuid4().hex
        self._leases[key] = (token, self._clock() + ttl)
        return _MemoryLease(self, key, token, ttl)

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:  # noqa: ASYNC109
        """``key``'s value once stored; None when its lease is gone or ``timeout`` passes."""
        deadline = self._clock() + timeout
        while True:
            r = self._records.get(key)
            if r is not None:
                return r.value
            held = self._leases.get(key)
            now = self._clock()
            if held is None or held[1] <= now or now >= deadline:
                return None
            ev = asyncio.Event()
            waiters = self._waiters.setdefault(key, set())
            waiters.add(ev)
            try:
                with contextlib.suppress(TimeoutError):  # then look again
                    await asyncio.wait_for(ev.wait(), min(deadline, held[1]) - now)
            finally:
                waiters.discard(ev)
                if not waiters:
                    self._waiters.pop(key, None)

    def _renew(self, lease: Lease) -> bool:
        if self.holder(lease.key) != lease.token:
            return False
        self._leases[lease.key] = (lease.token, self._clock() + lease.ttl)
        return True

    def _drop(self, lease: Lease) -> None:
        held = self._leases.get(lease.key)
        if held is not None and held[0] == lease.token:
            del self._leases[lease.key]
            self._notify(lease.key)

    async def _complete(self, lease: Lease, record: Record) -> bool:
        self.completions += 1
        held = self.holder(lease.key) == lease.token
        if not held:
            self.lost += 1
        if held:
            del self._leases[lease.key]
        await self.put_many([record])
        return held
