"""The Memoizer's counters: one dataclass, shared by the parts that count."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Counters"]


@dataclass(slots=True)
class Counters:
    """What ``Memoizer.stats()`` reports, shared by the parts that count.

    Adapters bump ``hits`` from other threads: a lost increment under a race
    is acceptable for a statistic, a lock on every hit is not.
    """

    hits: int = 0
    misses: int = 0
    collapsed: int = 0
    checkpointed: int = 0
    unserializable: int = 0
    load_errors: int = 0
    write_errors: int = 0
    store_errors: int = 0
    remote_hits: int = 0
    records_loaded: int = 0
    expired: int = 0  # entries dropped because they expired (at load or on a lookup)
    forgotten: int = 0  # entries dropped by forget() or by tombstones at load
    last_checkpoint: float | None = None
