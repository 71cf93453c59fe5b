"""``Memoizer(retention=...)``: the ``aiomemo gc`` policy, run by the Memoizer at start.

The run starts once the checkpoints are loaded, as a background task; the
plan and the rewrite run in a child process (:mod:`aiomemo._retention_child`),
so their allocations never set off a garbage collection in the Memoizer's
process (a full one walks the memo's table while the loop waits). The loop
only collects the pinned segments and drops evicted entries, a slice at a
time. What the run never touches (see :mod:`aiomemo._gc`):

* segments a writer holds (this run's own, other processes' running now),
  and every later segment of their dir;
* segments holding a large value this run loaded and left on disk (the
  memo reads it back on a hit): those segments, and the later ones of their
  dir, wait for a later run or ``aiomemo gc``;
* a record evicted for age or size is first dropped from this memo (the
  child sends the keys, then waits to be told to rewrite), so the run never
  serves what it removed (a later call of that task runs again).

Expired, forgotten and superseded records were never loaded, so removing
them changes nothing the run sees. A failure (the child's error, or its
death) is a warning: the memo works on. ``close()`` ends a child that has
not started rewriting and waits for one that has.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiomemo._exceptions import MaintenanceError
from aiomemo._gc import parse_age, parse_size
from aiomemo._records import ValueRef
from aiomemo._retention_wire import HEADER, unpack_keys
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
    """The one start-time retention run of a Memoizer, in a child process."""

    def __init__(self, policy: Retention, table: MemoTable) -> None:
        self.policy = policy
        self._table = table
        self._task: asyncio.Task[dict[str, Any] | None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._applying = False  # the child was told to rewrite
        self._stopping = False
        self._err: asyncio.Task[str] | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (None before and after)."""
        proc = self._proc
        return None if proc is None or proc.returncode is not None else proc.pid

    def start(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        """Start the run over ``paths`` (what the Memoizer loaded) on the running loop."""
        if paths:
            self._task = asyncio.create_task(self._run(list(paths)), name="aiomemo-retention")

    async def report(self) -> dict[str, Any] | None:
        """Wait for the run; its summary (``aiomemo gc --json``'s), or None (none, or it failed)."""
        if self._task is None:
            return None
        return await asyncio.shield(self._task)

    async def stop(self) -> None:
        """For ``close()``: end a run that has changed nothing yet, or wait for its rewrite."""
        if self._task is None or self._task.done():
            return
        self._stopping = True
        proc = self._proc
        if proc is not None and not self._applying and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # it has only read so far
        await self.report()

    async def _run(self, paths: list[str | os.PathLike[str]]) -> dict[str, Any] | None:
        summary: dict[str, Any] | None = None
        try:
            summary = await self._converse(paths)
        except Exception as exc:  # the memo works on without it
            if self._stopping and not self._applying:
                logger.info("aiomemo retention: stopped by close() before it changed anything")
                return None
            msg = f"aiomemo: retention failed ({exc}); nothing more is removed this run"
            warnings.warn(msg, RuntimeWarning, stacklevel=1)
            logger.warning("%s", msg)
            return None
        finally:
            await self._reap(ended=summary is not None)
        logger.info(
            "aiomemo retention: removed %d records (%d bytes); %d records, %d bytes left",
            summary["records_removed"],
            summary["bytes_freed"],
            summary["records_out"],
            summary["bytes_out"],
        )
        return summary

    async def _converse(self, paths: list[str | os.PathLike[str]]) -> dict[str, Any]:
        policy = self.policy
        request = {
            "paths": [os.fspath(p) for p in paths],
            "max_bytes": None if policy.max_bytes is None else parse_size(policy.max_bytes),
            "max_age": None if policy.max_age is None else parse_age(policy.max_age),
            "pinned": sorted(await self._pinned()),
        }
        if self._stopping:
            raise MaintenanceError("stopped")
        proc = self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            CHILD,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(),
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self._err = asyncio.create_task(_tail(proc.stderr))
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        await proc.stdin.drain()
        while True:
            tag, payload = await self._frame(proc.stdout)
            if tag == b"K":  # evicted: dropped from the memo before any file changes
                for n, raw in enumerate(unpack_keys(payload), 1):
                    self._table.remove(raw.hex(), raw)
                    if not n % _SLICE:
                        await asyncio.sleep(0)
                await asyncio.sleep(0)
            elif tag == b"P":
                if not json.loads(payload)["changed"]:
                    return self._summary(await self._frame(proc.stdout))
                if self._stopping:
                    raise MaintenanceError("stopped")
                self._applying = True
                proc.stdin.write(b"apply\n")
                await proc.stdin.drain()
                return self._summary(await self._frame(proc.stdout))
            else:
                self._summary((tag, payload))  # an error: raises
                raise MaintenanceError(f"unexpected message {tag!r} from its process")

    async def _frame(self, stream: asyncio.StreamReader) -> tuple[bytes, bytes]:
        try:
            head = await stream.readexactly(HEADER.size)
            tag, n = HEADER.unpack(head)
            return tag, await stream.readexactly(n)
        except asyncio.IncompleteReadError:
            code = await self._proc.wait() if self._proc is not None else None
            err = (await self._err).strip() if self._err is not None else ""
            last = err.splitlines()[-1] if err else ""
            raise MaintenanceError(
                f"its process ended early (exit status {code}{': ' + last if last else ''})"
            ) from None

    @staticmethod
    def _summary(frame: tuple[bytes, bytes]) -> dict[str, Any]:
        tag, payload = frame
        body = json.loads(payload)
        if tag == b"S":
            return dict(body)
        if tag == b"E":
            raise MaintenanceError(str(body.get("error")))
        raise MaintenanceError(f"unexpected message {tag!r} from its process")

    async def _reap(self, *, ended: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # one waiting to be told to rewrite exits unchanged
        if not ended and not self._applying and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # it has only read (an error or a cancellation here)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._err is not None:
            await self._err
        self._proc = None

    async def _pinned(self) -> set[str]:
        """The segments of the large values the memo left on disk (the loop, in slices)."""
        pinned: set[str] = set()
        loaded = list(self._table.loaded.values())  # a C copy
        for n, v in enumerate(loaded, 1):
            ref: object = v
            while isinstance(ref, ValueRef):  # the reference and its fallbacks
                pinned.add(ref.path)
                ref = ref.prev
            if not n % (_SLICE * 16):
                await asyncio.sleep(0)
        return pinned


CHILD = "aiomemo._retention_child"


def _child_env() -> dict[str, str]:
    """This environment, with the dir aiomemo was imported from first on the child's path."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


async def _tail(stream: asyncio.StreamReader, keep: int = 8192) -> str:
    """What the child writes to stderr (its last ``keep`` bytes)."""
    buf = b""
    while chunk := await stream.read(65536):
        buf = (buf + chunk)[-keep:]
    return buf.decode(errors="replace")


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
