"""What a Memoizer reports about its memo: ``stats()``, ``load_checkpoints()``' view, ``explain()``.

Read-only: nothing here changes what a lookup finds, except that
``load_checkpoints`` hands what it read to the table first.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any, NamedTuple

from aiomemo import _metrics
from aiomemo._counters import Counters
from aiomemo._drain import Drain
from aiomemo._lifecycle import Life
from aiomemo._lookup import done_future
from aiomemo._records import KEY_SLICE
from aiomemo._table import MISSING, MemoTable, OnDisk, Raised
from aiomemo.stores._base import LoadReport

if TYPE_CHECKING:
    from aiomemo._explain import Explanation

__all__ = ["LoadedView", "MemoStats", "explain", "load", "stats"]


class MemoStats(NamedTuple):
    """Counters of a Memoizer (``memo.stats()``)."""

    hits: int
    misses: int
    collapsed: int
    entries: int
    checkpointed: int
    pending: int
    unserializable: int
    load_errors: int
    last_checkpoint: float | None
    write_errors: int
    store_errors: int
    remote_hits: int
    #: encoded bytes of results read from disk and held within ``memory_limit``
    bytes_held: int = 0
    #: encoded bytes of loaded results left on disk (read on a hit)
    bytes_on_disk: int = 0
    #: results read back from disk (each verified)
    disk_reads: int = 0
    #: entries dropped because they expired (at load, or on a lookup)
    expired: int = 0
    #: entries dropped by ``forget()`` or by tombstones at load
    forgotten: int = 0


def stats(c: Counters, table: MemoTable, drain: Drain) -> MemoStats:
    return MemoStats(
        hits=c.hits,
        misses=c.misses,
        collapsed=c.collapsed,
        entries=len(table),
        checkpointed=c.checkpointed,
        pending=drain.pending(),
        unserializable=c.unserializable,
        load_errors=c.load_errors,
        last_checkpoint=c.last_checkpoint,
        write_errors=c.write_errors,
        store_errors=c.store_errors,
        remote_hits=c.remote_hits,
        bytes_held=table.held,
        bytes_on_disk=table.bytes_on_disk(),
        disk_reads=table.disk_reads,
        expired=c.expired,
        forgotten=c.forgotten,
    )


class LoadedView(Mapping[str, "asyncio.Future[Any]"]):
    """Read-only view of loaded records as hex key -> Future (decoded on access).

    It reads through ``table``: the Memoizer's own (which may already have
    decoded an entry), or a private one when the Memoizer keeps nothing
    (``memoize=False``). A result in memory (or small enough to sit in the
    index) comes as a done Future. A result on disk is never read on the
    event loop: asked for there, it comes as a pending Future that the
    table's reader thread completes (await it; a value that no longer reads
    back ends it with KeyError); asked for from a thread without a running
    loop, it is read in that thread and comes done (or raises KeyError);
    from another event loop, MemoizerUsageError. ``key in view`` reads
    nothing.
    """

    def __init__(
        self, life: Life, keys: Sequence[bytes], key_set: Set[bytes], table: MemoTable
    ) -> None:
        self._life = life
        #: raw keys in load order, and as a set (made in the loading thread: with
        #: millions of keys, neither is built on the event loop; hex on demand)
        self._keys = keys
        self._set = key_set
        self._table = table

    def _raw(self, key: object) -> bytes | None:
        if type(key) is not str:
            return None
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            return None
        if len(key) != 2 * len(raw):  # fromhex skips whitespace: no such key
            return None
        return raw if raw in self._set else None

    def __getitem__(self, key: str) -> asyncio.Future[Any]:
        raw = self._raw(key)
        if raw is None:
            raise KeyError(key)
        key = raw.hex()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        value = self._table.lookup(key, raw, read=running is None)
        if type(value) is OnDisk:
            if running is not self._life.loop:
                self._life.check_loop()  # another loop: say so rather than block it
            assert running is not None
            return running.create_task(self._read(key, value))
        if value is MISSING:
            raise KeyError(key)
        assert self._life.loop is not None
        return done_future(self._life.loop, value)

    async def _read(self, key: str, hit: OnDisk) -> Any:
        value = await self._table.read(key, hit)
        if value is MISSING:
            raise KeyError(key)
        if type(value) is Raised:
            raise value.rearm()
        return value

    def __contains__(self, key: object) -> bool:
        return self._raw(key) is not None

    def __iter__(self) -> Iterator[str]:
        return (k.hex() for k in self._keys)

    def __len__(self) -> int:
        return len(self._keys)


async def load(
    dirs: Sequence[str | os.PathLike[str]],
    life: Life,
    table: MemoTable | None,
    absorb: Callable[[LoadReport], None],
    memory_limit: int | None = None,
) -> LoadedView:
    """Load checkpoint ``dirs`` (a worker thread) into ``table``.

    ``table`` None (the memo is off): a private table, holding values read
    back within ``memory_limit``.
    """
    from aiomemo import _checkpoint

    t0 = time.perf_counter()
    def read() -> tuple[LoadReport, list[bytes], set[bytes]]:
        rep = _checkpoint.load_paths(
            [os.fspath(d) for d in dirs], parsl_keys=table is not None and table.parsl_keys
        )
        # the view's keys too, here and a slice at a time: one C call over
        # millions of keys holds the GIL (so the event loop) for a tenth of a second
        keys: list[bytes] = []
        key_set: set[bytes] = set()
        it = iter(rep.table)
        while chunk := list(itertools.islice(it, KEY_SLICE)):
            keys += chunk
            key_set.update(chunk)
        return rep, keys, key_set

    rep, keys, key_set = await asyncio.to_thread(read)
    _metrics.record_load(time.perf_counter() - t0)
    if table is None:
        table = MemoTable(Counters(), memory_limit=memory_limit)
        table.loaded = rep.table
        table.on_disk = rep.bytes_on_disk
    else:
        absorb(rep)
    return LoadedView(life, keys, key_set, table)


async def explain(task: Mapping[str, Any], paths: list[str]) -> Explanation:
    """``explain_task`` over ``paths`` in a worker thread (on a snapshot of ``task``)."""
    from aiomemo._explain import explain as explain_task

    return await asyncio.to_thread(explain_task, dict(task), paths)
