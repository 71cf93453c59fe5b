"""Expiry of memo entries: the ``ttl`` option, checked once, and the clock.

``Memoizer(ttl=...)`` is the default for every task; ``memo.cached(ttl=...)``
and the task field ``ttl`` override it per function / per task (None there:
the Memoizer's). A result recorded at ``t`` expires at ``t + ttl``: its
record carries that absolute time (segment format 3, see
:mod:`aiomemo._records`), the table drops the entry on the first lookup at
or after it, a later load leaves the record out, and a shared store keeps
the value no longer than that.

:func:`now` is the one clock every part reads (tests replace it).
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["NO_TTL", "expires_of", "now", "ttl_of"]

#: the task field ``ttl`` set to this means "no expiry", even with a Memoizer default
NO_TTL = math.inf

now = time.time


def ttl_of(value: object, name: str = "ttl") -> float | None:
    """Seconds from a number or a ``timedelta`` (None: no expiry).

    Raises:
        TypeError: a bool, a str or another type.
        ValueError: zero, negative, NaN.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | _dt.timedelta):
        raise TypeError(
            f"{name} must be a number of seconds, a timedelta or None, not {value!r}"
        )
    seconds = value.total_seconds() if isinstance(value, _dt.timedelta) else float(value)
    if not seconds > 0:  # also NaN
        raise ValueError(f"{name} must be positive seconds (or None for no expiry), not {value!r}")
    return seconds


def task_ttl(task: Mapping[str, Any], default: float | None) -> float | None:
    """The ttl that applies to ``task``: its ``ttl`` field, else ``default``."""
    if "ttl" not in task:
        return default
    value = task["ttl"]
    if value is None:
        return default
    return ttl_of(value, "task['ttl']")


def expires_of(ttl: float | None, when: float) -> float:
    """The absolute expiry of a result recorded at ``when`` (inf: never)."""
    return math.inf if ttl is None else when + ttl
