"""LogStore: the default store, checkpoint segments in a local directory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from aiomemo._checkpoint import SegmentWriter, load_paths
from aiomemo._exceptions import CheckpointError
from aiomemo._records import ValueRef
from aiomemo.stores._base import LoadReport, Record, Store

__all__ = ["LogStore"]


class LogStore(Store):
    """Checkpoint segments in ``directory`` (see :mod:`aiomemo._checkpoint`).

    ``directory`` defaults to ``<run_dir>/checkpoint`` of the run that opens
    the store. Nothing is created on disk until the first :meth:`put_many`;
    each open/close cycle writes a segment file of its own, so several stores
    (and processes) may share one directory. With ``fsync=True`` (default)
    ``put_many`` returns once its batch is durable; ``fsync=False`` trades that
    for speed (a crash may then lose the last batches, never corrupt others).
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, fsync: bool = True
    ) -> None:
        """Configure only; no I/O."""
        self._dir = Path(directory) if directory is not None else None
        self._fsync = fsync
        self._writer: SegmentWriter | None = None
        #: remember where large values were written, for :meth:`take_refs`
        self.collect_refs = False

    @property
    def directory(self) -> Path | None:
        """The checkpoint directory (None until given or bound by :meth:`open`)."""
        return self._dir

    @property
    def fsync(self) -> bool:
        """Whether each batch is fsynced before ``put_many`` returns."""
        return self._fsync

    @property
    def segment(self) -> Path | None:
        """The segment file this store is writing, once it has written."""
        return self._writer.path if self._writer is not None else None

    async def open(self, *, run_dir: Path | None = None) -> None:
        """Bind ``directory`` to ``run_dir / "checkpoint"`` when none was given. Idempotent."""
        if self._dir is None and run_dir is not None:
            self._dir = Path(run_dir) / "checkpoint"
        if self._writer is None and self._dir is not None:
            self._writer = await SegmentWriter.create(self._dir)  # lazy: no I/O yet

    async def aclose(self) -> None:
        """Close the current segment (the store may be opened again). Idempotent."""
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()

    async def load(self) -> LoadReport:
        """Everything already in ``directory`` (in a worker thread); empty when it does not exist."""
        d = self._dir
        if d is None or not await asyncio.to_thread(d.is_dir):
            return LoadReport()
        return await asyncio.to_thread(load_paths, [d])

    async def put_many(self, records: Sequence[Record]) -> None:
        """Append ``records`` as one batch; raises :class:`CheckpointError` on failure.

        After a failure the same records may simply be passed again.
        """
        if not records:
            return
        if self._writer is None:
            await self.open()
        if self._writer is None:
            raise CheckpointError(
                "LogStore has no directory: pass one, or open(run_dir=...)",
                unsaved=len(records),
            )
        self._writer.collect_refs = self.collect_refs
        await self._writer.write_batch(records, fsync=self._fsync)

    def put_many_blocking(self, records: Sequence[Record]) -> None:
        """:meth:`put_many` in the calling thread, which it blocks (never call it on the loop).

        Safe from any thread, also while the loop writes through
        :meth:`put_many` (one writer lock). Raises :class:`CheckpointError`
        when the store is not open or the write fails.
        """
        if not records:
            return
        writer = self._writer
        if writer is None:
            raise CheckpointError(
                "LogStore is not open (or closed)", unsaved=len(records)
            )
        writer.collect_refs = self.collect_refs
        writer.write_records_blocking(records, fsync=self._fsync)

    def take_refs(self) -> dict[bytes, ValueRef]:
        """Where the large values of the batches written since the last call sit; clears.

        The Memoizer uses this to let results it produced leave memory once
        they are durable (``memory_limit``).
        """
        return self._writer.take_refs() if self._writer is not None else {}
