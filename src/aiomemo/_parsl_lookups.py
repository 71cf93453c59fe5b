"""check_memo for one run of a ParslMemoizer: key the task, answer hits, register leaders.

Part of :mod:`aiomemo.parsl`. The DataFlowKernel's launch thread calls in;
the common path (a hit, a follow, a miss) is decided in that thread with no
round trip to the loop (:meth:`aiomemo._memoizer.Memoizer.claim_threadsafe`);
only what needs I/O (shared stores, a value on disk) goes through the loop.
Parsl writes a record for every task that used a result, so hits join this
run's checkpoint too: they gather here and are queued by the loop, one hop
per burst (:meth:`Lookups.learn_now`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from typing import Any

from parsl.dataflow.taskrecord import TaskRecord

from aiomemo import _hashing
from aiomemo._exceptions import LeaderCancelledError, MemoizerClosedError
from aiomemo._memoizer import Memoizer
from aiomemo._parsl_followers import Followers, done_future, log_failure, settle_cf
from aiomemo._parsl_keys import KEY_HOOKS, hook_errors, translate, view_of
from aiomemo._portal import Portal, PortalClosedError
from aiomemo._table import Raised

__all__ = ["Lookups"]

#: under ``parsl.`` so the lines land in the run's ``parsl.log``
logger = logging.getLogger("parsl.aiomemo")

#: seconds the loop waits for more hits on loaded results before queueing a batch
_LEARN_DELAY = 0.02

#: :meth:`Lookups._check_here` could not decide: ask the loop
_ASK_LOOP: Any = object()


class Lookups:
    """The lookups of one run (thread-safe); see the module."""

    def __init__(
        self,
        memo: Memoizer,
        portal: Portal,
        followers: Followers,
        recorded: set[str],
        *,
        track_code: bool,
    ) -> None:
        self._memo = memo
        self._portal = portal
        self._followers = followers
        # keys whose record this run has written or queued already
        self._recorded = recorded
        self._track_code = track_code
        self._checkpointing = memo.checkpoint_mode is not None
        self._lock = threading.Lock()
        # id(task record) -> (task record, its view): tasks let run (misses),
        # until their update_memo_*; a leader's retry is let run again
        # instead of waiting on itself (single dict operations, atomic: no lock)
        self._leaders: dict[int, tuple[TaskRecord, dict[str, Any]]] = {}
        # views of hits answered in the calling thread, on their way into
        # this run's checkpoint (under _lock)
        self._learn_queue: list[dict[str, Any]] = []

    # ------------------------------------------------------------ leaders
    def is_leader(self, task: TaskRecord) -> bool:
        """Whether ``task`` runs now because this memoizer let it (a retry if asked again)."""
        return id(task) in self._leaders  # a plain dict read is atomic

    def pop_leader(self, task: TaskRecord) -> dict[str, Any] | None:
        """The view of leader ``task``, no longer a leader (None: it was not one)."""
        entry = self._leaders.pop(id(task), None)  # one dict operation: atomic
        return entry[1] if entry is not None else None

    def clear(self) -> None:
        self._leaders.clear()

    def _lead(self, task: TaskRecord, view: dict[str, Any]) -> None:
        logger.info("Task %s had no result in cache", view.get("id"))
        self._leaders[id(task)] = (task, view)

    # ------------------------------------------------------------ check_memo
    def check(self, task: TaskRecord) -> concurrent.futures.Future[Any] | None:
        """:meth:`ParslMemoizer.check_memo` once the task is to be memoized."""
        t: Any = task
        view = view_of(task)
        if self._track_code:
            view["track_code"] = True  # the app's code fingerprint joins the key
        if self._portal.on_loop_thread():  # never expected: Parsl does not launch from here
            logger.warning(
                "check_memo on the aiomemo loop thread; task %s not memoized", t.get("id")
            )
            t["hashsum"] = None
            return None
        answer = self._check_here(task, view)
        if answer is not _ASK_LOOP:
            done: concurrent.futures.Future[Any] | None = answer
            return done
        try:
            return self._portal.call(self._check(task, view))
        except (PortalClosedError, MemoizerClosedError):
            t["hashsum"] = None
            return None

    def _check_here(self, task: TaskRecord, view: dict[str, Any]) -> Any:
        """``check`` in the calling thread, without a round trip to the loop.

        The key is made here; hits are answered, misses registered as
        leaders and followers attached under the table's and flights' locks.
        Returns what ``check`` returns, or :data:`_ASK_LOOP` when only the
        loop can decide (shared stores, a value on disk, not started).
        """
        box: list[BaseException] = []
        token = hook_errors.set(box)
        try:
            raw = _hashing.hash_task(view, KEY_HOOKS)
        except BaseException as exc:
            raise translate(exc, box) from None
        finally:
            hook_errors.reset(token)
        key = raw.hex()
        kind, value = self._memo.claim_threadsafe(view, key, raw)
        if kind == "loop":
            return _ASK_LOOP
        t: Any = task
        t["hashsum"] = key
        view["hashsum"] = key
        logger.debug("Task %s has memoization hash %s", t.get("id"), key)
        if kind == "lead":
            self._lead(task, view)
            return None
        if kind == "follow":
            logger.info("Task %s waits for the identical task running now", t.get("id"))
            cf: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self._followers.add_threadsafe(key, cf, value, self._portal.loop)
            return cf
        logger.info("Task %s using result from cache", t.get("id"))
        if type(value) is Raised:
            return done_future(None, value.rearm())
        if self._checkpointing and key not in self._recorded:
            self._recorded.add(key)
            with self._lock:
                self._learn_queue.append(view)
                first = len(self._learn_queue) == 1
            if first:
                # one hop for a whole burst of hits, not one per hit
                with contextlib.suppress(PortalClosedError):
                    self._portal.submit(self._learn(_LEARN_DELAY)).add_done_callback(log_failure)
        return done_future(value, None)

    async def _check(
        self, task: TaskRecord, view: dict[str, Any]
    ) -> concurrent.futures.Future[Any] | None:
        """``check`` on the loop: for what the calling thread could not decide."""
        memo = self._memo
        t: Any = task
        box: list[BaseException] = []
        token = hook_errors.set(box)
        try:
            afut = await memo.check_memo(view)
        except BaseException as exc:
            raise translate(exc, box) from None
        finally:
            hook_errors.reset(token)
        hashsum = view.get("hashsum")
        t["hashsum"] = hashsum
        logger.debug("Task %s has memoization hash %s", t.get("id"), hashsum)
        if afut is None:
            self._lead(task, view)
            return None
        cf: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if afut.done():
            logger.info("Task %s using result from cache", t.get("id"))
            # a fresh Future with no callbacks yet: completing it here is safe
            if afut.cancelled():
                settle_cf(cf, None, LeaderCancelledError("the memoized task was cancelled"))
                return cf
            error = afut.exception()
            settle_cf(cf, afut.result() if error is None else None, error)
            if (
                self._checkpointing
                and isinstance(hashsum, str)
                and error is None
                and hashsum not in self._recorded
            ):
                # Parsl writes a record for every task that used a result
                self._recorded.add(hashsum)
                memo.update_checkpoint(view)
            return cf
        logger.info("Task %s waits for the identical task running now", t.get("id"))
        assert isinstance(hashsum, str)
        self._followers.add(hashsum, cf, afut)
        return cf

    # ------------------------------------------------------------ hits into the checkpoint
    def learn_now(self) -> None:
        """Queue the results used since the last call into this run's checkpoint.

        On the loop; also run by the drain before every pass, so none is
        left behind.
        """
        with self._lock:
            batch, self._learn_queue = self._learn_queue, []
        for view in batch:
            self._memo._queue_finished(view)

    async def _learn(self, delay: float) -> None:
        await asyncio.sleep(delay)  # let a burst of hits gather into one batch
        self.learn_now()
        memo = self._memo
        if memo.checkpoint_mode == "task_exit" and not memo.closed:
            # durable as BasicMemoizer's task_exit makes it: one group commit
            await memo._drain.commit(asyncio.get_running_loop())
