"""Completions from an engine's own threads: the memo updated and records made durable there.

An engine that runs tasks on threads of its own (Parsl's executors) reports
each outcome from the thread that ran it. :class:`ThreadedCompletions` does
in that thread what ``Memoizer.update_memo_result`` does on the loop: the
result joins the table, the task's flight ends (its Future is settled on the
loop only when someone follows it), and the record is queued for the drain
(``periodic``, ``dfk_exit``, ``manual``) or, in ``task_exit``, handed to a
:class:`GroupCommit`: one writer thread writes and syncs whatever gathered
while its previous write ran, so the number of syncs grows with time, not
with tasks. The completing thread either waits for its record's group or,
when the engine lets the task's completion be held back until then
(:class:`aiomemo._parsl_outcomes.HeldCompletion`), goes back to work at once.

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

#: what runs once a record's group is written: ``then(error)``
_Then = Callable[[BaseException | None], None]


class GroupCommit:
    """Records made durable by one writer thread, a group at a time.

    :meth:`submit` adds a record to the group now filling and returns at
    once; ``then(error)`` runs in the writer thread once that group went
    through ``write`` (``error``: what ``write`` raised, else None).
    :meth:`commit` is the blocking form: it returns once the record's group
    is written. The writer takes whatever gathered while the write before
    ran, so the number of writes grows with time, not with records. It is
    started by the first record and stopped by :meth:`close`, which writes
    what is left first; after it (or on the writer thread itself, from a
    ``then``) records are written in the calling thread.
    """

    __slots__ = ("_after", "_closed", "_cond", "_filling", "_thread", "_write", "groups")

    def __init__(
        self, write: Callable[[list[Record]], None], after: Callable[[], None] | None = None
    ) -> None:
        self._write = write
        self._after = after  # after each group's write, before its thens
        self._cond = threading.Condition(threading.Lock())
        self._filling: list[tuple[Record, _Then]] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        #: groups written so far
        self.groups = 0

    def submit(self, record: Record, then: _Then) -> None:
        """Add ``record`` to the group now filling; ``then(error)`` once it is written."""
        with self._cond:
            inline = self._closed or self._thread is threading.current_thread()
            if not inline:
                self._filling.append((record, then))
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="aiomemo-group-commit", daemon=True
                    )
                    self._thread.start()
                elif len(self._filling) == 1:
                    self._cond.notify()
                return
        self._write_group([(record, then)])

    def commit(self, record: Record) -> None:
        """Add ``record`` to the group now filling; return once that group is written.

        Raises what ``write`` raised for the group.
        """
        done = threading.Event()
        box: list[BaseException | None] = []

        def then(error: BaseException | None) -> None:
            box.append(error)
            done.set()

        self.submit(record, then)
        done.wait()
        if box[0] is not None:
            raise box[0]

    def close(self) -> None:
        """Write what is queued, stop the writer; later records are written by their callers."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._filling and not self._closed:
                    cond.wait()
                batch, self._filling = self._filling, []
                if not batch:
                    return  # closed, and nothing left
            self._write_group(batch)

    def _write_group(self, batch: list[tuple[Record, _Then]]) -> None:
        with self._cond:
            self.groups += 1
        records = [r for r, _ in batch]
        thens = [t for _, t in batch]
        del batch
        error: BaseException | None = None
        try:
            self._write(records)
        except BaseException as exc:  # handed to every record's then
            error = exc
        del records  # written: their bytes may go back to the system
        if self._after is not None:
            self._after()
        for then in thens:
            try:
                then(error)
            except Exception:
                logger.exception("aiomemo: a completion after a group commit failed")


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
        self._commit = GroupCommit(self._write, after=memo._table.trim_if_due)

    @property
    def groups(self) -> int:
        """``task_exit`` groups written (each one write and one fsync per store)."""
        return self._commit.groups

    def result(
        self, task: Mapping[str, Any], key: str, r: Any, then: _Then | None = None
    ) -> bool:
        """The task keyed ``key`` (a leader) finished with ``r``.

        In ``task_exit`` mode the record is made durable before this returns,
        or, with ``then``, by the group-commit thread, which calls
        ``then(error)`` once it is (``error``: the write failed and the
        record is queued for the drain to retry). Returns whether ``then``
        will be called (only in ``task_exit``, for a record to write).
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
            return False  # a manual checkpoint() encodes it later
        record = memo._records.make(task, key, r, expires, name=name, raw=raw)
        if record is None:
            return False
        if mode == "task_exit":
            if then is not None:
                self._commit.submit(record, then)
                return True
            self._commit.commit(record)
            del record  # durable: its bytes may go back to the system
            memo._table.trim_if_due()
            return False
        memo._drain.queue(record, key)
        if mode == "periodic" and memo._drain.queued_enough():
            self._loop.call_soon_threadsafe(memo._drain.wake)
        return False

    def close(self) -> None:
        """Write the records still waiting for a group; the writer thread stops."""
        self._commit.close()

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
