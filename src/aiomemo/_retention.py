"""``Memoizer(retention=...)``: the ``aiomemo gc`` policy, run by the Memoizer at start.

The run starts once the checkpoints are loaded, as a background task whose
file work runs in a worker thread (the loop only copies the table's value
references and drops evicted entries, a slice at a time). What it never
touches (see :mod:`aiomemo._gc`):

* segments a writer holds (this run's own, other processes' running now),
  and every later segment of their dir;
* segments holding a large value this run loaded and left on disk (the
  memo reads it back on a hit): those segments, and the later ones of their
  dir, wait for a later run or ``aiomemo gc``;
* a record evicted for age or size is first dropped from this memo, so the
  run never serves what it removed (a later call of that task runs again).

Expired, forgotten and superseded records were never loaded, so removing
them changes nothing the run sees. A failure is a warning: the memo works on.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiomemo._exceptions import MaintenanceError
from aiomemo._gc import GcPlan, apply_gc, parse_age, parse_size, plan_gc
from aiomemo._records import ValueRef
from aiomemo._table import MemoTable

__all__ = ["Retention", "RetentionRun", "of"]

logger = logging.getLogger("aiomemo")

_SLICE = 4096  # evicted entries dropped per loop turn


@dataclass(frozen=True, slots=True)
class Retention:
    """A size and age budget for the checkpoints a Memoizer loads (``aiomemo gc``'s policy).

    Args:
        max_bytes: the most bytes the segment files may take (``"10GiB"``,
            ``"500MB"``: powers of 1024 / 1000, or an int); the least
            recently written records go first. None: no size budget.
        max_age: records written longer ago than this go (``"30d"``,
            ``"12h"``, seconds, or a timedelta). None: no age limit.

    Expired, forgotten and superseded records go either way.

    Raises:
        ValueError, TypeError: a size or age that does not parse.
    """

    max_bytes: int | str | None = None
    max_age: float | str | _dt.timedelta | None = None

    def __post_init__(self) -> None:
        try:
            if self.max_bytes is not None:
                if not isinstance(self.max_bytes, int | str) or isinstance(self.max_bytes, bool):
                    raise TypeError(
                        f"Retention(max_bytes=...) must be a str or int, not {self.max_bytes!r}"
                    )
                parse_size(self.max_bytes, "Retention(max_bytes=...)")
            if self.max_age is not None:
                if isinstance(self.max_age, bool) or not isinstance(
                    self.max_age, int | float | str | _dt.timedelta
                ):
                    raise TypeError(
                        f"Retention(max_age=...) must be a str, seconds or a timedelta, not {self.max_age!r}"
                    )
                parse_age(self.max_age, "Retention(max_age=...)")
        except MaintenanceError as exc:
            raise ValueError(str(exc)) from None


class RetentionRun:
    """The one start-time retention run of a Memoizer."""

    def __init__(self, policy: Retention, table: MemoTable) -> None:
        self.policy = policy
        self._table = table
        self._task: asyncio.Task[dict[str, Any] | None] | None = None

    def start(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        """Start the run over ``paths`` (what the Memoizer loaded) on the running loop."""
        if paths:
            self._task = asyncio.create_task(self._run(list(paths)), name="aiomemo-retention")

    async def report(self) -> dict[str, Any] | None:
        """Wait for the run; its summary (``aiomemo gc --json``'s), or None (none, or it failed)."""
        if self._task is None:
            return None
        return await asyncio.shield(self._task)

    async def _run(self, paths: list[str | os.PathLike[str]]) -> dict[str, Any] | None:
        try:
            loaded = list(self._table.loaded.values())  # a C copy; looked through off the loop
            plan = await asyncio.to_thread(
                _plan,
                loaded,
                paths,
                max_bytes=self.policy.max_bytes,
                max_age=self.policy.max_age,
                held="skip",
                verify=False,  # batch digests, as loading trusts them
            )
            if not any(d.changed for d in plan.dirs):
                return plan.summary(dry_run=False, bytes_out=plan.bytes_in)
            del loaded
            for n, raw in enumerate(plan.evicted, 1):
                self._table.remove(raw.hex(), raw)
                if not n % _SLICE:
                    await asyncio.sleep(0)
            left = await asyncio.to_thread(apply_gc, plan, held="skip")
            summary = plan.summary(dry_run=False, bytes_out=left)
        except Exception as exc:  # the memo works on without it
            msg = f"aiomemo: retention failed ({exc}); nothing more is removed this run"
            warnings.warn(msg, RuntimeWarning, stacklevel=1)
            logger.warning("%s", msg)
            return None
        logger.info(
            "aiomemo retention: removed %d records (%d bytes); %d records, %d bytes left",
            summary["records_removed"],
            summary["bytes_freed"],
            summary["records_out"],
            summary["bytes_out"],
        )
        return summary


def _plan(loaded: Sequence[object], paths: list[str | os.PathLike[str]], **kw: Any) -> GcPlan:
    """:func:`plan_gc` with the segments of the large values the memo left on disk pinned."""
    pinned: set[str] = set()
    for v in loaded:
        ref = v
        while isinstance(ref, ValueRef):  # the reference and its fallbacks
            pinned.add(ref.path)
            ref = ref.prev
    return plan_gc(paths, pinned=pinned, **kw)


def of(policy: object, table: MemoTable) -> RetentionRun | None:
    """The Memoizer's ``retention=`` argument, checked at construction."""
    if policy is None:
        return None
    if not isinstance(policy, Retention):
        raise TypeError(
            "retention must be an aiomemo.Retention (e.g. Retention(max_bytes='10GiB', "
            f"max_age='30d')) or None, not {policy!r}"
        )
    return RetentionRun(policy, table)
