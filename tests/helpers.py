"""Helpers the test modules share (tests import this module, never each other).

``mk`` and ``run`` play the execution engine against a Memoizer: build a task
dict the way Parsl's DataFlowKernel does, then check, run on a miss, report.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiomemo import Memoizer, StoreError
from aiomemo._checkpoint import encode_batch, file_header
from aiomemo.stores import Lease, LeaseStore, MemoryStore, Record, Store

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


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


# ---------------------------------------------------------------- stores that misbehave on cue


class GateStore(MemoryStore):
    """A MemoryStore whose first put_many blocks until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.calls = 0

    async def put_many(self, records: Sequence[Record]) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.gate.wait()
        await super().put_many(records)


class SlowOpenStore(MemoryStore):
    """A MemoryStore whose open() blocks until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.opening = False

    async def open(self, *, run_dir: pathlib.Path | None = None) -> None:
        self.opening = True
        await self.gate.wait()


class PutLease(Lease):
    """An always-held lease whose completion is a plain put_many of its store."""

    __slots__ = ("store",)

    def __init__(self, store: Store, key: bytes, ttl: float) -> None:
        super().__init__(key, "token", ttl)
        self.store = store

    async def renew(self) -> bool:
        return True

    async def release(self) -> None:
        return None

    async def complete(self, record: Record) -> bool:
        await self.store.put_many([record])
        return True


class GrantedLease(PutLease):
    """A lease of ClaimStore: complete() goes through the store's put gate."""

    __slots__ = ()
    store: ClaimStore

    async def complete(self, record: Record) -> bool:
        self.store.in_put += 1
        await self.store.put_gate.wait()
        return await super().complete(record)


class ClaimStore(LeaseStore):
    """A shared store with leases (always granted); get/lease completion may block on gates."""

    def __init__(self, *, block_get: bool = False, block_put: bool = False) -> None:
        self.records: dict[bytes, bytes] = {}
        self.get_gate = asyncio.Event()
        self.put_gate = asyncio.Event()
        if not block_get:
            self.get_gate.set()
        if not block_put:
            self.put_gate.set()
        self.in_get = 0
        self.in_put = 0

    async def get(self, key: bytes) -> bytes | None:
        self.in_get += 1
        await self.get_gate.wait()
        return self.records.get(key)

    async def put_many(self, records: Sequence[Record]) -> None:
        for r in records:
            self.records[r.key] = r.value

    async def claim(self, key: bytes, ttl: float) -> Lease | None:
        return GrantedLease(self, key, ttl)

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:
        return self.records.get(key)


class FailOnceStore(MemoryStore):
    """A MemoryStore whose first put_many fails with a StoreError, then works."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def put_many(self, records: Sequence[Record]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise StoreError("injected: transient I/O error")
        await super().put_many(records)


class FrozenClock:
    """Stands in for the ``time`` module inside aiomemo._drain: monotonic() never advances."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


class HeldElsewhereStore(ClaimStore):
    """A shared store where another process holds every lease and never finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.never = asyncio.Event()
        self.waiting = 0

    async def claim(self, key: bytes, ttl: float) -> Lease | None:
        return None

    async def wait_for(self, key: bytes, timeout: float) -> bytes | None:
        self.waiting += 1
        await self.never.wait()
        return None
def load_script(name: str) -> types.ModuleType:
    """``scripts/<name>.py`` as a module, loaded from its file (``sys.path`` untouched).

    For tests that run a script's functions in miniature (the stress
    scenarios); the script must import nothing from ``scripts/`` itself.
    Loaded once per process, under its own name.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


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
