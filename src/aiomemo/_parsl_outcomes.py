"""Outcomes of the tasks a ParslMemoizer let run, on their way into the memo.

Part of :mod:`aiomemo.parsl`. The DataFlowKernel reports each leader's
outcome from the thread that completed it (an executor's thread, usually).
Where the Memoizer allows it (:func:`aiomemo._threaded.usable`: no shared
store; in ``task_exit``, stores that write from any thread) a result is
recorded right there, with no trip to the loop; ``task_exit`` callers
write and fsync their records themselves, one group commit at a time, and
return once theirs is durable. Otherwise (shared stores, exceptions)
outcomes travel to the loop in one batch per burst of completions, and
``task_exit`` callers share that batch's commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from aiomemo._exceptions import MemoizerClosedError
from aiomemo._memoizer import Memoizer
from aiomemo._parsl_followers import Followers, log_failure, settle_cf
from aiomemo._portal import Portal, PortalClosedError
from aiomemo._threaded import ThreadedCompletions, usable

__all__ = ["HeldCompletion", "Outcomes"]

#: under ``parsl.`` so the lines land in the run's ``parsl.log``
logger = logging.getLogger("parsl.aiomemo")

_Outcome = tuple[dict[str, Any], Any, BaseException | None]
#: runs a function in another thread (:meth:`Followers.run_elsewhere`)
_Run = Callable[..., None]


class HeldCompletion:
    """Holds back the result set on a task's Future until the task's record is durable.

    ``task_exit`` promises a record on disk before the app's Future
    completes. The DataFlowKernel calls ``update_memo_result`` and then, in
    the same thread, ``set_result`` on the task's AppFuture; :meth:`hold`
    puts a stand-in for that ``set_result`` on the Future, so the completing
    thread need not wait for the disk: the stand-in keeps the result until
    :meth:`durable`, which sets it (in the group-commit thread, under the
    Future's ``_update_lock`` as the DataFlowKernel does) and hands the
    Future's done callbacks to ``run`` (the followers' completer threads):
    user code there may wait for another app, whose record the group-commit
    thread must still write.
    When the record is durable first, the stand-in sets the result at once
    (callbacks in the DataFlowKernel's thread, as without aiomemo). The DataFlowKernel
    marks the task done before its Future completes in any case (Parsl says
    so at ``wait_for_current_tasks``); here the gap lasts until the group's
    sync.
    """

    __slots__ = ("_durable", "_future", "_lock", "_result", "_run")

    def __init__(self, future: concurrent.futures.Future[Any], run: _Run) -> None:
        self._future = future
        self._run = run
        self._lock = threading.Lock()
        self._durable = False
        self._result: tuple[Any] | None = None

    @classmethod
    def hold(cls, future: Any, run: _Run) -> HeldCompletion | None:
        """Hold back ``future``'s next ``set_result``; None when it cannot be (then block)."""
        if not isinstance(future, concurrent.futures.Future) or future.done():
            return None
        if "set_result" in vars(future):
            return None  # someone else's stand-in is there already
        held = cls(future, run)
        future.set_result = held._set_result  # type: ignore[method-assign]
        return held

    def _set_result(self, result: Any) -> None:
        """The stand-in: called by the DataFlowKernel (holding the Future's update lock)."""
        with self._lock:
            if not self._durable:
                self._result = (result,)
                return
        self._release(result)

    def durable(self, error: BaseException | None) -> None:
        """The record is on disk (or, with ``error``, queued for retry): let the result through."""
        with self._lock:
            self._durable = True
            pending, self._result = self._result, None
            vars(self._future).pop("set_result", None)
        if pending is not None:
            # The DataFlowKernel's thread has moved on: this is the
            # group-commit thread, which must not run the Future's done
            # callbacks (user code that may wait for another app, whose
            # record this thread has yet to write: a deadlock).
            lock = getattr(self._future, "_update_lock", None)
            with lock if lock is not None else contextlib.nullcontext():
                _set_result_elsewhere(self._future, pending[0], self._run)

    def _release(self, result: Any) -> None:
        future = self._future
        type(future).set_result(future, result)


_RLockType = type(threading.RLock())


def _set_result_elsewhere(future: concurrent.futures.Future[Any], result: Any, run: _Run) -> None:
    """``future.set_result(result)`` with its done callbacks run through ``run``.

    Waiters (``result()``, ``wait``) wake at once; the callbacks run in
    ``run``'s thread, in the order they were added, as ``set_result`` would
    run them. A callback added from now on runs in the thread adding it
    (the Future is done), as always.
    """
    cond = getattr(future, "_condition", None)
    callbacks = getattr(future, "_done_callbacks", None)
    if (
        not isinstance(cond, threading.Condition)
        or not isinstance(getattr(cond, "_lock", None), _RLockType)
        or type(callbacks) is not list
    ):
        type(future).set_result(future, result)  # not a standard Future: as it is
        return
    with cond:  # reentrant: set_result takes it again; no callback is added meanwhile
        callbacks = future._done_callbacks  # type: ignore[attr-defined]
        future._done_callbacks = []  # type: ignore[attr-defined]
        type(future).set_result(future, result)
    if callbacks:
        run(_invoke, future, callbacks)


_futures_logger = logging.getLogger("concurrent.futures")


def _invoke(
    future: concurrent.futures.Future[Any], callbacks: list[Callable[[Any], object]]
) -> None:
    """Run ``future``'s done callbacks in order, each error logged as concurrent.futures does."""
    for fn in callbacks:
        try:
            fn(future)
        except Exception:
            _futures_logger.exception("exception calling callback for %r", future)


class Outcomes:
    """Records the outcomes of one run's leaders (thread-safe); see the module."""

    def __init__(
        self, memo: Memoizer, portal: Portal, followers: Followers, recorded: set[str]
    ) -> None:
        self._memo = memo
        self._portal = portal
        self._followers = followers
        # keys whose record this run has written or queued already
        self._recorded = recorded
        self._task_exit = memo.checkpoint_mode == "task_exit"
        self._direct = ThreadedCompletions(memo, portal.loop) if usable(memo) else None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0  # direct completions running now
        self._closed = False
        # outcomes on their way to the loop, and the Future of the batch they
        # ride in: one loop wake per burst
        self._outbox: list[_Outcome] = []
        self._outbox_done: concurrent.futures.Future[None] | None = None

    @property
    def groups(self) -> int:
        """task_exit groups written by the completing threads (0 when they go by the loop)."""
        return self._direct.groups if self._direct is not None else 0

    def report(
        self,
        view: dict[str, Any],
        key: str,
        result: Any,
        exc: BaseException | None,
        app_future: Any = None,
    ) -> None:
        """A leader finished: record ``result`` (or ``exc``); in task_exit, durable on return.

        With ``app_future`` (the task's AppFuture, in ``task_exit``) this
        returns at once and the result the DataFlowKernel sets on that
        Future next is held back until the record is durable
        (:class:`HeldCompletion`): the completing thread goes back to work
        while the group commit writes.
        """
        direct = self._direct
        if direct is not None and exc is None and not self._portal.on_loop_thread():
            with self._lock:
                closed = self._closed
                if not closed:
                    self._active += 1
            if closed:
                self._followers.after_close(key, result, exc)
                return
            held = (
                HeldCompletion.hold(app_future, self._followers.run_elsewhere)
                if self._task_exit
                else None
            )
            try:
                self._recorded.add(key)
                if direct.result(view, key, result, held.durable if held else None):
                    held = None  # the group commit calls held.durable
            except Exception:
                # a memo that cannot record must never fail the task
                logger.exception("aiomemo could not record the outcome of task %s", view.get("id"))
            finally:
                if held is not None:
                    held.durable(None)
                with self._lock:
                    self._active -= 1
                    if self._closed and not self._active:
                        self._idle.notify_all()  # close() waits for this
            if self._task_exit:
                logger.debug("Task %s checkpointed", view.get("id"))
            return
        self._by_loop(view, key, result, exc)

    def close(self) -> None:
        """Take no more direct completions; wait for those running and the records they queued."""
        with self._lock:
            self._closed = True
            while self._active:
                self._idle.wait()
        if self._direct is not None:
            self._direct.close()  # held-back completions are released as their records land

    # ------------------------------------------------------------ by the loop
    def _by_loop(
        self, view: dict[str, Any], key: str, result: Any, exc: BaseException | None
    ) -> None:
        with self._lock:
            self._outbox.append((view, result, exc))
            batch = self._outbox_done
            first = batch is None
            if batch is None:
                batch = self._outbox_done = concurrent.futures.Future()
        if first:
            try:
                # one hop for a whole burst of completions, not one per task
                fut = self._portal.submit(self._record_outbox())
                fut.add_done_callback(log_failure)
                fut.add_done_callback(self._outbox_ended)
            except PortalClosedError:
                self._return_outbox()
                return
        if self._task_exit and exc is None and not self._portal.on_loop_thread():
            # returns once the record is durable, as BasicMemoizer's write:
            # one group commit for every completion thread's records
            try:
                batch.result()
            except (
                concurrent.futures.CancelledError,
                asyncio.CancelledError,
                PortalClosedError,
                MemoizerClosedError,
            ):
                self._followers.after_close(key, result, exc)
            except Exception:
                # a memo that cannot record must never fail the task
                logger.exception("aiomemo could not record the outcome of task %s", view.get("id"))

    def _outbox_ended(self, fut: concurrent.futures.Future[None]) -> None:
        """The loop cancelled a batch (stopping), perhaps before it took its outcomes."""
        if fut.cancelled():
            self._return_outbox()

    def _return_outbox(self) -> None:
        """The loop is gone: complete the followers of the outcomes still waiting for it."""
        with self._lock:
            pending, self._outbox = self._outbox, []
            batch, self._outbox_done = self._outbox_done, None
        for view, result, exc in pending:
            key = view.get("hashsum")
            if isinstance(key, str):
                self._followers.after_close(key, result, exc)
        if batch is not None:
            settle_cf(batch, None, PortalClosedError("the aiomemo loop is stopped"))

    async def _record_outbox(self) -> None:
        """Record a burst of outcomes on the loop; task_exit: one commit for them all."""
        with self._lock:
            pending, self._outbox = self._outbox, []
            batch, self._outbox_done = self._outbox_done, None
        error: BaseException | None = None
        try:
            if self._task_exit:
                outcomes = await asyncio.gather(
                    *(self._record_outcome(v, r, e) for v, r, e in pending),
                    return_exceptions=True,
                )
            else:
                outcomes = []
                for v, r, e in pending:
                    try:
                        await self._record_outcome(v, r, e)
                    except Exception as exc:
                        outcomes.append(exc)
            for out in outcomes:
                if isinstance(out, BaseException):
                    logger.error("aiomemo could not record a task outcome: %r", out, exc_info=out)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if batch is not None:
                settle_cf(batch, None, error)

    async def _record_outcome(
        self, view: dict[str, Any], result: Any, exc: BaseException | None
    ) -> None:
        memo = self._memo
        key = view.get("hashsum")
        try:
            if exc is not None:
                await memo.update_memo_exception(view, exc)
            else:
                if isinstance(key, str):
                    self._recorded.add(key)
                await memo.update_memo_result(view, result)
        except MemoizerClosedError:
            if isinstance(key, str):  # closed under us: complete the followers anyway
                threading.Thread(
                    target=self._followers.after_close, args=(key, result, exc), daemon=True
                ).start()
            return
        if self._task_exit:
            logger.debug("Task %s checkpointed", view.get("id"))
