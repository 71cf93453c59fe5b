"""The final pass of a closing Memoizer, over its parts.

The drain stops, in-flight tasks are abandoned (their followers get
:class:`~aiomemo.MemoizerClosedError`, their leases are released), what is
queued is written once more, then the stores close. Whatever fails on the
way, no caller is left waiting and every store is closed; records that could
not be saved are counted in the :class:`~aiomemo.CheckpointError` raised at
the end.
"""

from __future__ import annotations

import asyncio
import logging

from aiomemo._drain import Drain
from aiomemo._exceptions import CheckpointError
from aiomemo._flights import Flights
from aiomemo._leases import SharedTier
from aiomemo._table import MemoTable

__all__ = ["adopt", "close_parts"]

logger = logging.getLogger("aiomemo")

_CLOSED_MID_TASK = "the Memoizer closed before this task finished"


def adopt(drain: Drain, flights: Flights) -> None:
    """Take the parts over to the running loop for closing: the Memoizer's own loop is gone."""
    logger.warning("aiomemo: closing from another event loop (its own has stopped)")
    drain.rebind()
    for _, fl in flights.drain():
        fl.renewal = None  # tasks of a dead loop: nothing to cancel


async def close_parts(
    mode: str | None, drain: Drain, shared: SharedTier, flights: Flights, table: MemoTable
) -> None:
    """The final checkpoint (every ``mode`` but None, or what is pending), then close it all.

    Raises:
        CheckpointError: records that could not be saved (how many, and why).
    """
    unsaved = 0
    errors: list[str] = []
    try:
        await drain.stop()
        # followers of other processes' tasks stop waiting, and so do
        # followers of ours (MemoizerClosedError); our leases are let go
        shared.stop_waits()
        flights.abandon_all(_CLOSED_MID_TASK, shared.release_flight)
        await shared.settle(5)
        if mode is not None or drain.pending():
            await asyncio.shield(drain.flush(final=True))
        unsaved, errors = drain.unsaved()
    finally:
        drain.release_commit()  # whatever happened, no task_exit caller waits forever
        flights.abandon_all(_CLOSED_MID_TASK)
        shared.cancel_all()
        errors += await drain.close_stores()
        table.close()
    if unsaved:
        raise CheckpointError(
            f"{unsaved} checkpoint record(s) could not be saved: " + "; ".join(errors),
            unsaved=unsaved,
        )
