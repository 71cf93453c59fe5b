"""Lookup answers that need no await: a hit's done Future, and the thread-side claim.

``check_memo`` (the Memoizer) awaits the key, a disk read or the shared
stores; what it decides without awaiting is written here once, for it and
for adapters whose engine calls from another thread (ParslMemoizer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Literal

from aiomemo._counters import Counters
from aiomemo._flights import Flights, settle
from aiomemo._leases import SharedTier
from aiomemo._lifecycle import Life, Lifecycle
from aiomemo._table import MISSING, MemoTable, OnDisk, Raised

__all__ = ["ThreadClaim", "done_future"]

Claim = tuple[Literal["hit", "follow", "lead", "loop"], Any]


def done_future(loop: asyncio.AbstractEventLoop, value: Any) -> asyncio.Future[Any]:
    """A done Future for a memo entry (the same exception object for a Raised)."""
    fut: asyncio.Future[Any] = loop.create_future()
    if type(value) is Raised:
        fut.set_exception(value.rearm())
        fut.exception()  # a memo entry, not a lost error: no "never retrieved" log
    else:
        fut.set_result(value)
    return fut


def _settle_raised(fut: asyncio.Future[Any], value: Raised) -> None:
    settle(fut, exc=value.rearm())


class ThreadClaim:
    """``check_memo``'s common path for a caller on another thread (no loop hop).

    The Memoizer's ``claim_threadsafe`` is this object's :meth:`claim` (the
    bound method itself: no extra call on an adapter's hit path).
    """

    __slots__ = ("_counters", "_flights", "_life", "_shared", "_table")

    def __init__(
        self,
        life: Life,
        table: MemoTable,
        flights: Flights,
        shared: SharedTier,
        counters: Counters,
    ) -> None:
        self._life = life
        self._table = table
        self._flights = flights
        self._shared = shared
        self._counters = counters

    def claim(self, task: Mapping[str, Any], key: str, raw: bytes) -> Claim:
        """Decide a keyed task from any thread, or say it must go through ``check_memo``.

        ``task`` is keyed already (``key``/``raw``). Returns ``("hit", value)``
        (a result or a :class:`~aiomemo._table.Raised`), ``("follow",
        flight_future)`` (an identical task runs now; the Future belongs to
        the loop), ``("lead", None)`` (a miss: the caller runs the task and
        reports through ``update_memo_result``/``update_memo_exception`` on
        the loop), or ``("loop", None)``: not decidable here (not started,
        shared stores to ask, a value to read from disk) and the caller
        goes through ``check_memo``.
        """
        life = self._life
        loop = life.loop
        if life.state is not Lifecycle.STARTED or loop is None or self._shared:
            return "loop", None
        if "refresh" in task or "ttl" in task:
            return "loop", None
        value = self._table.lookup(key, raw, task, read=False)
        if type(value) is OnDisk:
            return "loop", None
        if value is not MISSING:
            self._counters.hits += 1
            return "hit", value
        flight, leads = self._flights.claim(key, loop)
        if not leads:
            self._counters.collapsed += 1
            return "follow", flight.future
        # a leader may have finished between the lookup and the claim
        value = self._table.done.get(key, MISSING)
        if value is not MISSING:
            # followers that found this flight meanwhile get the value (on the loop)
            self._flights.finish(key, flight)
            if type(value) is Raised:
                loop.call_soon_threadsafe(_settle_raised, flight.future, value)
            else:
                loop.call_soon_threadsafe(settle, flight.future, value)
            self._counters.hits += 1
            return "hit", value
        self._counters.misses += 1
        return "lead", None
