"""A Memoizer's life: NEW -> STARTED -> CLOSED, the event loop it belongs to, its run dir.

:class:`Life` is the one place these facts live; the Memoizer's parts read
them (``state``, ``loop``), only the Memoizer moves them on. It also owns the
two state machines around the work of starting and closing: ``start()`` runs
once however many callers race, ``close()`` runs once, waits for a close in
progress, and closes from another event loop (on the Memoizer's own loop
while that still runs, else on the caller's).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from aiomemo._exceptions import MemoizerClosedError, MemoizerUsageError

__all__ = ["Life", "Lifecycle"]


class Lifecycle(enum.Enum):
    """Where a Memoizer is in its life: NEW -> STARTED -> CLOSED (never back)."""

    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


class Life:
    """The lifecycle state, loop and run dir of one Memoizer."""

    __slots__ = ("_closing", "_start_lock", "loop", "run_dir", "state")

    def __init__(self, run_dir: Path | None) -> None:
        self.state = Lifecycle.NEW
        self.loop: asyncio.AbstractEventLoop | None = None
        #: where the run writes (given, or chosen when it starts)
        self.run_dir = run_dir
        self._start_lock: asyncio.Lock | None = None
        self._closing: asyncio.Future[None] | None = None

    def check_open(self) -> None:
        if self.state is Lifecycle.CLOSED:
            raise MemoizerClosedError("this Memoizer is closed")

    def check_loop(self) -> None:
        """The caller runs on the Memoizer's loop, or gets a clear error."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self.loop:
            raise MemoizerUsageError(
                "this Memoizer is bound to another event loop (the one it started on); "
                "make one Memoizer per event loop, e.g. inside the asyncio.run() that uses it"
            )

    def check_call(self) -> None:
        """Not closed, and (once started) called on the Memoizer's own loop (a coroutine's check)."""
        self.check_open()
        if self.loop is not None and asyncio.get_running_loop() is not self.loop:
            self.check_loop()

    async def start(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` once (it sets ``state`` to STARTED when it succeeds). Idempotent."""
        if self.state is Lifecycle.STARTED:
            self.check_loop()
            return
        if self.state is Lifecycle.CLOSED:
            raise MemoizerClosedError("this Memoizer was closed; make a new one")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.state is Lifecycle.NEW:
                await work()

    async def ensure_started(self, start: Callable[[], Awaitable[None]]) -> None:
        if self.state is not Lifecycle.STARTED:
            self.check_open()
            await start()
        else:
            self.check_loop()

    async def close(
        self,
        again: Callable[[], Coroutine[Any, Any, None]],
        adopt: Callable[[], None],
        work: Callable[[], Awaitable[None]],
    ) -> None:
        """Run the final ``work`` of a started Memoizer once; CLOSED from here on.

        Called from another event loop: ``again()`` (the whole close) runs on
        the Memoizer's own loop if it still runs; if that loop is gone,
        ``adopt()`` takes the parts over to the caller's loop first.
        """
        if self.loop is not None and self.state is Lifecycle.STARTED:
            loop = asyncio.get_running_loop()
            if loop is not self.loop:
                if self.loop.is_running():
                    cf = asyncio.run_coroutine_threadsafe(again(), self.loop)
                    await asyncio.wrap_future(cf)
                    return
                self.loop = loop
                adopt()
        if self._closing is not None:
            # another close() is making the final checkpoint: wait for it
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closing)
            return
        if self.state is Lifecycle.CLOSED:
            return
        if self.state is not Lifecycle.STARTED:
            # never started; a start() in progress sees CLOSED when it ends
            # and closes what it opened
            self.state = Lifecycle.CLOSED
            return
        self.state = Lifecycle.CLOSED
        assert self.loop is not None
        self._closing = self.loop.create_future()
        try:
            await work()
        finally:
            self._closing.set_result(None)
