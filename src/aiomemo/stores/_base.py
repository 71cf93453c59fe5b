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
* ``claim()/renew()/release()/wait_for()``: optional cross-process collapse
  (``supports_claims = True``).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from aiomemo._records import LoadReport, Record  # re-exported: defined in the format layer

__all__ = ["LoadReport", "Record", "Store"]


class Store(abc.ABC):
    """Base class of every store (an async context manager).

    Subclasses implement :meth:`put_many` and usually :meth:`load` or
    :meth:`get`; the rest has working defaults.
    """

    #: other processes see what this store holds (consult ``get`` on a local miss)
    shared: ClassVar[bool] = False
    #: implements claim/renew/release/wait_for (cross-process collapse)
    supports_claims: ClassVar[bool] = False

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

    # -- cross-process collapse (optional) ---------------------------------
    async def claim(self, key: bytes, owner: str, ttl: float) -> bool:
        """Take the lease on ``key`` for ``ttl`` seconds; True when taken."""
        return True

    async def renew(self, key: bytes, owner: str, ttl: float) -> bool:
        """Extend a lease this owner holds; False when it was lost."""
        return True

    async def release(self, key: bytes, owner: str) -> None:  # noqa: B027
        """Give the lease up (the task finished, failed or was cancelled)."""

    async def put_and_release(self, record: Record, owner: str) -> bool:
        """Store a leader's result and drop its lease (stores may do it atomically).

        Returns whether the lease was still ``owner``'s. The default calls
        :meth:`put_many` then :meth:`release`.
        """
        await self.put_many([record])
        await self.release(record.key, owner)
        return True

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:  # noqa: ASYNC109
        """Wait until ``key`` has a result (return it) or its lease is gone (None)."""
        return None
