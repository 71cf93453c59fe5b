"""aiomemo: asyncio-native memoization and crash-safe checkpoints.

Public names live here; the modules behind them are private.
"""

from __future__ import annotations

from aiomemo._exceptions import (
    CheckpointError,
    CheckpointPathError,
    CodecError,
    CorruptCheckpointError,
    LeaderCancelledError,
    MaintenanceError,
    MemoError,
    MemoizerClosedError,
    MemoizerUsageError,
    StoreError,
    UnencodableResultError,
    UnhashableInputError,
    UnknownFunctionError,
)
from aiomemo._explain import Explanation
from aiomemo._hashing import File, id_for_memo, make_hash
from aiomemo._memoizer import CheckpointMode, Memoizer, MemoStats, Task, TaskRecord
from aiomemo._retention import Retention
from aiomemo._rundir import get_all_checkpoints, get_last_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointMode",
    "CheckpointPathError",
    "CodecError",
    "CorruptCheckpointError",
    "Explanation",
    "File",
    "LeaderCancelledError",
    "MaintenanceError",
    "MemoError",
    "MemoStats",
    "Memoizer",
    "MemoizerClosedError",
    "MemoizerUsageError",
    "Retention",
    "StoreError",
    "Task",
    "TaskRecord",
    "UnencodableResultError",
    "UnhashableInputError",
    "UnknownFunctionError",
    "get_all_checkpoints",
    "get_last_checkpoint",
    "id_for_memo",
    "make_hash",
]
