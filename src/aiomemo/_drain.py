"""The drain: queued records to their stores (group commit, back-off, periodic passes).

Each store has a :class:`Sink`: its queue of encoded records, its failure
count and back-off. A pass writes every queue in chunks (one ``put_many``,
one fsync each). Passes happen

* when a ``task_exit`` completion joins the batch now filling (group
  commit: every completion that arrives while a pass writes shares the
  next one, and returns once it is durable),
* every ``period`` seconds in ``periodic`` mode (at a fixed rate from the
  start, whatever a pass takes), or early when ``max_pending`` records wait,
* when a failed store's back-off ends (0.1 s, 0.2 s, ... capped at 1 s),
* on demand (``checkpoint()``) and at close (the final pass).

Before each pass the optional ``before_pass()`` runs (an adapter queues
what it gathered), after it ``on_pass(written)`` (adapters log with it, e.g.
Parsl's "Done checkpointing N tasks").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from aiomemo import _metrics
from aiomemo._counters import Counters
from aiomemo._exceptions import CheckpointError, StoreError
from aiomemo.stores._base import Record, Store

__all__ = ["Drain", "Sink"]

logger = logging.getLogger("aiomemo")

#: records written per store call (one write, one fsync); bounds loop lag
CHUNK = 4096


@dataclass(slots=True)
class Sink:
    """A store and the records still to write to it."""

    store: Store
    queue: list[Record] = field(default_factory=list)
    failures: int = 0
    last_error: str = ""
    retry_at: float = 0.0
    # one flush at a time per store: the drain, checkpoint() and close() may
    # overlap, and each takes records from the head of the queue
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def failed(self, exc: BaseException) -> None:
        """Count a failed write; back off 0.1 s, 0.2 s, ... capped at 1 s, so a
        store (or a disk) that recovers is used again within a second."""
        self.failures += 1
        self.last_error = str(exc)
        self.retry_at = time.monotonic() + min(1.0, 0.05 * 2 ** min(self.failures, 5))


class _Commit(asyncio.Future[None]):
    """The batch now filling in task_exit mode, awaited by all of its callers.

    Cancelling a caller must not cancel the batch the others wait on, so this
    Future refuses ``cancel()``: a cancelled caller gets its CancelledError
    when the batch is durable (milliseconds), the others are unaffected.
    """

    def cancel(self, msg: Any = None) -> bool:
        return False


class Drain:
    """The sinks of a Memoizer and the task that writes them."""

    def __init__(
        self,
        counters: Counters,
        *,
        periodic: float | None,
        max_pending: int,
        on_pass: Callable[[int], None] | None = None,
        before_pass: Callable[[], None] | None = None,
    ) -> None:
        self.sinks: list[Sink] = []
        self.queued_keys: set[str] = set()
        self.period = periodic
        self.max_pending = max_pending
        self.on_pass = on_pass
        self.before_pass = before_pass
        #: called with each store after a put_many of it succeeded (records durable there)
        self.on_durable: Callable[[Store], None] | None = None
        self.origin: float | None = None  # periodic passes count from here (monotonic)
        self._counters = counters
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._commit: _Commit | None = None
        self.stopping = False

    # ------------------------------------------------------------ queueing
    def start(self, stores: list[Store], *, run: bool) -> None:
        """Own ``stores``; with ``run``, start the drain task on the running loop."""
        self.sinks = [Sink(s) for s in stores]
        for st in stores:
            self._watch(st)
        self._wake = asyncio.Event()
        if self.origin is None:
            self.origin = time.monotonic()
        if run:
            self._task = asyncio.create_task(self._loop(), name="aiomemo-drain")

    def add_sink(self, store: Store) -> None:
        self.sinks.append(Sink(store))
        self._watch(store)

    def _watch(self, store: Store) -> None:
        # a store that can say where it put large values (LogStore) keeps
        # track of them only when someone (on_durable) will ask
        if self.on_durable is not None and hasattr(store, "collect_refs"):
            store.collect_refs = True

    def queue(self, record: Record, key: str, skip: Store | None = None) -> None:
        """Queue ``record`` for every store but ``skip`` (no await: nothing is lost)."""
        self.queued_keys.add(key)
        for s in self.sinks:
            if s.store is not skip:
                s.queue.append(record)

    def requeue(self, store: Store, record: Record, exc: BaseException) -> None:
        """A publish to ``store`` failed: keep its record for the drain to retry."""
        for s in self.sinks:
            if s.store is store:
                s.queue.append(record)
                s.failed(exc)
        self.wake()

    def requeue_many(self, store: Store, records: list[Record], exc: BaseException) -> None:
        """A write of ``records`` to ``store`` made off the drain failed: queue them for retry."""
        for rec in records:
            self.queued_keys.add(rec.key.hex())
        for s in self.sinks:
            if s.store is store:
                s.queue.extend(records)
                self._write_failed(s, exc)
        self.wake()

    def pending(self) -> int:
        sinks = self.sinks
        if len(sinks) == 1:  # the usual case, asked after every periodic completion
            return len(sinks[0].queue)
        return max((len(s.queue) for s in sinks), default=0)

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def queued_enough(self) -> bool:
        """In periodic mode: so many records wait that the drain should run early."""
        return self.pending() >= self.max_pending

    def commit(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Join the batch now filling: await the result to return once it is durable (task_exit).

        Every caller of one batch awaits the same Future (no coroutine or
        Future of its own), and only the first wakes the drain.
        """
        commit = self._commit
        if commit is None:
            commit = self._commit = _Commit(loop=loop)
            self.wake()
        return commit

    def release_commit(self, commit: _Commit | None = None) -> None:
        """Let the callers of ``commit`` (default: the batch now filling) return."""
        if commit is None:
            commit, self._commit = self._commit, None
        if commit is not None and not commit.done():
            commit.set_result(None)

    # ------------------------------------------------------------ the task
    def _timeout(self) -> float | None:
        now = time.monotonic()
        timeout: float | None = None
        if self.period is not None:
            assert self.origin is not None
            ticks = int((now - self.origin) // self.period) + 1
            timeout = self.origin + ticks * self.period - now
        retry = min((s.retry_at for s in self.sinks if s.queue and s.failures), default=None)
        if retry is not None:
            delay = max(0.0, retry - now)
            timeout = delay if timeout is None else min(timeout, delay)
        return timeout

    async def _loop(self) -> None:
        assert self._wake is not None
        while not self.stopping:
            timeout = self._timeout()
            if timeout is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self.stopping:
                return  # close() makes the final pass
            commit, self._commit = self._commit, None
            try:
                # a pass that carries task_exit callers tries every store now,
                # even one in back-off: they return on the strength of this try
                await self.flush(final=commit is not None)
            except Exception:  # the drain must survive anything a store does
                logger.exception("checkpoint drain failed")
            finally:
                self.release_commit(commit)

    async def stop(self) -> None:
        """Ask the task to stop after its pass (never cancelled mid-write) and wait."""
        self.stopping = True
        if self._task is not None:
            self.wake()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    def rebind(self) -> None:
        """Drop what belongs to a loop that is gone (close() from another loop).

        The queues stay: the final pass on the new loop writes them.
        """
        if self._task is not None and self._task.done():
            self._task = None
        self._wake = asyncio.Event()
        for s in self.sinks:
            s.lock = asyncio.Lock()
        self.release_commit()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------ writing
    async def flush(self, final: bool = False) -> int:
        """Write every sink's queue; return records written (to the first sink)."""
        if self.before_pass is not None:
            self.before_pass()  # e.g. an adapter queues what it gathered
        written = 0
        now = time.monotonic()
        for i, sink in enumerate(self.sinks):
            if sink.failures and not final and sink.retry_at > now and sink.queue:
                continue
            async with sink.lock:
                n = await self._write(sink)
            if i == 0:
                written = n
        if written:
            self._counters.checkpointed += written
            self._counters.last_checkpoint = time.time()
            logger.info("Done checkpointing %d tasks", written)
        else:
            logger.debug("No tasks checkpointed in this pass.")
        if not any(s.queue for s in self.sinks):
            self.queued_keys.clear()
        if self.on_pass is not None:
            try:
                self.on_pass(written)
            except Exception:  # an adapter's logging must not stop the drain
                logger.exception("the checkpoint pass callback failed")
        return written

    async def _write(self, sink: Sink) -> int:
        written = 0
        while sink.queue:
            chunk = sink.queue[:CHUNK]
            t0 = perf_counter() if _metrics.active() else 0.0
            try:
                await sink.store.put_many(chunk)
            except Exception as exc:  # CheckpointError, StoreError, or a store's bug
                self._write_failed(sink, exc)
                return written
            if t0:
                _metrics.record_write(sink.store, perf_counter() - t0, chunk)
            del sink.queue[: len(chunk)]
            sink.failures = 0
            written += len(chunk)
            del chunk  # the encoded records are durable: on_durable may free their bytes
            if self.on_durable is not None:
                self.on_durable(sink.store)
            if sink.queue:
                await asyncio.sleep(0)  # let the loop breathe between chunks
        return written

    def _write_failed(self, sink: Sink, exc: BaseException) -> None:
        """Count a failed write to ``sink`` (its records stay queued); warn now and then."""
        sink.failed(exc)
        self._counters.write_errors += 1
        if sink.failures == 1 or sink.failures % 100 == 0:
            msg = (
                f"aiomemo: checkpoint write to {type(sink.store).__name__} failed "
                f"({exc}); {len(sink.queue)} record(s) stay queued and will be retried"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning("%s", msg)

    async def flush_or_raise(self) -> int:
        """:meth:`flush` every store now; CheckpointError for what stays queued."""
        n = await self.flush(final=True)
        failed = [s for s in self.sinks if s.queue]
        if failed:
            pending = max(len(s.queue) for s in failed)
            raise CheckpointError(
                f"{pending} record(s) could not be checkpointed yet "
                f"({failed[0].last_error}); they stay queued",
                unsaved=pending,
            )
        return n

    async def write_one(self, record: Record, key: str) -> None:
        """Write one record to every store now (replacing a queued copy)."""
        self.queued_keys.add(key)
        for s in self.sinks:
            async with s.lock:  # a flush takes records from this queue's head
                # in place, from the end: an engine's thread may append meanwhile
                q = s.queue
                for i in range(len(q) - 1, -1, -1):
                    if q[i].key == record.key:
                        del q[i]
                t0 = perf_counter() if _metrics.active() else 0.0
                try:
                    await s.store.put_many([record])
                except (CheckpointError, StoreError, OSError) as exc:
                    s.queue.append(record)
                    raise CheckpointError(
                        f"could not checkpoint task {key}: {exc}; it stays queued", unsaved=1
                    ) from exc
                if t0:
                    _metrics.record_write(s.store, perf_counter() - t0, [record])
                if self.on_durable is not None:
                    self.on_durable(s.store)
        self._counters.checkpointed += 1
        self._counters.last_checkpoint = time.time()

    def unsaved(self) -> tuple[int, list[str]]:
        """Records still queued, and one line per store that holds them."""
        n = sum(len(s.queue) for s in self.sinks)
        errors = [f"{type(s.store).__name__}: {s.last_error}" for s in self.sinks if s.queue]
        return n, errors

    async def close_stores(self) -> list[str]:
        """Close every store; one line per failure (closing goes on for the others)."""
        errors: list[str] = []
        for s in self.sinks:
            try:
                await s.store.aclose()
            except Exception as exc:
                errors.append(f"{type(s.store).__name__}: close failed: {exc}")
                logger.warning("closing %s failed: %s", s.store, exc)
        return errors
