"""How records become Redis writes: SET with an expiry, DEL, and forgetting a function.

A record is SET with ``PX`` the sooner of the store's ``ttl`` and the
record's own expiry, or DELeted when it expired on the way or is a key
tombstone. A function tombstone SCANs the store's namespace and deletes the
function's values recorded at or before it (each read and checked first).
Used by :meth:`RedisStore.put_many` and by a lease's ``complete``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiomemo import _records
from aiomemo.stores._base import Record
from aiomemo.stores._redis._batcher import PIPELINE_BYTES, Cmd, cmd_bytes
from aiomemo.stores._redis._lease import ms
from aiomemo.stores._redis._values import decode_value, encode_value

if TYPE_CHECKING:
    from aiomemo.stores._redis._store import RedisStore

__all__ = ["Writes"]


class Writes:
    """The write side of one store (its client, namespace, key and counters)."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    def px(self, rec: Record | None = None) -> int | None:
        """Milliseconds the value of ``rec`` lives: the store's ttl or the record's expiry, sooner.

        0: the record has expired already (it is not written). None: no expiry.
        """
        px = None if self._store.ttl is None else ms(self._store.ttl)
        if rec is not None and rec.expires < math.inf:
            left = round((rec.expires - _records.clock()) * 1000)
            if left <= 0:
                return 0
            px = left if px is None else min(px, left)
        return px

    def set_cmd(self, rec: Record) -> Cmd:
        if rec.tombstone == "key":
            return ("DEL", self._store.value_key(rec.key))
        px = self.px(rec)
        if px == 0:  # expired on the way: what a reader would find is a miss
            return ("DEL", self._store.value_key(rec.key))
        blob = encode_value(rec, self._store._mac_key)
        if px is None:
            return ("SET", self._store.value_key(rec.key), blob)
        return ("SET", self._store.value_key(rec.key), blob, "PX", px)

    async def forget_func(self, tomb: Record) -> int:
        """Delete every value of function ``tomb.func`` recorded at or before ``tomb.time``.

        A SCAN of this store's namespace (a function tombstone is rare); each
        value is read and checked (its tag too) before it goes. Returns how
        many were deleted.
        """
        client = self._store._conn()
        pattern = self._store._ns + b":r:*"
        deleted = 0
        try:
            batch: list[bytes] = []
            async for name in client.scan_iter(match=pattern, count=1000):
                batch.append(name)
                if len(batch) >= 500:
                    deleted += await self._forget_some(client, batch, tomb)
                    batch = []
            if batch:
                deleted += await self._forget_some(client, batch, tomb)
        except Exception as exc:
            raise self._store._error("forget", exc) from exc
        return deleted

    async def _forget_some(self, client: Any, names: list[bytes], tomb: Record) -> int:
        gone = []
        for name in names:  # one GET each: keys of a cluster live on different nodes
            blob = await client.get(name)
            if blob is None:
                continue
            hexkey = name.rsplit(b"{", 1)[-1].rstrip(b"}")
            try:
                key = bytes.fromhex(hexkey.decode())
            except ValueError:
                continue
            rec = decode_value(key, blob, self._store._mac_key)
            if rec is not None and rec.func == tomb.func and rec.time <= tomb.time:
                gone.append(name)
        for name in gone:
            await client.delete(name)
        return len(gone)

    def _chunks(self, records: Sequence[Record]) -> list[tuple[list[Record], list[Cmd], int]]:
        """``records`` cut at ``batch_size`` records or PIPELINE_BYTES: each chunk's
        records, their commands and the commands' bytes."""
        size = self._store.batch_size
        chunks: list[tuple[list[Record], list[Cmd], int]] = []
        recs: list[Record] = []
        cmds: list[Cmd] = []
        nbytes = 0
        for r in records:
            cmd = self.set_cmd(r)
            n = cmd_bytes((cmd,))
            if recs and (len(recs) >= size or nbytes + n > PIPELINE_BYTES):
                chunks.append((recs, cmds, nbytes))
                recs, cmds, nbytes = [], [], 0
            recs.append(r)
            cmds.append(cmd)
            nbytes += n
        if recs:
            chunks.append((recs, cmds, nbytes))
        return chunks

    async def put_many(self, records: Sequence[Record]) -> None:
        """Write the records (SET with optional PX ttl), ``batch_size`` per round trip at most.

        A round trip carries at most PIPELINE_BYTES of values (a larger
        value goes alone), so that each one can be sent within
        ``socket_timeout``.

        Each round trip also publishes one event that wakes the waiters on its
        keys. Writing the same record twice is harmless; the last write of a
        key wins. Raises ``StoreError`` when Redis fails (some may already be
        written; retrying all of them is safe).
        """
        store = self._store
        funcs = [r for r in records if r.tombstone == "func"]
        if funcs:
            for tomb in funcs:
                store._counts["forgotten"] += await self.forget_func(tomb)
            records = [r for r in records if r.tombstone != "func"]
        if not records:
            return
        chunks = self._chunks(records)
        futs = [
            store._submit(cmds, wake=[r.key for r in c], weight=len(c), nbytes=n)
            for c, cmds, n in chunks
        ]
        replies = await asyncio.gather(*futs, return_exceptions=True)
        store._counts["put_batches"] += len(chunks)
        error = None
        for (c, _, _), got in zip(chunks, replies, strict=True):
            if isinstance(got, BaseException):
                error = error or got
            else:
                store._counts["puts"] += len(c)
        if error is not None:
            raise error
