"""A thread-to-loop portal: an asyncio loop on its own thread, callable from any other.

Synchronous engines (Parsl's DataFlowKernel, executor threads) drive an
asyncio Memoizer through it, as anyio's ``BlockingPortal`` does: ``call``
runs a coroutine on the loop and waits for it, ``submit`` schedules one and
returns a ``concurrent.futures.Future``. After ``stop()`` both raise
:class:`PortalClosedError` and the coroutine is not run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiomemo._exceptions import MemoizerClosedError

__all__ = ["Portal", "PortalClosedError"]

T = TypeVar("T")


class PortalClosedError(MemoizerClosedError):
    """The portal's loop stopped (or is stopping): the call did not run.

    A :class:`~aiomemo.MemoizerClosedError`: the Memoizer behind the portal is gone.
    """


class Portal:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._stopping = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._started.set)
        try:
            loop.run_forever()
        finally:
            try:
                # like asyncio.run: cancel what is left, let callbacks run once
                leftovers = asyncio.all_tasks(loop)
                for t in leftovers:
                    t.cancel()
                loop.run_until_complete(
                    asyncio.gather(*leftovers, asyncio.sleep(0), return_exceptions=True)
                )
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def on_loop_thread(self) -> bool:
        """True when called from the loop's own thread."""
        return threading.get_ident() == self._thread.ident

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; raises PortalClosedError once stopping."""
        with self._lock:
            if self._stopping:
                coro.close()
                raise PortalClosedError("the aiomemo loop is stopped")
            return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it (from any other thread).

        Raises:
            PortalClosedError: the loop stopped before the call could finish.
            RuntimeError: called on the loop's own thread (it would deadlock).
        """
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError("a blocking aiomemo call was made on its own event-loop thread")
        fut = self.submit(coro)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise PortalClosedError("the aiomemo loop stopped during the call") from None

    def stop(self) -> None:
        """Stop the loop (pending calls are cancelled) and join the thread. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.on_loop_thread():
            self._thread.join()
