"""MemoryStore: records kept in a dict (tests, and runs that want no disk)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aiomemo import _records
from aiomemo._records import NEVER
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
        """A copy of the table (key -> encoded value), expired records left out."""
        now = _records.clock()
        rep = LoadReport()
        for k, r in self._records.items():
            if r.expires <= now:
                rep.expired += 1
                continue
            rep.table[k] = r.value
            if r.expires < NEVER:
                rep.expires[k] = r.expires
        rep.records = len(rep.table)
        return rep

    async def get(self, key: bytes) -> bytes | None:
        """The encoded value for ``key``, or None (also once it has expired)."""
        r = self._records.get(key)
        if r is None or r.expires <= _records.clock():
            return None
        return r.value

    async def put_many(self, records: Sequence[Record]) -> None:
        """Keep ``records``; a later record for a key replaces the earlier one.

        A tombstone removes what it forgets (records written at or before its time).
        """
        for r in records:
            kind = r.tombstone
            if kind == "key":
                old = self._records.get(r.key)
                if old is not None and old.time <= r.time:
                    del self._records[r.key]
            elif kind == "func":
                for k in [k for k, o in self._records.items() if o.func == r.func and o.time <= r.time]:
                    del self._records[k]
            else:
                self._records[r.key] = r
