"""The memo table: finished tasks by key, decoded on their first hit.

Two dicts: ``done`` (hex key -> result, or :class:`Raised`) for what this
run finished or already decoded, and ``loaded`` (raw key -> encoded result)
for checkpoint records not used yet. A hit on a loaded record decodes it
once and moves it to ``done``. Plain values rather than one Future per
entry: a big memo costs less memory and the garbage collector has far less
to walk; callers wrap a hit in the kind of Future they need.

:meth:`MemoTable.lookup` is safe from any thread (an adapter answers hits in
the engine's own thread with it): dict reads are atomic, and the one
compound step (decode, then move from ``loaded`` to ``done``) runs under a
lock that guards no I/O. Writers (the Memoizer, on its loop) only ever add
to ``done`` and remove from ``loaded``.

Large results of format-2 checkpoints stay on disk: ``loaded`` holds a
:class:`~aiomemo._records.ValueRef` for them (the *index*), and a hit reads
the value back (its checksum verified), decodes it and keeps it in
``bodies``, least recently used first, within ``memory_limit`` encoded
bytes (None: a value read once moves into ``done`` for good). The event
loop's caller asks with ``read=False`` and gets an :class:`OnDisk` to await
:meth:`MemoTable.read` on (a worker thread reads; concurrent hits on one key
share one read and one object); a thread's caller reads in place. A value
that is damaged or gone is a miss: counted, logged, warned once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import queue
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, cast

from aiomemo import _codec, _expiry
from aiomemo._counters import Counters
from aiomemo._exceptions import CorruptCheckpointError
from aiomemo._records import LoadReport, ValueRef, note_parsl_keys

__all__ = ["MISSING", "MemoTable", "OnDisk", "Raised"]

logger = logging.getLogger("aiomemo")

#: "no entry" (a stored None is a result)
MISSING: Any = object()


class Raised:
    """A memoized exception: the same object is raised on every hit.

    Raising an exception appends the raising frames to its traceback, so an
    exception re-raised on every hit would grow without end (two entries per
    hit). The traceback it had when it was memoized is kept and put back
    before each hit hands it out: every hit shows the original failure plus
    its own frames only.
    """

    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.tb: TracebackType | None = exc.__traceback__

    def rearm(self) -> BaseException:
        """The exception with its memoized traceback back in place."""
        self.exc.__traceback__ = self.tb
        return self.exc


class OnDisk:
    """:meth:`MemoTable.lookup` with ``read=False``: the entry is on disk, await :meth:`MemoTable.read`."""

    __slots__ = ("raw", "ref")

    def __init__(self, raw: bytes, ref: ValueRef) -> None:
        self.raw = raw
        self.ref = ref


#: freed bytes of large values after which the C heap is trimmed (see :func:`_trim`)
TRIM_AFTER = 8 * 1024 * 1024


def _load_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another libc, or no libc to ask)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and others have none
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load_malloc_trim()


def _trim() -> None:
    """Give the C heap's free pages back to the system (glibc only; else nothing).

    A freed multi-megabyte value does not always go back: once glibc has
    freed one mmap'd block it raises its mmap threshold, so the next large
    blocks come from the heaps (one arena per thread that allocated them) and
    their freed pages stay resident. Without this, hits and spills of 4 MB
    values left ~40 MiB of such pages resident on top of ``memory_limit``.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _read_decode(ref: ValueRef) -> Any:
    """Read a value left on disk, verify and decode it (blocking).

    A flat result (bytes, bytearray, numpy array: the usual large ones) is
    read straight into the result object; anything else is read into a
    reused buffer and decoded from it.
    """
    from aiomemo._checkpoint import read_value_with

    return read_value_with(ref, _codec.decode, _codec.direct_target)


def _resolve(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(exc)


class _Reader:
    """One thread that reads values for event loops; each answer goes straight to its loop.

    A job is ``(loop, future, fn, arg)``: the thread runs ``fn(arg)`` and
    hands the outcome to ``future`` with one ``call_soon_threadsafe``. This
    is the least a hop to a thread and back can cost: no executor, no
    concurrent Future chained to an asyncio one (one loop iteration less,
    ~10-25 µs a read on a 2-core machine). The thread keeps nothing of a
    value once it has handed it over.
    """

    __slots__ = ("_jobs", "_thread")

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[Any], Any], Any] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="aiomemo-read", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> asyncio.Future[Any]:
        """``fn(arg)`` in the thread, as a Future of the running loop (call on the loop)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, fut, fn, arg))
        return fut

    def _run(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            loop, fut, fn, arg = job
            del job
            exc: BaseException | None = None
            try:
                value = fn(arg)
            except BaseException as e:  # handed to the awaiting side, as an executor does
                value, exc = None, e
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, fut, value, exc)
            del loop, fut, fn, arg, value, exc

    def shutdown(self) -> None:
        """End the thread once the reads queued before this are made."""
        self._jobs.put(None)


class MemoTable:
    """Finished tasks by key: decoded entries, still-encoded loaded ones, Parsl keys."""

    __slots__ = (
        "_closed",
        "_counters",
        "_decode_lock",
        "_freed",
        "_reader",
        "_reads",
        "_warned",
        "bodies",
        "disk_reads",
        "done",
        "expires",
        "has_parsl_keys",
        "held",
        "loaded",
        "memory_limit",
        "on_disk",
        "parsl_keys",
    )

    def __init__(
        self, counters: Counters, *, parsl_keys: bool = False, memory_limit: int | None = None
    ) -> None:
        self._counters = counters
        self.parsl_keys = parsl_keys
        self.has_parsl_keys = False
        self.done: dict[str, Any] = {}
        self.loaded: dict[bytes, bytes | ValueRef] = {}
        #: raw key -> absolute expiry, for the entries (done or loaded) that expire
        self.expires: dict[bytes, float] = {}
        self._decode_lock = threading.Lock()
        self.memory_limit = memory_limit
        #: hex key -> (decoded value, encoded size) read from disk, oldest first
        self.bodies: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.held = 0
        #: encoded bytes of the :class:`ValueRef` s in ``loaded`` (kept as they come and go)
        self.on_disk = 0
        self.disk_reads = 0
        self._reads: dict[str, asyncio.Future[Any]] = {}
        self._warned = False
        #: encoded bytes let go of since the C heap was last trimmed
        self._freed = 0
        #: the one thread that reads values for the event loop (made on first use)
        self._reader: _Reader | None = None
        #: after close(): reads (through a load_checkpoints mapping) go to the loop's default
        #: executor, so no reader thread is made that nothing would end
        self._closed = False

    def __len__(self) -> int:
        return len(self.done) + len(self.loaded)

    # ------------------------------------------------------------ reads
    def lookup(
        self, key: str, raw: bytes, task: Mapping[str, Any] | None = None, *, read: bool = True
    ) -> Any:
        """The entry for ``key``: a result, a :class:`Raised`, or :data:`MISSING`.

        Thread-safe. A loaded record is decoded here (once); with ``task``
        and Parsl keys loaded, the task's Parsl key is tried too. A value on
        disk is read here, in the calling thread; with ``read=False`` (the
        event loop) an :class:`OnDisk` comes back instead, for :meth:`read`.
        """
        value = self.done.get(key, MISSING)
        expires = self.expires
        if expires:  # one truth test on the hit path when nothing expires
            when = expires.get(raw)
            if when is not None and when <= _expiry.now():
                self._expire(key, raw)
                return MISSING
        if value is not MISSING:
            return value
        enc = self.loaded.get(raw)
        if enc is None and task is not None and self.has_parsl_keys:
            praw = self._parsl_key(task)
            enc = self.loaded.get(praw) if praw else None
            raw = praw
        if enc is None:
            # another thread may have decoded it just now (done before loaded)
            return self.done.get(key, MISSING)
        if type(enc) is ValueRef:
            held = self._held(key)
            if held is not MISSING:
                return held
            if not read:
                return OnDisk(raw, enc)
            self.disk_reads += 1
            self._make_room(enc.length)
            try:
                value = _read_decode(enc)
            except (CorruptCheckpointError, _codec.CodecError) as exc:
                return self._unusable(key, raw, enc, exc)
            return self._settle(key, raw, enc, value)
        assert type(enc) is bytes
        return self._decode(key, raw, enc)

    async def read(self, key: str, hit: OnDisk) -> Any:
        """The value an :class:`OnDisk` stands for, read in a worker thread (or :data:`MISSING`).

        Call on the event loop only; concurrent calls for one key share one
        read, so they get the same object.
        """
        held = self._held(key)
        if held is not MISSING:
            return held
        pending = self._reads.get(key)
        if pending is None:
            self.disk_reads += 1
            self._make_room(hit.ref.length)
            if self._closed:
                pending = asyncio.ensure_future(
                    asyncio.get_running_loop().run_in_executor(None, _read_decode, hit.ref)
                )
            else:
                if self._reader is None:
                    self._reader = _Reader()
                pending = self._reader.submit(_read_decode, hit.ref)
            self._reads[key] = pending
            pending.add_done_callback(lambda _f: self._reads.pop(key, None))
        try:
            value = await asyncio.shield(pending)
        except (CorruptCheckpointError, _codec.CodecError) as exc:
            return self._unusable(key, hit.raw, hit.ref, exc)
        return self._settle(key, hit.raw, hit.ref, value)

    def close(self) -> None:
        """Let the reader thread go once it has no more reads to make."""
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.shutdown()

    def _expire(self, key: str, raw: bytes) -> None:
        """Drop (and count) the entry of ``raw``: it has expired."""
        if self.remove(key, raw):
            self._counters.expired += 1

    def remove(self, key: str, raw: bytes) -> bool:
        """Drop the entry of ``key`` (hex) / ``raw`` wherever it is; True when there was one."""
        with self._decode_lock:
            found = self.done.pop(key, MISSING) is not MISSING
            found = self._drop_loaded(raw) is not None or found
            body = self.bodies.pop(key, None)
            if body is not None:
                self.held -= body[1]
                self._freed += body[1]
            self.expires.pop(raw, None)
        return found

    def expire_at(self, raw: bytes, when: float) -> None:
        """The entry of ``raw`` expires at ``when`` (inf: never)."""
        if when < _expiry.NO_TTL:
            self.expires[raw] = when
        elif self.expires:
            self.expires.pop(raw, None)

    def _held(self, key: str) -> Any:
        with self._decode_lock:
            body = self.bodies.get(key)
            if body is None:
                return MISSING
            self.bodies.move_to_end(key)
            return body[0]

    def _settle(self, key: str, raw: bytes, ref: ValueRef, value: Any) -> Any:
        """Keep a value just read (within the limit); the object every holder of it shares."""
        with self._decode_lock:
            if self.loaded.get(raw) is not ref:
                return value  # replaced or forgotten meanwhile: serve it, keep nothing
            limit = self.memory_limit
            if limit is None:
                value = self.done.setdefault(key, value)
                self._drop_loaded(raw)
                return value
            body = self.bodies.get(key)
            if body is not None:
                return body[0]
            self._keep(key, value, ref.length)
        return value

    def _unusable(self, key: str, raw: bytes, ref: ValueRef, exc: Exception) -> Any:
        with self._decode_lock:
            if self.loaded.get(raw) is ref:
                self._drop_loaded(raw)
                self._counters.load_errors += 1
            first, self._warned = not self._warned, True
        logger.warning("checkpointed result for %s is unusable (a miss): %s", key, exc)
        if first:
            warnings.warn(
                f"aiomemo: a checkpointed result could not be read back ({exc}); it is a "
                "miss (further ones are logged only)",
                RuntimeWarning,
                stacklevel=2,
            )
        return MISSING

    def spill(self, key: str, raw: bytes, ref: ValueRef) -> None:
        """Let a result in ``done`` go to disk: it is durable at ``ref`` (needs a memory_limit).

        Call :meth:`trim_if_due` once the encoded record is let go of too.
        """
        with self._decode_lock:
            value = self.done.get(key, MISSING)
            if value is MISSING or type(value) is Raised or self.memory_limit is None:
                return
            self._drop_loaded(raw)
            self.loaded[raw] = ref
            self.on_disk += ref.length
            del self.done[key]  # in loaded before it leaves done
            self._freed += ref.length  # its encoded bytes just left the drain
            self._keep(key, value, ref.length)
            del value

    def _make_room(self, size: int) -> None:
        """Evict what a value of ``size`` bytes about to be read will displace, before it is read.

        The oldest values go first, so the read's buffer can reuse their
        memory: the heap neither grows for it nor faults fresh pages in, and
        the limit is never overshot by the value in flight.
        """
        limit = self.memory_limit
        if limit is None or size > limit or self.held + size <= limit:
            return
        with self._decode_lock:
            self._evict(limit - size)

    def _evict(self, room: int) -> None:
        """Drop the oldest values until at most ``room`` bytes are held (locked)."""
        bodies = self.bodies
        while self.held > room and bodies:
            _, (_, n) = bodies.popitem(last=False)
            self.held -= n
            self._freed += n

    def _keep(self, key: str, value: Any, size: int) -> None:
        """Hold ``value`` (``size`` encoded bytes) within the limit, evicting the oldest (locked)."""
        limit = self.memory_limit
        assert limit is not None
        old = self.bodies.pop(key, None)
        if old is not None:
            self.held -= old[1]
        if size > limit:
            return
        self.bodies[key] = (value, size)
        self.held += size
        if self.held > limit:
            self._evict(limit)

    def trim_if_due(self) -> None:
        """Trim the C heap once enough large values were let go of (call unlocked)."""
        if self._freed >= TRIM_AFTER:
            self._freed = 0
            _trim()

    def bytes_on_disk(self) -> int:
        """Encoded bytes of the loaded results left on disk (a counter: no scan of the index)."""
        return self.on_disk

    def _drop_loaded(self, raw: bytes) -> bytes | ValueRef | None:
        """Take ``raw`` out of ``loaded``, keeping :attr:`on_disk` (call locked, or on the loop)."""
        old = self.loaded.pop(raw, None)
        if type(old) is ValueRef:
            self.on_disk -= old.length
        return old

    def finished(self, key: str) -> Any:
        """The entry already in ``done`` (no decoding), or :data:`MISSING`."""
        return self.done.get(key, MISSING)

    def _decode(self, key: str, raw: bytes, enc: bytes) -> Any:
        try:
            value = _codec.decode(enc)
        except _codec.CodecError as exc:
            with self._decode_lock:
                if self._drop_loaded(raw) is not None:
                    self._counters.load_errors += 1
            logger.warning("checkpointed result for %s could not be decoded: %s", key, exc)
            return MISSING
        with self._decode_lock:
            # first decoder wins: every hit gets the same object
            value = self.done.setdefault(key, value)
            self._drop_loaded(raw)  # in done before it leaves loaded
        return value

    @staticmethod
    def _parsl_key(task: Mapping[str, Any]) -> bytes:
        try:
            from parsl.dataflow.memoization import make_hash as parsl_make_hash
        except ImportError:
            return b""
        try:
            t = dict(task)
            t.pop("hashsum", None)
            t.setdefault("ignore_for_cache", [])
            return bytes.fromhex(parsl_make_hash(cast(Any, t)))
        except Exception:  # Parsl cannot key it: no Parsl record either
            return b""

    # ------------------------------------------------------------ writes
    def put(self, key: str, value: Any) -> None:
        """Record a result (or a :class:`Raised`) for ``key``."""
        self.done[key] = value

    def absorb(self, rep: LoadReport) -> list[str]:
        """Take a load's records (newest wins); return its problem lines."""
        # a scan of every key: only when Parsl-key lookups were asked for
        if self.parsl_keys and not self.has_parsl_keys:
            if rep.parsl_keyed is None:  # the loading thread did not look
                note_parsl_keys(rep)
            self.has_parsl_keys = bool(rep.parsl_keyed)
        if self.expires and rep.table:  # entries a newer record replaces without expiry
            for k in self.expires.keys() & rep.table.keys() - rep.expires.keys():
                del self.expires[k]
        if self.loaded:
            with self._decode_lock:
                if self.on_disk:  # references the new records replace
                    loaded = self.loaded
                    for k in loaded.keys() & rep.table.keys():
                        old = loaded[k]
                        if type(old) is ValueRef:
                            self.on_disk -= old.length
                self.loaded.update(rep.table)
                self.on_disk += rep.bytes_on_disk
        else:
            self.loaded = rep.table  # no copy: a million entries cost ~40 MB of dict
            self.on_disk = rep.bytes_on_disk
        if self.expires:
            self.expires.update(rep.expires)
        else:
            self.expires = rep.expires
        self._counters.load_errors += max(rep.skipped, len(rep.errors))
        self._counters.records_loaded += rep.records
        self._counters.expired += rep.expired
        self._counters.forgotten += rep.forgotten
        return list(rep.errors)
