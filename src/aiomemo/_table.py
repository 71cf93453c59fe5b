"""The memo table: finished tasks by key, decoded on their first hit.

Two dicts: ``done`` (hex key -> result, or :class:`Raised`) for what this
run finished or already decoded, and ``loaded`` (raw key -> encoded result)
for checkpoint records not used yet. A hit on a loaded record decodes it
once and moves it to ``done``. Plain values rather than one Future per
entry: a big memo costs less memory and the garbage collector has far less
to walk; callers wrap a hit in the kind of Future they need.

:meth:`MemoTable.lookup` is safe from any thread (an adapter answers hits in
the engine's own thread with it): dict reads are atomic, and the one
compound step (decode, then move from ``loaded`` to ``done``) runs under a
lock that guards no I/O. Writers (the Memoizer, on its loop) only ever add
to ``done`` and remove from ``loaded``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, cast

from aiomemo import _codec
from aiomemo._counters import Counters
from aiomemo.stores._base import LoadReport

__all__ = ["MISSING", "MemoTable", "Raised"]

logger = logging.getLogger("aiomemo")

#: "no entry" (a stored None is a result)
MISSING: Any = object()


class Raised:
    """A memoized exception: the same object is raised on every hit.

    Raising an exception appends the raising frames to its traceback, so an
    exception re-raised on every hit would grow without end (two entries per
    hit). The traceback it had when it was memoized is kept and put back
    before each hit hands it out: every hit shows the original failure plus
    its own frames only.
    """

    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.tb: TracebackType | None = exc.__traceback__

    def rearm(self) -> BaseException:
        """The exception with its memoized traceback back in place."""
        self.exc.__traceback__ = self.tb
        return self.exc


class MemoTable:
    """Finished tasks by key: decoded entries, still-encoded loaded ones, Parsl keys."""

    __slots__ = ("_counters", "_decode_lock", "done", "has_parsl_keys", "loaded", "parsl_keys")

    def __init__(self, counters: Counters, *, parsl_keys: bool = False) -> None:
        self._counters = counters
        self.parsl_keys = parsl_keys
        self.has_parsl_keys = False
        self.done: dict[str, Any] = {}
        self.loaded: dict[bytes, bytes] = {}
        self._decode_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.done) + len(self.loaded)

    # ------------------------------------------------------------ reads
    def lookup(self, key: str, raw: bytes, task: Mapping[str, Any] | None = None) -> Any:
        """The entry for ``key``: a result, a :class:`Raised`, or :data:`MISSING`.

        Thread-safe. A loaded record is decoded here (once); with ``task``
        and Parsl keys loaded, the task's Parsl key is tried too.
        """
        value = self.done.get(key, MISSING)
        if value is not MISSING:
            return value
        enc = self.loaded.get(raw)
        if enc is None and task is not None and self.has_parsl_keys:
            praw = self._parsl_key(task)
            enc = self.loaded.get(praw) if praw else None
            raw = praw
        if enc is None:
            # another thread may have decoded it just now (done before loaded)
            return self.done.get(key, MISSING)
        return self._decode(key, raw, enc)

    def finished(self, key: str) -> Any:
        """The entry already in ``done`` (no decoding), or :data:`MISSING`."""
        return self.done.get(key, MISSING)

    def _decode(self, key: str, raw: bytes, enc: bytes) -> Any:
        try:
            value = _codec.decode(enc)
        except _codec.CodecError as exc:
            with self._decode_lock:
                if self.loaded.pop(raw, None) is not None:
                    self._counters.load_errors += 1
            logger.warning("checkpointed result for %s could not be decoded: %s", key, exc)
            return MISSING
        with self._decode_lock:
            # first decoder wins: every hit gets the same object
            value = self.done.setdefault(key, value)
            self.loaded.pop(raw, None)  # in done before it leaves loaded
        return value

    @staticmethod
    def _parsl_key(task: Mapping[str, Any]) -> bytes:
        try:
            from parsl.dataflow.memoization import make_hash as parsl_make_hash
        except ImportError:
            return b""
        try:
            t = dict(task)
            t.pop("hashsum", None)
            t.setdefault("ignore_for_cache", [])
            return bytes.fromhex(parsl_make_hash(cast(Any, t)))
        except Exception:  # Parsl cannot key it: no Parsl record either
            return b""

    # ------------------------------------------------------------ writes
    def put(self, key: str, value: Any) -> None:
        """Record a result (or a :class:`Raised`) for ``key``."""
        self.done[key] = value

    def absorb(self, rep: LoadReport) -> list[str]:
        """Take a load's records (newest wins); return its problem lines."""
        # a scan of every key: only when Parsl-key lookups were asked for
        if self.parsl_keys and not self.has_parsl_keys:
            self.has_parsl_keys = any(len(k) == 16 for k in rep.table)
        if self.loaded:
            self.loaded.update(rep.table)
        else:
            self.loaded = rep.table  # no copy: a million entries cost ~40 MB of dict
        self._counters.load_errors += max(rep.skipped, len(rep.errors))
        return list(rep.errors)
