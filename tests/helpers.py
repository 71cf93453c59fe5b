"""Helpers the test modules share (tests import this module, never each other).

``mk`` and ``run`` play the execution engine against a Memoizer: build a task
dict the way Parsl's DataFlowKernel does, then check, run on a miss, report.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pathlib
import shutil
import subprocess
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


# ---------------------------------------------------------------- other Pythons

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: what the venvs get: aiomemo's core dependencies (as in pyproject) + numpy
DEPS = ["aiofiles>=23.1", "msgpack>=1.0.5", "blake3>=0.4", "numpy>=1.24"]


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` that runs: under pyenv's versions, else on PATH.

    (A pyenv shim may be on PATH for a version that is not installed.)
    """
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    pattern = os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")
    cands = sorted(glob.glob(pattern))
    on_path = shutil.which(f"python{version}")
    if on_path:
        cands.append(on_path)
    for exe in cands:
        try:
            res = subprocess.run(
                [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except OSError:
            continue
        if res.returncode == 0 and res.stdout.strip() == version:
            return exe
    return None


def venv_for(version: str, exe: str) -> pathlib.Path:
    """``.venv-py<version>`` with DEPS installed (made once, reused)."""
    venv = ROOT / f".venv-py{version}"
    py = venv / "bin" / "python"
    stamp = venv / ".aiomemo-deps"
    want = "\n".join(DEPS)
    if py.exists() and stamp.exists() and stamp.read_text() == want:
        return py
    subprocess.run([exe, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    res = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", *DEPS], capture_output=True, text=True
    )
    assert res.returncode == 0, f"pip install into {venv} failed:\n{res.stderr[-3000:]}"
    stamp.write_text(want)
    return py
