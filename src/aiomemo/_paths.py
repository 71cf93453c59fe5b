"""Where checkpoints live: segment names, the one path resolver, opening a segment safely.

Part of the format layer (below the stores): it imports only
:mod:`aiomemo._exceptions` and :mod:`aiomemo._rundir`.

* Names: ``seg-<UTC stamp>-<pid>-<random>.amlog``; the stamp
  (:data:`STAMP_FORMAT`, fixed width) is what segments sort and load by.
* :func:`resolve` turns a path a user gives (a segment file, a checkpoint
  dir, a run dir holding ``checkpoint/``, a runinfo root of numbered runs)
  into the segments it holds, in load order, plus any Parsl ``tasks.pkl``
  found on the way. Loading (:func:`aiomemo._checkpoint.load_paths`),
  ``explain``, the ``aiomemo`` command and ``compact`` / ``import-parsl`` all
  resolve paths through it.
* :func:`open_segment` is the only way a segment is opened for reading.

Non-regular files: a FIFO, socket, device or directory named like a segment
is never opened (opening a FIFO for reading blocks until a writer comes, so
it would hang a Memoizer's start, ``inspect`` and ``verify`` forever).
:func:`list_segments` leaves such entries out with a note (a warning), and
:func:`open_segment` opens with ``O_NONBLOCK`` and checks ``fstat`` on the
descriptor, so an entry swapped for a FIFO after the listing fails cleanly
instead of blocking.

Symlinks are followed: a link to a regular segment file (e.g. one shared
from another run) is a segment like any other; a link to anything else, or
a dangling one, is skipped with a note like a non-regular file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final, Literal

from aiomemo._exceptions import CheckpointPathError
from aiomemo._rundir import get_all_checkpoints

__all__ = [
    "FILE_MAGIC",
    "PARSL_PICKLE",
    "SEGMENT_PREFIX",
    "SEGMENT_SUFFIX",
    "STAMP_FORMAT",
    "PathKind",
    "ResolvedPath",
    "find_segments",
    "list_segments",
    "new_stamp",
    "open_segment",
    "resolve",
    "segment_name",
    "segment_stamp",
    "unique_segments",
]

#: the first 8 bytes of every segment (the file header's magic)
FILE_MAGIC: Final = b"\x89AMLOG\r\n"
SEGMENT_PREFIX: Final = "seg-"
SEGMENT_SUFFIX: Final = ".amlog"
#: Parsl's own (pickled) checkpoint file: never unpickled when loading
PARSL_PICKLE: Final = "tasks.pkl"
#: the time stamp in a segment's name: fixed width, so names sort by start time
STAMP_FORMAT: Final = "%Y%m%dT%H%M%S.%fZ"
IMPORT_HINT: Final = "convert it with `aiomemo import-parsl RUNINFO --trust`"

_READ_BUFFER: Final = 1024 * 1024

PathKind = Literal["segment", "checkpoint dir", "run dir", "runinfo root", "parsl pickle", "none"]


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


def new_stamp() -> str:
    """The current UTC time as a segment stamp (:data:`STAMP_FORMAT`)."""
    return datetime.now(UTC).strftime(STAMP_FORMAT)


def segment_name(stamp: str | None = None) -> str:
    """A fresh segment file name: ``seg-<stamp>-<pid>-<random>.amlog``.

    ``stamp`` defaults to :func:`new_stamp`; a compaction passes the stamp of
    the first segment it replaces so its output sorts where its inputs did.
    """
    if stamp is None:
        stamp = new_stamp()
    return f"{SEGMENT_PREFIX}{stamp}-{os.getpid()}-{secrets.token_hex(4)}{SEGMENT_SUFFIX}"


def segment_stamp(path: str | os.PathLike[str]) -> str | None:
    """The time stamp part of a segment's name (what it sorts by), or None.

    A compaction tool that replaces segments should pass the stamp of the
    first segment it replaces to ``SegmentWriter.create(..., stamp=...)``, so
    that its output sorts where its inputs did (newer segments still override).
    """
    name = Path(path).name
    if not (name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)):
        return None
    stamp = name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
    return stamp or None


def _is_segment_name(name: str) -> bool:
    return name.endswith(SEGMENT_SUFFIX) and not name.startswith(".")


# --------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_regular(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a regular file (following symlinks), or None when it is one.

    Never opens it. A dangling symlink or a vanished entry gives a reason too.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling symlink" if os.path.islink(path) else "vanished"
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    return None if stat.S_ISREG(mode) else _kind_of(mode)


def open_fd(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """``os.open`` that never blocks on a FIFO and refuses anything but a regular file.

    Opens with ``O_NONBLOCK`` (a FIFO without a writer then opens at once
    instead of blocking), checks ``fstat`` on the descriptor (so the check and
    the open see the same file: no race with a rename), then clears
    ``O_NONBLOCK``. Raises ``OSError`` (``EINVAL``, "not a regular file (a
    FIFO)") for anything else, and the open's own ``OSError`` as it comes.
    """
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_kind_of(mode)})", os.fspath(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_segment(path: str | os.PathLike[str]) -> BinaryIO:
    """Open segment ``path`` for reading (buffered): the one routine every reader uses.

    See :func:`open_fd` for what it refuses; raises ``OSError``.
    """
    fd = open_fd(path)
    try:
        return os.fdopen(fd, "rb", buffering=_READ_BUFFER)
    except BaseException:
        os.close(fd)
        raise


def _has_magic(path: Path) -> bool:
    with open_segment(path) as f:
        return f.read(len(FILE_MAGIC)) == FILE_MAGIC


# --------------------------------------------------------------------------
# Listing and resolving
# --------------------------------------------------------------------------


def list_segments(directory: str | os.PathLike[str], notes: list[str] | None = None) -> list[Path]:
    """The segment files of checkpoint ``directory`` in load order (by name).

    Entries named like a segment that are not regular files (FIFOs, sockets,
    devices, directories, dangling symlinks) are left out, never opened: one
    line each goes to ``notes`` when given, else a ``RuntimeWarning``.
    Raises ``OSError`` when ``directory`` cannot be listed.
    """
    out: list[Path] = []
    with os.scandir(directory) as it:
        entries = [e for e in it if _is_segment_name(e.name)]
    for e in entries:
        p = Path(e.path)
        why = not_regular(p)
        if why is None:
            out.append(p)
            continue
        if why == "vanished":
            continue  # deleted since the listing (e.g. by a compaction): nothing to skip
        line = f"{e.path}: skipped: not a regular file ({why}); a segment is never read from it"
        if notes is not None:
            notes.append(line)
        else:
            warnings.warn(f"aiomemo: {line}", RuntimeWarning, stacklevel=2)
    out.sort(key=lambda p: p.name)
    return out


@dataclass(frozen=True, slots=True)
class ResolvedPath:
    """What a path given by a user turned out to be.

    Attributes:
        path: the path as given.
        kind: ``"segment"``, ``"checkpoint dir"``, ``"run dir"``,
            ``"runinfo root"``, ``"parsl pickle"`` (a ``tasks.pkl`` given
            itself) or ``"none"`` (nothing usable: see ``problem``).
        segments: its segment files in load order (older first).
        checkpoint_dirs: the checkpoint directories involved (one, or one per
            run of a runinfo root; the segment's directory for a segment).
        pickles: Parsl ``tasks.pkl`` files found where checkpoints live (never
            loaded; ``aiomemo import-parsl --trust`` converts them).
        notes: entries skipped on the way (non-regular files named like segments).
        problem: one line saying why the path holds no segments ("" when it does).
    """

    path: Path
    kind: PathKind
    segments: tuple[Path, ...] = ()
    checkpoint_dirs: tuple[Path, ...] = ()
    pickles: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    problem: str = ""


def _pickles_in(dirs: Iterable[Path]) -> tuple[Path, ...]:
    return tuple(p for p in (d / PARSL_PICKLE for d in dirs) if p.is_file())


def resolve(path: str | os.PathLike[str]) -> ResolvedPath:
    """Resolve ``path`` to the checkpoint segments (and Parsl pickles) it holds.

    ``path`` may be a segment file, a checkpoint directory (holding
    ``*.amlog`` segments), a run directory (holding ``checkpoint/``) or a
    runinfo root (numbered run directories, each with ``checkpoint/``; their
    segments come oldest run first, as the Memoizer loads them). Never raises
    for what it finds (see ``problem``); ``OSError`` only for an unreadable
    file system.
    """
    p = Path(path)
    notes: list[str] = []

    def none(problem: str, pickles: tuple[Path, ...] = ()) -> ResolvedPath:
        return ResolvedPath(p, "none", pickles=pickles, notes=tuple(notes), problem=problem)

    if not p.exists():
        return none("no such file or directory")
    if p.is_file():
        if p.name == PARSL_PICKLE:
            return ResolvedPath(
                p,
                "parsl pickle",
                checkpoint_dirs=(p.parent,),
                pickles=(p,),
                problem=f"a Parsl pickle checkpoint, not an aiomemo one; {IMPORT_HINT}",
            )
        if p.name.endswith(SEGMENT_SUFFIX) or _has_magic(p):
            return ResolvedPath(p, "segment", (p,), (p.parent,))
        return none("not an aiomemo checkpoint segment (no aiomemo file header)")
    if not p.is_dir():
        return none(f"not a regular file or directory ({not_regular(p)})")
    segs = list_segments(p, notes)
    if segs:
        return ResolvedPath(p, "checkpoint dir", tuple(segs), (p,), _pickles_in([p]), tuple(notes))
    ckpt = p / "checkpoint"
    if ckpt.is_dir():
        segs = list_segments(ckpt, notes)
        if segs:
            return ResolvedPath(
                p, "run dir", tuple(segs), (ckpt,), _pickles_in([p, ckpt]), tuple(notes)
            )
    dirs = [Path(d) for d in get_all_checkpoints(p)]
    per_dir = [(d, list_segments(d, notes)) for d in dirs]
    segs = [s for _, ds in per_dir for s in ds]
    if segs:
        used = tuple(d for d, ds in per_dir if ds)
        return ResolvedPath(p, "runinfo root", tuple(segs), used, _pickles_in(dirs), tuple(notes))
    here = _pickles_in([p, ckpt])
    if here:
        return none(f"holds no aiomemo checkpoints, only Parsl's {here[0]}; {IMPORT_HINT}", here)
    under = _pickles_in(dirs)
    if under:
        # a runinfo root of Parsl runs: import-parsl's input
        return ResolvedPath(
            p,
            "runinfo root",
            checkpoint_dirs=tuple(dirs),
            pickles=under,
            notes=tuple(notes),
            problem=f"holds no aiomemo checkpoints, only Parsl's {under[0]}; {IMPORT_HINT}",
        )
    return none(
        "holds no aiomemo checkpoints (expected a runinfo root, a run directory, "
        "a checkpoint directory or a segment file)"
    )


def find_segments(path: str | os.PathLike[str], *, strict: bool = True) -> ResolvedPath | None:
    """:func:`resolve`, for callers that need segments.

    With ``strict`` (the CLI), raises :class:`~aiomemo.CheckpointPathError`
    with one clear line (naming the path) when ``path`` holds no segments: a
    missing path, a directory holding none, a Parsl ``tasks.pkl``, a file
    that is not an aiomemo segment (neither the ``.amlog`` suffix nor the
    aiomemo file header). Without it, such a path gives ``None``.
    """
    r = resolve(path)
    if r.segments:
        return r
    if strict:
        raise CheckpointPathError(f"{os.fspath(path)}: {r.problem}")
    return None


def unique_segments(resolved: Iterable[ResolvedPath | None]) -> list[Path]:
    """The segments of several resolved paths in order, each once (first place wins)."""
    out: list[Path] = []
    seen: set[str] = set()
    for r in resolved:
        if r is None:
            continue
        for s in r.segments:
            real = os.path.realpath(s)
            if real not in seen:
                seen.add(real)
                out.append(s)
    return out
