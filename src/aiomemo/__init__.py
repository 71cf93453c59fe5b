"""aiomemo: asyncio-native memoization and crash-safe checkpoints."""

from __future__ import annotations

from aiomemo._exceptions import (
    CheckpointError,
    CorruptCheckpointError,
    LeaderCancelledError,
    MemoError,
    MemoizerClosedError,
    StoreError,
    UnhashableInputError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "LeaderCancelledError",
    "MemoError",
    "MemoizerClosedError",
    "StoreError",
    "UnhashableInputError",
]
