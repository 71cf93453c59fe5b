"""The store contract: where finished results go, and where a run finds them.

A :class:`Store` holds :class:`Record` s: a key (the raw digest, not hex), the
result encoded by aiomemo's codec (opaque bytes here), the function's name and
the time it finished. The Memoizer owns one or more stores:

* ``load()`` once at start: everything the store already holds that a run
  should begin with (a local log's own segments, a MemoryStore's dict).
  Shared stores (``shared = True``, e.g. Redis) return nothing here and are
  asked per key with ``get()`` on a local miss instead.
* ``put_many()`` from the drain task: durable when it returns; on failure it
  raises :class:`~aiomemo.StoreError` (or ``CheckpointError``) and the caller
  keeps the records queued and retries them all later (a store must accept
  the same record twice; the newest record per key wins).
* :class:`LeaseStore` s (shared stores that collapse identical work across
  processes) also hand out :class:`Lease` s with ``claim()`` and let other
  processes ``wait_for()`` the holder's result.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from aiomemo._records import LoadReport, Record  # re-exported: defined in the format layer

__all__ = ["Lease", "LeaseStore", "LoadReport", "Record", "Store"]


class Store(abc.ABC):
    """Base class of every store (an async context manager).

    Subclasses implement :meth:`put_many` and usually :meth:`load` or
    :meth:`get`; the rest has working defaults.
    """

    #: other processes see what this store holds (consult ``get`` on a local miss)
    shared: ClassVar[bool] = False

    async def open(self, *, run_dir: Path | None = None) -> None:  # noqa: B027
        """Get ready. ``run_dir`` is the Memoizer's run directory (not created yet)."""

    async def aclose(self) -> None:  # noqa: B027
        """Release resources. Idempotent."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def load(self) -> LoadReport:
        """Everything this store holds that a run should start with."""
        return LoadReport()

    async def get(self, key: bytes) -> bytes | None:
        """The encoded result for ``key``, or None (shared stores)."""
        return None

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        """Encoded results for the keys that are present."""
        out: dict[bytes, bytes] = {}
        for k in keys:
            v = await self.get(k)
            if v is not None:
                out[k] = v
        return out

    @abc.abstractmethod
    async def put_many(self, records: Sequence[Record]) -> None:
        """Store the records durably; raise StoreError/CheckpointError on failure."""


class Lease(abc.ABC):
    """A claim on one key by one holder, returned by :meth:`LeaseStore.claim`.

    The lease owns its token (as redis-py's asyncio ``Lock`` does): only the
    holder can renew, release or complete it. It expires by itself ``ttl``
    seconds after the last renewal, so a holder that dies frees the key.
    """

    __slots__ = ("key", "token", "ttl")

    def __init__(self, key: bytes, token: str, ttl: float) -> None:
        self.key = key
        self.token = token
        self.ttl = ttl

    @abc.abstractmethod
    async def renew(self) -> bool:
        """Extend the lease by ``ttl``; False when it was lost (expired or taken)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the lease up (the task failed or was cancelled). Idempotent."""

    @abc.abstractmethod
    async def complete(self, record: Record) -> bool:
        """Store the holder's result and release, atomically where the store can.

        The record is stored either way; returns whether the lease was still held.
        """


class LeaseStore(Store):
    """A shared store that also collapses identical work across processes."""

    shared: ClassVar[bool] = True

    @abc.abstractmethod
    async def claim(self, key: bytes, ttl: float) -> Lease | None:
        """Take the lease on ``key`` for ``ttl`` seconds.

        Returns the :class:`Lease`, or None when another holder has it or the
        result already exists (then :meth:`wait_for` / :meth:`get`).
        """

    @abc.abstractmethod
    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:  # noqa: ASYNC109
        """Wait until ``key`` has a result (return it) or its lease is gone (None).

        None also when ``timeout`` passes first; the caller then claims again.
        """
