"""Flights: tasks running now, by key, and the followers that wait on them.

A :class:`Flight` is born on a miss (the caller leads), is followed by the
identical tasks that arrive while it runs (collapse), and ends exactly once
through :meth:`Flights.finish`: with the leader's result, its exception, or
an error saying why it was abandoned (cancelled, closed, a remote holder
gone). Ending it stops its lease renewal; what to do with the lease (the
I/O: complete or release) is the caller's next step, outside any lock.

The registry is guarded by a lock that covers dict operations only (as
httpcore's pool guards its state), so adapters may look flights up from
their own threads; a flight's Future belongs to the Memoizer's loop and is
settled there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiomemo._exceptions import MemoizerClosedError

if TYPE_CHECKING:
    from aiomemo.stores._base import Lease, Store

__all__ = ["Flight", "Flights", "follow", "settle"]

_NOTHING: Any = object()


@dataclass(slots=True)
class Flight:
    """A task running now (in this process, or elsewhere behind a lease)."""

    future: asyncio.Future[Any]
    lease: Lease | None = None
    lease_store: Store | None = None
    renewal: asyncio.Task[None] | None = None
    #: someone follows it (set under the registry's lock): its Future must be settled
    followed: bool = False

    def stop_renewal(self) -> None:
        if self.renewal is not None:
            self.renewal.cancel()
            self.renewal = None


def settle(
    fut: asyncio.Future[Any], value: Any = _NOTHING, exc: BaseException | None = None
) -> None:
    """Complete ``fut`` with ``value`` or ``exc`` unless it is done already.

    An exception is marked retrieved: it is a memo entry or a message to
    followers, not an error nobody saw ("exception was never retrieved").
    """
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
        fut.exception()
    else:
        fut.set_result(value)


def follow(leader: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    """A follower's own Future: cancelling it leaves the leader and other followers alone."""
    mine: asyncio.Future[Any] = loop.create_future()

    def _copy(src: asyncio.Future[Any]) -> None:
        if mine.done():
            return
        if src.cancelled():
            mine.cancel()
        elif (exc := src.exception()) is not None:
            mine.set_exception(exc)
        else:
            mine.set_result(src.result())

    leader.add_done_callback(_copy)
    return mine


class Flights:
    """The registry of flights by hex key (only when collapsing)."""

    __slots__ = ("_by_key", "_lock", "collapse")

    def __init__(self, *, collapse: bool) -> None:
        self.collapse = collapse
        self._by_key: dict[str, Flight] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> Flight | None:
        """The flight running ``key`` now, if any (thread-safe)."""
        return self._by_key.get(key)

    def begin(self, key: str, loop: asyncio.AbstractEventLoop) -> Flight:
        """A new flight led by the caller (registered when collapsing)."""
        flight = Flight(loop.create_future())
        if self.collapse:
            with self._lock:
                self._by_key[key] = flight
        return flight

    def claim(self, key: str, loop: asyncio.AbstractEventLoop) -> tuple[Flight, bool]:
        """The flight of ``key`` and whether the caller leads it (thread-safe, atomic).

        When collapsing, an existing flight is returned for the caller to
        follow (False); otherwise a new one is registered, led by the caller
        (True). Without collapse every caller leads an unregistered flight.
        """
        if not self.collapse:
            return Flight(loop.create_future()), True
        with self._lock:
            current = self._by_key.get(key)
            if current is not None:
                current.followed = True
                return current, False
            flight = self._by_key[key] = Flight(loop.create_future())
        return flight, True

    def finish(
        self,
        key: str,
        flight: Flight | None = None,
        *,
        value: Any = _NOTHING,
        exc: BaseException | None = None,
    ) -> Flight | None:
        """End the flight of ``key`` (or ``flight``, if still registered or not).

        Unregisters it, stops its lease renewal and settles its Future with
        ``value`` or ``exc`` (followers get it). Returns the flight, so the
        caller can complete or release its lease; None when there was none.
        """
        with self._lock:
            current = self._by_key.get(key)
            if flight is None:
                flight = current
            if flight is not None and current is flight:
                del self._by_key[key]
        if flight is None:
            return None
        flight.stop_renewal()
        if exc is not None or value is not _NOTHING:
            settle(flight.future, value, exc)
        return flight

    def abandon_all(self, why: str, release: Callable[[Flight], None] | None = None) -> None:
        """End every flight: followers get MemoizerClosedError(``why``); ``release`` each lease."""
        for _key, fl in self.drain():
            fl.stop_renewal()
            if release is not None:
                release(fl)
            settle(fl.future, exc=MemoizerClosedError(why))

    def drain(self) -> list[tuple[str, Flight]]:
        """Unregister and return every flight (close)."""
        with self._lock:
            items = list(self._by_key.items())
            self._by_key.clear()
        return items
