"""Completion: a task the engine ran has finished; its outcome goes where it must.

The table takes the outcome, the task's flight hands it to the followers,
and a result's record goes to the drain (every store but the one holding
the task's lease) and to that lease's store (``complete``). In
``'task_exit'`` mode the caller waits until the record is durable. A record
is queued before any await, so neither a cancelled caller nor a ``close()``
in between loses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any

from aiomemo import _expiry
from aiomemo._drain import Drain
from aiomemo._exceptions import LeaderCancelledError
from aiomemo._expiry import NO_TTL, expires_of, task_ttl
from aiomemo._flights import Flights
from aiomemo._forget import ByFunc
from aiomemo._leases import SharedTier
from aiomemo._lifecycle import Life, Lifecycle
from aiomemo._recorder import RecordMaker
from aiomemo._records import ValueRef
from aiomemo._table import MISSING, MemoTable, Raised
from aiomemo.stores._base import Record, Store

__all__ = ["Completion"]


class Completion:
    """The ``update_memo_*`` and checkpoint-queueing paths of one Memoizer."""

    __slots__ = (
        "_by_func",
        "_drain",
        "_flights",
        "_life",
        "_records",
        "_shared",
        "_table",
        "mode",
        "ttl",
    )

    def __init__(
        self,
        life: Life,
        mode: str | None,
        table: MemoTable,
        flights: Flights,
        records: RecordMaker,
        drain: Drain,
        shared: SharedTier,
        *,
        ttl: float | None = None,
        by_func: ByFunc | None = None,
    ) -> None:
        self.ttl = ttl
        self._by_func = by_func if by_func is not None else ByFunc()
        self._life = life
        self.mode = mode
        self._table = table
        self._flights = flights
        self._records = records
        self._drain = drain
        self._shared = shared

    def result(self, task: Mapping[str, Any], key: str, r: Any) -> Awaitable[None] | None:
        """``task`` (hex ``key``) finished with ``r``: table, followers, record, store.

        Returns what the caller must await before it returns (in
        ``'task_exit'`` mode: the record made durable; without a shared
        store that is the batch's Future itself, no coroutine), or None:
        nothing to wait for.
        """
        mode = self.mode
        self._table.put(key, r)
        name = self._records.name_of(task.get("func"))
        raw = bytes.fromhex(key)
        expires = self._expiry_of(task, key, name, raw)
        flight = self._flights.finish(key, value=r)  # followers get it
        lease_store = flight.lease_store if flight is not None else None
        if mode is None and (flight is None or flight.lease is None):
            # nothing to write or publish: a later manual checkpoint() encodes it
            return None
        record = self._records.make(task, key, r, expires, name=name, raw=raw)
        if record is None:
            if flight is not None:
                self._shared.release_flight(flight)
            return None
        if mode is not None:
            self.queue(record, key, skip=lease_store)
        publish = None
        if flight is not None and flight.lease is not None and lease_store is not None:
            publish = self._shared.complete(lease_store, flight.lease, record)
        if mode == "task_exit":
            if publish is not None:
                return self._durable(record, publish)
            if self._life.state is not Lifecycle.STARTED or self._drain.stopping:
                return None  # closing: the final pass writes it
            loop = self._life.loop
            assert loop is not None
            # bytes let go of before (expired entries) may go back to the
            # system; the encoded record's own go once it is durable, when
            # nothing holds it any more (spill() trims then)
            self._table.trim_if_due()
            return self._drain.commit(loop)  # one Future shared by the batch's callers
        if (
            mode == "periodic"
            and self._life.state is Lifecycle.STARTED
            and self._drain.queued_enough()
        ):
            self._drain.wake()
        return None

    async def _durable(self, record: Record, publish: asyncio.Future[Any] | None) -> None:
        if publish is not None:
            # durable before we return: the shared store has it (or, if it
            # failed, the record is queued for retry like any other); the
            # write itself is never cancelled with its caller
            await asyncio.shield(publish)
        if self._life.state is not Lifecycle.STARTED or self._drain.stopping:
            return  # closed meanwhile, or close() is making the final pass with this record
        loop = self._life.loop
        assert loop is not None
        await self._drain.commit(loop)  # one Future shared by the batch's callers
        # durable, so spilled: once this frame lets go of the encoded
        # record, its bytes can go back to the system
        del record
        self._table.trim_if_due()

    def _expiry_of(self, task: Mapping[str, Any], key: str, name: str, raw: bytes) -> float:
        """The absolute expiry of the result just recorded for ``key`` (noted in the table).

        ``name``: the task's function name; ``raw``: ``key`` as bytes.
        """
        self._by_func.note(name, key)
        ttl = self.ttl if "ttl" not in task else task_ttl(task, self.ttl)
        expires = expires_of(ttl, _expiry.now()) if ttl is not None else NO_TTL
        if expires < NO_TTL or self._table.expires:
            self._table.expire_at(raw, expires)
        return expires

    def exception(self, key: str, e: BaseException) -> None:
        """The task of ``key`` raised ``e`` (memoized for this run) or was stopped (dropped)."""
        if not isinstance(e, Exception):
            what = (
                "cancelled"
                if isinstance(e, asyncio.CancelledError)
                else f"stopped ({type(e).__name__})"
            )
            flight = self._flights.finish(
                key, exc=LeaderCancelledError(f"the identical task {key[:12]}… was {what}")
            )
        else:
            if isinstance(e, StopIteration):
                # a Future refuses StopIteration (as a coroutine turns it into
                # RuntimeError); memoize what awaiting the task would have raised
                wrapped = RuntimeError(f"the task raised StopIteration: {e!r}")
                wrapped.__cause__ = e
                e = wrapped
            self._table.put(key, Raised(e))
            flight = self._flights.finish(key, exc=e)  # followers get it
        if flight is not None:
            self._shared.release_flight(flight)

    # ------------------------------------------------------------ checkpoint queueing
    def queue_finished(self, task: Mapping[str, Any]) -> None:
        """Queue the record of a finished task unless it is queued already (also while closing)."""
        key = task.get("hashsum")
        if not isinstance(key, str) or key in self._drain.queued_keys:
            return
        record = self.finished_record(task, key)
        if record is not None:
            self.queue(record, key)

    def finished_record(self, task: Mapping[str, Any], key: str) -> Record | None:
        """The record of a task that finished with a result (None: no result, or not encodable)."""
        value = self._table.finished(key)
        if value is MISSING or type(value) is Raised:
            return None
        expires = self._table.expires.get(bytes.fromhex(key), NO_TTL)
        return self._records.make(task, key, value, expires)

    def queue(self, record: Record, key: str, skip: Store | None = None) -> None:
        if not self._drain.sinks and self._life.state is Lifecycle.STARTED:
            self._add_default_sink()
        self._drain.queue(record, key, skip)

    async def write_one(self, task: Mapping[str, Any]) -> int:
        """Write one finished task's record now (1), or 0 when it has none."""
        key = task.get("hashsum")
        if not isinstance(key, str):
            return 0
        record = self.finished_record(task, key)
        if record is None:
            return 0
        if not self._drain.sinks:
            self._add_default_sink()
        await self._drain.write_one(record, key)
        return 1

    def _add_default_sink(self) -> None:
        # checkpoint_mode None with a manual checkpoint(): a LogStore on demand
        from aiomemo.stores._log import LogStore

        self._drain.add_sink(LogStore(Path(self._life.run_dir or ".") / "checkpoint"))

    def spill(self, store: Store) -> None:
        """Results this run produced that are now durable in ``store`` may leave memory.

        Their large values sit in a segment (``LogStore``): the index points
        there and the decoded value joins the ones held within memory_limit
        (the same object while held; a fresh copy read back after eviction).
        """
        take = getattr(store, "take_refs", None)
        if take is None:
            return
        refs: dict[bytes, ValueRef] = take()
        for raw, ref in refs.items():
            self._table.spill(raw.hex(), raw, ref)
        del refs
        self._table.trim_if_due()
