"""Stores: where finished results go and where a run finds them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiomemo.stores._base import Lease, LeaseStore, LoadReport, Record, Store

__all__ = [
    "Lease",
    "LeaseStore",
    "LoadReport",
    "LogStore",
    "MemoryStore",
    "Record",
    "RedisStore",
    "Store",
]

if TYPE_CHECKING:
    from aiomemo.stores._log import LogStore
    from aiomemo.stores._memory import MemoryStore
    from aiomemo.stores._redis import RedisStore


def __getattr__(name: str) -> Any:
    # Imported on demand so that the optional redis dependency is only needed
    # by those who use RedisStore.
    if name == "LogStore":
        from aiomemo.stores._log import LogStore

        return LogStore
    if name == "MemoryStore":
        from aiomemo.stores._memory import MemoryStore

        return MemoryStore
    if name == "RedisStore":
        from aiomemo.stores._redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'aiomemo.stores' has no attribute {name!r}")
