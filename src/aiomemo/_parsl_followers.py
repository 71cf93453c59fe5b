"""Parsl-side followers: tasks collapsed onto an identical running task, completed off the loop.

Part of :mod:`aiomemo.parsl`. A follower is a ``concurrent.futures.Future``
that the DataFlowKernel holds for a task whose identical twin runs now; it
completes with the twin's outcome. Completing it runs the DataFlowKernel's
callbacks, which call back into the memoizer: so never on the loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from aiomemo._exceptions import LeaderCancelledError, MemoizerClosedError

__all__ = ["Followers", "done_future", "log_failure", "settle_cf"]

#: under ``parsl.`` so the lines land in the run's ``parsl.log``
logger = logging.getLogger("parsl.aiomemo")


def log_failure(fut: concurrent.futures.Future[Any]) -> None:
    """Done callback of a call nobody waits for: log what went wrong, quietly at close."""
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None and not isinstance(exc, MemoizerClosedError):
        logger.error("aiomemo call failed: %r", exc, exc_info=exc)


def done_future(result: Any, exc: BaseException | None) -> concurrent.futures.Future[Any]:
    """A finished Future holding ``result`` or ``exc``.

    A hit's Future is made on the DataFlowKernel's launch path for every
    task: the result goes straight into the new Future's fields (what
    ``set_result`` stores, without its lock, wake-ups and callbacks, which
    a Future nobody else has seen yet does not need): half the cost.
    """
    cf: concurrent.futures.Future[Any] = concurrent.futures.Future()
    if exc is not None:
        cf.set_exception(exc)
    else:
        cf._result = result
        cf._state = _FINISHED
    return cf


_FINISHED = concurrent.futures._base.FINISHED


def settle_cf(cf: concurrent.futures.Future[Any], result: Any, exc: BaseException | None) -> None:
    """Complete ``cf`` unless it is done already (a racing settle)."""
    try:
        if exc is not None:
            cf.set_exception(exc)
        else:
            cf.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Followers:
    """Parsl-side followers of running tasks, completed off the loop thread.

    Completing a follower's Future runs the DataFlowKernel's callbacks, which
    call back into the memoizer and block on the loop: so never on the loop
    thread, always on a completer thread. A leader that completes after
    close settles its followers directly (:meth:`after_close`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> followers' futures not completed yet
        self._waiting: dict[str, list[concurrent.futures.Future[Any]]] = {}
        self._completer: concurrent.futures.ThreadPoolExecutor | None = None

    def open(self) -> None:
        # a thread is started only when none is idle; many, because a
        # follower's done callbacks run here and may block (waiting for
        # another app): a few blocked ones must not hold back the rest
        self._completer = concurrent.futures.ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="aiomemo-parsl-complete"
        )

    def shutdown(self) -> None:
        if self._completer is not None:
            self._completer.shutdown(wait=False)

    def add(self, key: str, cf: concurrent.futures.Future[Any], afut: asyncio.Future[Any]) -> None:
        """``cf`` completes with the outcome of the leader's ``afut`` (on the loop)."""
        with self._lock:
            self._waiting.setdefault(key, []).append(cf)
        afut.add_done_callback(functools.partial(self._relay, cf, key))

    def add_threadsafe(
        self,
        key: str,
        cf: concurrent.futures.Future[Any],
        afut: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """:meth:`add` from another thread than the loop's: no wait for the loop.

        ``cf`` is registered at once (a leader that completes after close
        settles it through :meth:`after_close`); the relay from ``afut`` is
        attached on the loop.
        """
        with self._lock:
            self._waiting.setdefault(key, []).append(cf)
        relay = functools.partial(self._relay, cf, key)
        with contextlib.suppress(RuntimeError):  # loop closed: after_close settles cf
            loop.call_soon_threadsafe(afut.add_done_callback, relay)

    def _relay(
        self, cf: concurrent.futures.Future[Any], key: str, afut: asyncio.Future[Any]
    ) -> None:
        if afut.cancelled():
            exc: BaseException | None = LeaderCancelledError("the identical task was cancelled")
            result = None
        else:
            exc = afut.exception()
            result = afut.result() if exc is None else None
        if isinstance(exc, MemoizerClosedError):
            # closed with the leader still running: its completion, which
            # arrives later, settles cf (see after_close)
            return
        with self._lock:
            waiting = self._waiting.get(key)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(cf)
                if not waiting:
                    del self._waiting[key]
        if self._completer is not None:
            self.run_elsewhere(settle_cf, cf, result, exc)

    def run_elsewhere(self, fn: Callable[..., object], *args: Any) -> None:
        """``fn(*args)`` in a completer thread: where Parsl-visible Futures complete.

        Their done callbacks are user code that may block (waiting for
        another app), so never on the loop or the group-commit thread.
        """
        completer = self._completer
        if completer is not None:
            with contextlib.suppress(RuntimeError):  # shut down: a fresh thread below
                completer.submit(fn, *args)
                return
        threading.Thread(target=fn, args=args, daemon=True).start()

    def after_close(self, key: str, result: Any, exc: BaseException | None) -> None:
        """A leader finished after close: complete its followers directly."""
        with self._lock:
            waiting = self._waiting.pop(key, [])
        for cf in waiting:
            settle_cf(cf, result, exc)
