"""Completions from an engine's own threads: the memo updated and records made durable there.

An engine that runs tasks on threads of its own (Parsl's executors) reports
each outcome from the thread that ran it. :class:`ThreadedCompletions` does
in that thread what ``Memoizer.update_memo_result`` does on the loop: the
result joins the table, the task's flight ends (its Future is settled on the
loop only when someone follows it), and the record is queued for the drain
(``periodic``, ``dfk_exit``, ``manual``) or, in ``task_exit``, made durable
before the call returns by a :class:`GroupCommit`: the waiting threads write
and fsync their records themselves, one group at a time, while the next
group fills, so the number of fsyncs grows with time, not with tasks.

Only for a Memoizer without a shared tier (shared lookups and leases are I/O
on the loop) and, in ``task_exit``, whose stores can write from any thread
(``put_many_blocking``, as LogStore); :func:`usable` says so. A write that
fails hands its records to the drain, which keeps them queued and retries
them with back-off (``close()`` raises ``CheckpointError`` for what stays).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from aiomemo import _metrics
from aiomemo._flights import settle
from aiomemo._lifecycle import Lifecycle

if TYPE_CHECKING:
    import asyncio

    from aiomemo._memoizer import Memoizer
    from aiomemo.stores._base import Record

__all__ = ["GroupCommit", "ThreadedCompletions", "usable"]

logger = logging.getLogger("aiomemo")


class GroupCommit:
    """Records made durable by the threads that wait for them, one group at a time.

    :meth:`commit` adds a record to the group now filling and returns once
    that group went through ``write``. When no write runs, the first waiting
    thread takes the whole group and writes it (``write`` must not raise: it
    deals with its own failures); records that arrive meanwhile fill the
    next group, written by one of their own threads as soon as the write
    before ends.
    """

    __slots__ = ("_busy", "_cond", "_filling", "_group", "_write", "_written", "groups")

    def __init__(self, write: Callable[[list[Record]], None]) -> None:
        self._write = write
        self._cond = threading.Condition(threading.Lock())
        self._filling: list[Record] = []
        self._group = 0  # the number of the group now filling
        self._written = -1  # every group up to this one went through write
        self._busy = False
        #: groups written so far
        self.groups = 0

    def commit(self, record: Record) -> None:
        """Add ``record`` to the group now filling; return once that group is written."""
        with self._cond:
            self._filling.append(record)
            mine = self._group
            while True:
                if self._written >= mine:
                    return
                if not self._busy:
                    break
                self._cond.wait()
            # this thread writes group `mine`: every record that joined it
            batch, self._filling = self._filling, []
            self._group += 1
            self._busy = True
            self.groups += 1
        try:
            self._write(batch)
        finally:
            with self._cond:
                self._busy = False
                self._written = mine
                self._cond.notify_all()


def usable(memo: Memoizer) -> bool:
    """Whether ``memo``'s completions may be made in an engine's threads (see the module)."""
    if memo._life.state is not Lifecycle.STARTED or memo._shared:
        return False
    if memo.checkpoint_mode is None:
        return True
    sinks = memo._drain.sinks
    if not sinks:
        return False
    if memo.checkpoint_mode != "task_exit":
        return True
    return all(callable(getattr(s.store, "put_many_blocking", None)) for s in sinks)


class ThreadedCompletions:
    """``update_memo_result`` for a Memoizer, callable from any thread but its loop's.

    Check :func:`usable` first. The caller makes sure the Memoizer stays open
    (its loop running) until each call returns.
    """

    __slots__ = ("_commit", "_loop", "_memo")

    def __init__(self, memo: Memoizer, loop: asyncio.AbstractEventLoop) -> None:
        self._memo = memo
        self._loop = loop
        self._commit = GroupCommit(self._write)

    @property
    def groups(self) -> int:
        """``task_exit`` groups written (each one write and one fsync per store)."""
        return self._commit.groups

    def result(self, task: Mapping[str, Any], key: str, r: Any) -> None:
        """The task keyed ``key`` (a leader) finished with ``r``.

        In ``task_exit`` mode this returns once the record is durable (or,
        when the write failed, queued for the drain to retry).
        """
        memo = self._memo
        memo._table.put(key, r)
        # its expiry (ttl) noted as the loop's path notes it
        name = memo._records.name_of(task.get("func"))
        raw = bytes.fromhex(key)
        expires = memo._completion._expiry_of(task, key, name, raw)
        flight = memo._flights.finish(key)
        if flight is not None and flight.followed:
            # a follower's Future belongs to the loop: settle it there
            self._loop.call_soon_threadsafe(settle, flight.future, r)
        mode = memo.checkpoint_mode
        if mode is None:
            return  # a manual checkpoint() encodes it later
        record = memo._records.make(task, key, r, expires, name=name, raw=raw)
        if record is None:
            return
        if mode == "task_exit":
            self._commit.commit(record)
            del record  # durable: its bytes may go back to the system
            memo._table.trim_if_due()
            return
        memo._drain.queue(record, key)
        if mode == "periodic" and memo._drain.queued_enough():
            self._loop.call_soon_threadsafe(memo._drain.wake)

    def _write(self, batch: list[Record]) -> None:
        """GroupCommit's write: ``batch`` to every store, in this thread; never raises."""
        memo = self._memo
        drain = memo._drain
        for i, sink in enumerate(list(drain.sinks)):
            t0 = perf_counter() if _metrics.active() else 0.0
            try:
                sink.store.put_many_blocking(batch)  # type: ignore[attr-defined]
            except Exception as exc:  # the drain keeps them and retries
                try:
                    self._loop.call_soon_threadsafe(drain.requeue_many, sink.store, batch, exc)
                except RuntimeError:  # the loop is gone: nobody can retry them
                    logger.error(
                        "aiomemo: %d checkpoint record(s) lost, the Memoizer is closed: %s",
                        len(batch),
                        exc,
                    )
                continue
            if t0:
                _metrics.record_write(sink.store, perf_counter() - t0, batch)
            if i == 0:
                # a statistic bumped off the loop (see Counters)
                memo._counters.checkpointed += len(batch)
                memo._counters.last_checkpoint = time.time()
            if drain.on_durable is not None:
                try:
                    drain.on_durable(sink.store)  # large values may leave memory
                except Exception:
                    logger.exception("aiomemo: letting durable results go from memory failed")
