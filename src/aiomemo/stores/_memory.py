"""MemoryStore: records kept in a dict (tests, and runs that want no disk)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aiomemo._records import ValueRef
from aiomemo.stores._base import LoadReport, Record, Store

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Keeps the newest record per key in memory for the life of the object.

    ``load()`` returns what it holds (so a second Memoizer given the same
    store starts with the first one's results); ``get`` answers per key.
    Nothing survives the process.
    """

    def __init__(self) -> None:
        """An empty store."""
        self._records: dict[bytes, Record] = {}

    @property
    def records(self) -> Mapping[bytes, Record]:
        """The records held, by key (read-only view)."""
        return self._records

    def __len__(self) -> int:
        return len(self._records)

    async def load(self) -> LoadReport:
        """A copy of the table (key -> encoded value)."""
        table: dict[bytes, bytes | ValueRef] = {k: r.value for k, r in self._records.items()}
        return LoadReport(table=table, records=len(table))

    async def get(self, key: bytes) -> bytes | None:
        """The encoded value for ``key``, or None."""
        r = self._records.get(key)
        return r.value if r is not None else None

    async def put_many(self, records: Sequence[Record]) -> None:
        """Keep ``records``; a later record for a key replaces the earlier one."""
        for r in records:
            self._records[r.key] = r
