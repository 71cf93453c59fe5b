"""Configuration checks of the Memoizer, and its start: what it opens and loads.

Bad configuration fails at construction with an error naming the argument:
``TypeError`` for a wrong type (``memoize="no"`` is not a bool),
``ValueError`` for a wrong value (a period shorter than :data:`MIN_PERIOD`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aiomemo import _metrics
from aiomemo._exceptions import MemoizerClosedError
from aiomemo._hashing import KeyHook
from aiomemo._lifecycle import Life, Lifecycle
from aiomemo.stores._base import LoadReport, Store

if TYPE_CHECKING:
    from aiomemo._memoizer import Memoizer
    from aiomemo._table import MemoTable

__all__ = ["MIN_PERIOD", "absorb", "load_at_start", "open_and_load", "parse_period", "start"]

#: the shortest checkpoint period: a drain waking faster only burns the CPU
MIN_PERIOD = 0.01

MODES = ("task_exit", "periodic", "dfk_exit", "manual", None)


def check_mode(mode: object) -> None:
    if mode not in MODES:
        raise ValueError(
            f"checkpoint_mode must be one of 'task_exit', 'periodic', 'dfk_exit', "
            f"'manual' or None, not {mode!r}"
        )


def parse_period(value: object) -> float:
    """Seconds from ``"HH:MM:SS"``, a number of seconds, or a timedelta.

    Raises:
        ValueError: malformed, not finite, or shorter than 0.01 s.
        TypeError: another type.
    """
    if isinstance(value, bool):
        raise TypeError(
            f"checkpoint_period must be 'HH:MM:SS', seconds or a timedelta, not {value!r}"
        )
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        parts = value.split(":")
        # ASCII digits only: str.isdigit() admits '²' and other digits int() refuses
        if len(parts) != 3 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
            raise ValueError(
                f"checkpoint_period {value!r} is not of the form 'HH:MM:SS' (e.g. '00:05:00')"
            )
        h, m, s = (int(p) for p in parts)
        seconds = float(h * 3600 + m * 60 + s)
    else:
        raise TypeError(
            "checkpoint_period must be 'HH:MM:SS', a number of seconds or a timedelta, "
            f"not {type(value).__name__}"
        )
    if not seconds > 0:  # also rejects NaN
        raise ValueError(f"checkpoint_period must be positive, got {value!r}")
    if seconds == float("inf"):
        raise ValueError(f"checkpoint_period must be finite, got {value!r}")
    if seconds < MIN_PERIOD:
        raise ValueError(
            f"checkpoint_period {value!r} is shorter than {MIN_PERIOD} s: the drain would "
            "do nothing but wake up; use checkpoint_mode='task_exit' to write every result at once"
        )
    return seconds


def period_of(period: object, mode: object) -> float | None:
    """``checkpoint_period`` in seconds (None: not given; ``'periodic'`` needs one)."""
    if period is not None:
        return parse_period(period)
    if mode == "periodic":
        raise ValueError("checkpoint_mode='periodic' needs a checkpoint_period (e.g. '00:05:00')")
    return None


def memory_limit_of(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"memory_limit must be a number of bytes (int >= 0) or None, not {value!r}"
        )
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def stores_of(store: Store | Sequence[Store] | None) -> list[Store]:
    if store is None:
        return []
    if isinstance(store, Store):
        return [store]
    if isinstance(store, str | bytes) or not isinstance(store, Sequence):
        raise TypeError(f"store must be an aiomemo Store or a list of them, not {store!r}")
    stores = list(store)
    for i, s in enumerate(stores):
        if not isinstance(s, Store):
            raise TypeError(f"store[{i}] is a {type(s).__name__}, not an aiomemo Store")
    return stores


def checkpoint_files_of(files: object) -> list[str] | None:
    if files is None:
        return None
    if isinstance(files, str | bytes | os.PathLike):
        raise TypeError("checkpoint_files must be a list of paths, not a single path")
    if not isinstance(files, Sequence):
        raise TypeError(f"checkpoint_files must be a list of paths, not {type(files).__name__}")
    out: list[str] = []
    for i, p in enumerate(files):
        if not isinstance(p, str | os.PathLike):
            raise TypeError(f"checkpoint_files[{i}] must be a path, not {type(p).__name__}")
        path = os.fspath(p)
        if not isinstance(path, str):
            raise TypeError(f"checkpoint_files[{i}] must be a str path, not bytes")
        if not os.path.exists(path):
            raise ValueError(f"checkpoint_files[{i}]: {path!r} does not exist")
        out.append(path)
    return out


def empty_dirs(paths: Sequence[str], rep: LoadReport) -> list[str]:
    """Warnings for the given directories that hold no checkpoint at all (a worker thread)."""
    from aiomemo import _checkpoint

    lines = []
    for i, p in enumerate(paths):
        path = Path(p)
        if not path.is_dir() or any(line.startswith(f"{p}:") for line in rep.errors):
            continue  # a file, or a problem load_paths reported already
        try:
            found = bool(_checkpoint.list_segments(path)) or (path / "tasks.pkl").exists()
            if not found and (path / "checkpoint").is_dir():
                found = bool(_checkpoint.list_segments(path / "checkpoint"))
        except OSError:
            continue
        if not found:
            lines.append(
                f"checkpoint_files[{i}]: {p!r} holds no checkpoints; nothing loaded from it"
            )
    return lines


def max_pending_of(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_pending must be an int, not {value!r}")
    if value < 1:
        raise ValueError(f"max_pending must be at least 1, not {value}")
    return value


def lease_ttl_of(value: object, stores: Sequence[Store]) -> float:
    """``lease_ttl`` as given, else the first store's own ``lease_ttl``, else 30 s."""
    if value is None:
        ttls = [getattr(st, "lease_ttl", None) for st in stores]
        value = next((float(t) for t in ttls if isinstance(t, int | float)), 30.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"lease_ttl must be a number of seconds, not {value!r}")
    if not 0 < value < float("inf"):
        raise ValueError(f"lease_ttl must be positive and finite, not {value}")
    return float(value)


def hooks_of(hooks: object) -> tuple[KeyHook, ...]:
    if isinstance(hooks, str | bytes) or not isinstance(hooks, Sequence):
        raise TypeError("key_hooks must be a sequence of callables hook(obj, output_ref)")
    for i, hook in enumerate(hooks):
        if not callable(hook):
            raise TypeError(f"key_hooks[{i}] is a {type(hook).__name__}, not a callable")
    return tuple(hooks)


async def load_at_start(
    files: list[str] | None,
    mode: object,
    config_run_dir: str,
    stores: Sequence[Store],
    *,
    memoize: bool,
    warn_empty: bool,
    parsl_keys: bool = False,
) -> tuple[list[str], list[LoadReport]]:
    """The paths a run starts from and what loading them (and the local stores) found.

    ``files`` as given, or with a mode set every checkpoint under
    ``config_run_dir``. File work runs in worker threads.
    """
    from aiomemo import _checkpoint, _rundir

    paths: list[str] = []
    if files is not None:
        paths = files
    elif mode is not None:
        paths = await asyncio.to_thread(_rundir.get_all_checkpoints, config_run_dir)
    reports: list[LoadReport] = []
    t0 = time.perf_counter()
    if memoize and paths:
        rep = await asyncio.to_thread(_checkpoint.load_paths, paths, parsl_keys=parsl_keys)
        if files is not None and warn_empty:
            # a directory the user named that holds nothing is worth a word
            rep.errors.extend(await asyncio.to_thread(empty_dirs, paths, rep))
        reports.append(rep)
    for s in stores:
        if memoize and not s.shared:
            reports.append(await s.load())
    if reports:
        _metrics.record_load(time.perf_counter() - t0)
    return list(paths), reports


async def open_and_load(
    user_stores: Sequence[Store],
    life: Life,
    files: list[str] | None,
    mode: object,
    config_run_dir: str,
    *,
    memoize: bool,
    warn_empty: bool,
    parsl_keys: bool = False,
) -> tuple[list[Store], list[str], list[LoadReport]]:
    """The run's stores opened in the run dir, then :func:`load_at_start`: (stores, paths, reports).

    The stores are the user's, or with a mode set and none given a LogStore.
    If anything fails, is cancelled, or the Memoizer was closed meanwhile
    (MemoizerClosedError), the stores opened so far are closed again.
    """
    from aiomemo.stores._log import LogStore

    stores = list(user_stores)
    if not stores and mode is not None:
        stores = [LogStore()]
    opened: list[Store] = []
    try:
        for s in stores:
            await s.open(run_dir=life.run_dir)
            opened.append(s)
        loaded = await load_at_start(
            files,
            mode,
            config_run_dir,
            stores,
            memoize=memoize,
            warn_empty=warn_empty,
            parsl_keys=parsl_keys,
        )
        if life.state is Lifecycle.CLOSED:
            raise MemoizerClosedError("the Memoizer was closed while it was starting")
    except BaseException:
        for s in opened:
            with contextlib.suppress(Exception):
                await s.aclose()
        raise
    return stores, *loaded


logger = logging.getLogger("aiomemo")


async def start(memo: Memoizer) -> None:
    """A Memoizer's start (run once by its :class:`~aiomemo._lifecycle.Life`).

    Its loop and run dir fixed, its stores opened and the checkpoints loaded
    (:func:`open_and_load`), the retention run and the drain started; then
    the Memoizer is STARTED.
    """
    from aiomemo import _rundir

    life = memo._life
    life.loop = asyncio.get_running_loop()
    if life.run_dir is None:
        life.run_dir = await asyncio.to_thread(_rundir.next_run_dir, memo.config_run_dir)
    stores, memo._loaded_paths, reports = await open_and_load(
        memo._user_stores,
        life,
        memo.checkpoint_files,
        memo.checkpoint_mode,
        memo.config_run_dir,
        memoize=memo.memoize,
        warn_empty=memo._warn_empty_dirs,
        parsl_keys=memo.parsl_keys,
    )
    for rep in reports:
        absorb(memo._table, rep)
    if memo._retention is not None:
        memo._retention.start(memo._loaded_paths)
    memo._shared.use(stores)
    # (mode None with a lease store: the drain only retries failed publishes)
    run = memo.checkpoint_mode in ("periodic", "task_exit") or bool(
        memo.collapse and memo._shared.lease_stores
    )
    memo._drain.start(stores, run=run)
    life.state = Lifecycle.STARTED
    logger.info(
        "aiomemo started: %d loaded entries, mode %s, run dir %s",
        len(memo._table.loaded),
        memo.checkpoint_mode,
        life.run_dir,
    )


def absorb(table: MemoTable, rep: LoadReport) -> None:
    """Put what a load found into ``table``; warn of each problem it reports."""
    for line in table.absorb(rep):
        warnings.warn(f"aiomemo: {line}", RuntimeWarning, stacklevel=_outside_aiomemo())
        logger.warning("%s", line)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside_aiomemo() -> int:
    """The ``stacklevel`` that makes the caller's warning point at the user's code.

    The first frame (from the caller of this function up) outside the aiomemo
    package, however many of its parts the call went through.
    """
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
