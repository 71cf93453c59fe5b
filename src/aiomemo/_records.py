"""What a checkpoint holds: the record types every layer above shares.

The bottom of the format layer (records -> framing, reader, writer, paths ->
stores -> memoizer -> adapters and the CLI): this module imports nothing of
aiomemo's. ``aiomemo.stores`` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadReport", "Record", "ValueRef"]


@dataclass(frozen=True, slots=True)
class Record:
    """One finished task's result, as stores keep it.

    Attributes:
        key: the task key as raw bytes (32 bytes of blake3; 16 bytes for a
            Parsl md5 key imported from Parsl's checkpoints).
        value: the result encoded by ``aiomemo._codec.encode`` (opaque here).
        func: ``"module.qualname"`` of the task's function.
        time: when the task finished, seconds since the epoch.
        digests: optional per-argument digests (for ``explain``); empty when off.
    """

    key: bytes
    value: bytes
    func: str
    time: float
    digests: bytes = b""


@dataclass(frozen=True, slots=True)
class ValueRef:
    """Where a large result's encoded bytes sit in a segment (format 2).

    Loading keeps this in the table instead of the bytes; a hit reads them
    with :func:`aiomemo._checkpoint.read_value`, which checks ``digest``.

    Attributes:
        path: the segment file.
        offset: file offset of the value's first byte.
        length: how many bytes the value takes.
        digest: blake3 of the value, first 16 bytes.
        prev: an earlier reference to the same bytes (same length and
            digest) that a later copy of the record replaced, tried when
            this one does not read back: a duplicated batch whose value
            frames did not come along must not hide the intact original.
    """

    path: str
    offset: int
    length: int
    digest: bytes
    prev: ValueRef | None = None


@dataclass(slots=True)
class LoadReport:
    """What a load found: the table plus counts for ``stats()`` and warnings.

    ``table`` maps a raw key to its encoded result, or to a :class:`ValueRef`
    for a large result left on disk (format-2 segments).
    """

    table: dict[bytes, bytes | ValueRef] = field(default_factory=dict)
    records: int = 0
    skipped: int = 0  # corrupt or torn records skipped
    files: int = 0
    errors: list[str] = field(default_factory=list)  # one line per problem found
