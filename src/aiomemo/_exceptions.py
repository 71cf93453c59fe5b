"""aiomemo's errors.

Every error aiomemo raises on purpose derives from :class:`MemoError`::

    MemoError
    ├── UnhashableInputError      (also a TypeError)    an input has no key
    ├── UnencodableResultError    (also a TypeError)    a result cannot be checkpointed
    ├── CodecError                (also a ValueError)   bytes are not a valid result encoding
    ├── CheckpointError                                 records could not be saved
    │   ├── CorruptCheckpointError                      a file is not a sound checkpoint
    │   └── CheckpointPathError   (also a ValueError)   a path given as a checkpoint holds none
    ├── MaintenanceError                                compact / import-parsl refused or failed
    ├── LeaderCancelledError                            the task a follower waited on was cancelled
    ├── MemoizerClosedError       (also a RuntimeError) a call after close()
    ├── MemoizerUsageError        (also a RuntimeError) another event loop, a call awaiting itself
    └── StoreError                                      a store (Redis, disk) failed

Outside this module: ``aiomemo.parsl`` has ``ParslConfigurationError`` (a
MemoError, Parsl's ``ConfigurationError`` and a ValueError) and
``ParslUnhashableInputError`` (an UnhashableInputError, also a ValueError);
the thread-to-loop portal's ``PortalClosedError`` is a MemoizerClosedError;
the ``aiomemo`` command's ``CliError`` is a MemoError.

Configuration errors are plain ``ValueError``/``TypeError`` raised by the
constructors. OS and Redis errors are translated at the store boundary and
chained (``raise StoreError(...) from exc``). The extra bases stay so that
code catching the built-in error (as Parsl's own memoizer does) keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointPathError",
    "CodecError",
    "CorruptCheckpointError",
    "LeaderCancelledError",
    "MaintenanceError",
    "MemoError",
    "MemoizerClosedError",
    "MemoizerUsageError",
    "StoreError",
    "UnencodableResultError",
    "UnhashableInputError",
]


class MemoError(Exception):
    """Root of every error aiomemo raises on purpose."""


class UnhashableInputError(MemoError, TypeError):
    """An input of a task cannot be turned into a key.

    ``where`` names the place in the task (``"kwargs['cfg'][3]"``) and
    ``type_name`` the type found there.
    """

    def __init__(self, message: str, *, where: str = "", type_name: str = "") -> None:
        super().__init__(message)
        self.where = where
        self.type_name = type_name


class UnencodableResultError(MemoError, TypeError):
    """A result (or something nested in it) cannot be encoded for a checkpoint.

    ``type_name`` is the qualified name of the offending type and ``where``
    names its place in the result (``"result[2]['x']"``); the message says
    both and why.
    """

    def __init__(self, message: str, *, where: str = "result", type_name: str = "") -> None:
        super().__init__(message)
        self.where = where
        self.type_name = type_name


class CodecError(MemoError, ValueError):
    """Bytes given to the codec's ``decode`` are not a valid result encoding.

    Raised for garbage, truncated data, unknown ext codes and malformed ext
    payloads; the original error, if any, is chained as ``__cause__``.
    """


class CheckpointError(MemoError):
    """Records could not be written to (or read from) a checkpoint.

    ``unsaved`` is how many records stayed unsaved, when that is known.
    """

    def __init__(self, message: str, *, unsaved: int = 0) -> None:
        super().__init__(message)
        self.unsaved = unsaved


class CorruptCheckpointError(CheckpointError):
    """A file is not a sound aiomemo checkpoint (bad magic, version or checksum)."""


class CheckpointPathError(CheckpointError, ValueError):
    """A path given as a checkpoint holds none: missing, empty, or not aiomemo's.

    The message is one line naming the path and what is wrong with it.
    """


class MaintenanceError(MemoError):
    """``compact`` or ``import-parsl`` refused (or could not finish) an operation.

    ``code`` is the exit code the ``aiomemo`` command gives for it: 1 for a
    finding (damaged records), 2 for a refusal or bad input. Nothing was
    replaced or half-written when this is raised.
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class LeaderCancelledError(MemoError):
    """The identical task this caller waited on was cancelled before it finished.

    Engines may resubmit the task; ``Memoizer.cached`` does so by itself.
    """


class MemoizerClosedError(MemoError, RuntimeError):
    """The Memoizer was used after ``close()``."""


class MemoizerUsageError(MemoError, RuntimeError):
    """A use of the Memoizer that cannot work.

    It was called from an event loop other than the one it started on (a
    second ``asyncio.run()``, another thread), or a ``memo.cached`` call
    awaits itself with the same arguments (it would wait for its own result).
    """


class StoreError(MemoError):
    """A store failed (Redis unreachable, an OS error writing a file...)."""


class UnknownFunctionError(MemoError, LookupError):
    """``forget(func=...)`` / ``aiomemo forget --func`` named a function with no records.

    The message names it and, when a recorded name is close, suggests it:
    ``no records of mymod.sim; did you mean mymod.simulate?``.
    """
