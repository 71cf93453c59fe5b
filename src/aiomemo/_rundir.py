"""Run directories: Parsl's numbering, and finding earlier runs' checkpoints.

A *runinfo root* (``config_run_dir``, default ``"runinfo"``) holds one
numbered directory per run (``000``, ``001``, ... ``999``, ``1000``); each run
writes its checkpoint segments to ``<run dir>/checkpoint/``. These helpers are
synchronous and touch the file system: call them via ``asyncio.to_thread``
from a coroutine.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ensure_dir",
    "get_all_checkpoints",
    "get_last_checkpoint",
    "make_run_dir",
    "next_run_dir",
]


def _is_number(name: str) -> bool:
    # ASCII only: str.isdigit() accepts "²" and "٣", which int() then rejects
    # or reads differently (Parsl's get_last_checkpoint crashes on such a name).
    return name.isascii() and name.isdigit()


def _run_order(name: str) -> tuple[int, int, str]:
    # Numbered runs by their number (999 before 1000), then other names by name.
    return (0, int(name), name) if _is_number(name) else (1, 0, name)


def get_all_checkpoints(rundir: str | os.PathLike[str] = "runinfo") -> list[str]:
    """The checkpoint directories of every run under ``rundir``, oldest run first.

    As Parsl's ``parsl.utils.get_all_checkpoints``: every entry of ``rundir``
    that has a ``checkpoint`` subdirectory, as absolute paths; ``[]`` when
    ``rundir`` is not a directory. One deliberate difference: Parsl sorts the
    names as strings, which puts run ``1000`` before ``999`` (so the older
    run's records would win); here numbered runs sort by number, and other
    names after them by name. Pass the result as ``checkpoint_files``: later
    directories override earlier ones.
    """
    root = os.fspath(rundir)
    if not os.path.isdir(root):
        return []
    found = []
    for runid in sorted(os.listdir(root), key=_run_order):
        checkpoint = os.path.abspath(os.path.join(root, runid, "checkpoint"))
        if os.path.isdir(checkpoint):
            found.append(checkpoint)
    return found


def get_last_checkpoint(rundir: str | os.PathLike[str] = "runinfo") -> list[str]:
    """The checkpoint directory of the most recent numbered run that has one.

    As Parsl's ``parsl.utils.get_last_checkpoint``: 0 or 1 absolute paths; only
    numbered run directories count, compared as numbers (``1000`` is after
    ``999``); ``[]`` when ``rundir`` is not a directory. Checkpoints are
    incremental: this finds only the last run's records, not earlier ones
    (use :func:`get_all_checkpoints` for those).
    """
    root = os.fspath(rundir)
    if not os.path.isdir(root):
        return []
    numbered = sorted((d for d in os.listdir(root) if _is_number(d)), key=int, reverse=True)
    for d in numbered:
        path = os.path.abspath(os.path.join(root, d, "checkpoint"))
        if os.path.isdir(path):
            return [path]
    return []


def next_run_dir(config_run_dir: str | os.PathLike[str] = "runinfo") -> Path:
    """The run directory Parsl's ``make_rundir`` would pick next; creates nothing.

    One more than the highest numbered entry of ``config_run_dir``, zero padded
    to 3 digits (``000`` when there is none or the root does not exist; ``1000``
    after ``999``), as an absolute path. Every all-digit name counts, file or
    directory (Parsl's glob skips one-digit names and crashes on names such as
    ``1a2``; counting more names can only avoid a collision). Two processes
    may get the same answer: :func:`make_run_dir` claims one atomically.
    """
    root = Path(config_run_dir)
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    numbers = [int(n) for n in names if _is_number(n)]
    nxt = max(numbers) + 1 if numbers else 0
    return Path(os.path.abspath(root / f"{nxt:03}"))


def make_run_dir(config_run_dir: str | os.PathLike[str] = "runinfo") -> Path:
    """Create and return the next numbered run directory (absolute path).

    The root is created when missing. The run directory itself is made with an
    exclusive ``mkdir``, retried with the next number when another process got
    there first, so concurrent runs never share one.
    """
    root = Path(config_run_dir)
    ensure_dir(root)
    while True:
        candidate = next_run_dir(root)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def ensure_dir(path: str | os.PathLike[str]) -> list[Path]:
    """Create ``path`` and any missing parents; return those created, outermost first.

    Safe against other processes creating the same directories at the same
    time. The list tells a caller which parent directories need an fsync for
    the new entries to be durable. Raises ``FileExistsError`` when something
    in the way is not a directory, and other ``OSError`` as they come.
    """
    missing: list[Path] = []
    p = Path(path)
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:
            if not d.is_dir():
                raise
    return created
