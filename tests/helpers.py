"""Helpers the test modules share (tests import this module, never each other).

``mk`` and ``run`` play the execution engine against a Memoizer: build a task
dict the way Parsl's DataFlowKernel does, then check, run on a miss, report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiomemo import Memoizer
from aiomemo._checkpoint import encode_batch, file_header
from aiomemo.stores import Record


def add(a: int, b: int = 0) -> int:
    """A task function."""
    return a + b


def mk(*args: Any, func: Any = add, **kwargs: Any) -> dict[str, Any]:
    return {"func": func, "args": args, "kwargs": kwargs, "id": 0}


async def run(memo: Memoizer, task: dict[str, Any], result: Any) -> Any:
    """Play the engine: check, run on a miss, report."""
    fut = await memo.check_memo(task)
    if fut is not None:
        return await fut
    await memo.update_memo_result(task, result)
    return result


async def spin(turns: int = 50) -> None:
    """Let the loop run a fixed number of turns (no wall clock)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def spin_until(cond: Callable[[], bool], turns: int = 500) -> None:
    """Let the loop run until ``cond()`` holds; fail after ``turns`` turns."""
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def segment_bytes(records: list[Record]) -> bytes:
    """A whole segment holding ``records`` (file header, then one batch)."""
    return file_header() + encode_batch(records)


def write_segment_file(directory: Path, records: list[Record], name: str = "seg-1.amlog") -> Path:
    """Write a segment holding ``records`` as ``directory / name`` (directories created)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(segment_bytes(records))
    return path
