"""What a checkpoint holds: the record types every layer above shares.

The bottom of the format layer (records -> framing, reader, writer, paths ->
stores -> memoizer -> adapters and the CLI): this module imports nothing of
aiomemo's. ``aiomemo.stores`` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadReport", "Record"]


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


@dataclass(slots=True)
class LoadReport:
    """What a load found: the table plus counts for ``stats()`` and warnings."""

    table: dict[bytes, bytes] = field(default_factory=dict)
    records: int = 0
    skipped: int = 0  # corrupt or torn records skipped
    files: int = 0
    errors: list[str] = field(default_factory=list)  # one line per problem found
