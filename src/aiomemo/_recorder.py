"""Records: a finished task's result encoded for the stores, with its function's name."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping
from typing import Any

from aiomemo import _codec, _expiry, _fingerprint
from aiomemo._counters import Counters
from aiomemo._hashing import KeyHook, arg_digests
from aiomemo._naming import func_name
from aiomemo._records import NEVER
from aiomemo.stores._base import Record

__all__ = ["RecordMaker"]

logger = logging.getLogger("aiomemo")


class RecordMaker:
    """Encodes results into :class:`Record` s; warns once per type that cannot be encoded."""

    __slots__ = ("_counters", "_func_names", "_hooks", "_warned_types", "explain")

    def __init__(
        self, counters: Counters, *, explain: bool, hooks: tuple[KeyHook, ...] = ()
    ) -> None:
        self._counters = counters
        self._hooks = hooks
        self.explain = explain
        self._func_names: dict[object, str] = {}
        self._warned_types: set[str] = set()

    def name_of(self, func: object) -> str:
        """``"module.qualname"`` of ``func`` (cached for the first 10,000 functions)."""
        try:
            return self._func_names[func]
        except (KeyError, TypeError):
            name = func_name(func)
            if len(self._func_names) < 10_000:
                with contextlib.suppress(TypeError):
                    self._func_names[func] = name
            return name

    def make(
        self,
        task: Mapping[str, Any],
        key: str,
        r: Any,
        expires: float = NEVER,
        *,
        name: str | None = None,
        raw: bytes | None = None,
    ) -> Record | None:
        """The record of ``task`` (hex ``key``) finished with ``r``; None when ``r`` cannot be encoded.

        ``expires``: the record's absolute expiry (default: never). ``name``
        (the function's name) and ``raw`` (``key`` as bytes), when the
        caller has them already.
        """
        try:
            value = _codec.encode(r)
        except _codec.UnencodableResultError as exc:
            self._counters.unserializable += 1
            tname = exc.type_name
            if tname not in self._warned_types:
                self._warned_types.add(tname)
                msg = (
                    f"aiomemo: results of type {tname} cannot be checkpointed ({exc}); "
                    "they stay memoized in memory for this run"
                )
                warnings.warn(msg, RuntimeWarning, stacklevel=4)
                logger.warning("%s", msg)
            return None
        func = task.get("func")
        if name is None:
            name = self.name_of(func)
        digests = arg_digests(task, self._hooks) if self.explain else b""
        if digests and task.get("track_code"):
            digests = _fingerprint.with_code_digests(digests, func)
        if raw is None:
            raw = bytes.fromhex(key)
        return Record(raw, value, name, _expiry.now(), digests, expires)
