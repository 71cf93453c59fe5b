"""The asyncio Memoizer: lookup table, call-time collapse, checkpoint drain."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import enum
import functools
import logging
import os
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    NamedTuple,
    ParamSpec,
    TypedDict,
    TypeVar,
    cast,
    overload,
)

from aiomemo import _codec, _fingerprint
from aiomemo._exceptions import (
    CheckpointError,
    LeaderCancelledError,
    MemoizerClosedError,
    StoreError,
)
from aiomemo._hashing import IgnoreNames, KeyHook, arg_digests, check_ignore, hash_task_async
from aiomemo.stores._base import Lease, LeaseStore, LoadReport, Record, Store

if TYPE_CHECKING:
    from aiomemo._explain import Explanation

__all__ = ["CheckpointMode", "MemoStats", "Memoizer", "Task", "TaskRecord"]

logger = logging.getLogger("aiomemo")

CheckpointMode = Literal["task_exit", "periodic", "dfk_exit", "manual"]
_MODES = ("task_exit", "periodic", "dfk_exit", "manual", None)

P = ParamSpec("P")
R = TypeVar("R")

#: records written per store call (one write, one fsync); bounds loop lag
_CHUNK = 4096


class TaskRecord(TypedDict, total=False):
    """A task: any mutable mapping with these keys (plain dicts are fine).

    ``func`` (callable), ``args`` (sequence), ``kwargs`` (mapping), and
    optionally ``id``, ``memoize`` (default True), ``ignore_for_cache``
    (kwarg names left out of the key; ``outputs`` in kwargs are output
    refs), ``version`` (separates functions that share a qualname),
    ``track_code`` (the key includes the function's code fingerprint;
    default: the Memoizer's ``track_code``). ``check_memo`` writes
    ``hashsum``. Parsl's TaskRecord dicts work as they are.
    """

    func: Callable[..., Any]
    args: Sequence[Any]
    kwargs: dict[str, Any]
    id: int
    memoize: bool
    ignore_for_cache: IgnoreNames
    version: object
    track_code: bool
    hashsum: str | None


Task = TaskRecord | MutableMapping[str, Any]


class MemoStats(NamedTuple):
    """Counters of a Memoizer (``memo.stats()``)."""

    hits: int
    misses: int
    collapsed: int
    entries: int
    checkpointed: int
    pending: int
    unserializable: int
    load_errors: int
    last_checkpoint: float | None
    write_errors: int
    store_errors: int
    remote_hits: int


class _State(enum.Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


def parse_period(value: object) -> float:
    """Seconds from ``"HH:MM:SS"``, a number of seconds, or a timedelta.

    Raises:
        ValueError: malformed, zero or negative.
        TypeError: another type.
    """
    if isinstance(value, bool):
        raise TypeError(f"checkpoint_period must be 'HH:MM:SS', seconds or a timedelta, not {value!r}")
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
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
    return seconds


@dataclass(slots=True)
class _Flight:
    """A task running now (in this process, or elsewhere behind a lease)."""

    future: asyncio.Future[Any]
    lease_store: Store | None = None
    renew_task: asyncio.Task[None] | None = None


_MISSING: Any = object()


class _Raised:
    """A memoized exception (the same object is raised on every hit)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Commit(asyncio.Future[None]):
    """The batch now filling in task_exit mode, awaited by all of its callers.

    Cancelling a caller must not cancel the batch the others wait on, so this
    Future refuses ``cancel()``: a cancelled caller gets its CancelledError
    when the batch is durable (milliseconds), the others are unaffected.
    """

    def cancel(self, msg: Any = None) -> bool:
        return False


@dataclass(slots=True)
class _Sink:
    """A store and the records still to write to it."""

    store: Store
    queue: list[Record] = field(default_factory=list)
    failures: int = 0
    last_error: str = ""
    retry_at: float = 0.0
    # one flush at a time per store: the drain, checkpoint() and close() may
    # overlap, and each takes records from the head of the queue
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def failed(self, exc: BaseException) -> None:
        """Count a failed write; back off 0.1 s, 0.2 s, ... capped at 1 s, so a
        store (or a disk) that recovers is used again within a second."""
        self.failures += 1
        self.last_error = str(exc)
        self.retry_at = time.monotonic() + min(1.0, 0.05 * 2 ** min(self.failures, 5))


class _LazyTable(Mapping[str, "asyncio.Future[Any]"]):
    """Read-only view of loaded records as hex key -> done Future (decoded on access).

    With ``own`` (the Memoizer keeps nothing: ``memoize=False``) the view
    decodes from its own table; otherwise it asks the Memoizer, which holds
    the records and may already have decoded them.
    """

    def __init__(
        self, memo: Memoizer, keys: Sequence[bytes], own: dict[bytes, bytes] | None = None
    ) -> None:
        self._memo = memo
        self._keys = [k.hex() for k in keys]
        self._set = set(self._keys)
        self._own = own
        self._cache: dict[str, asyncio.Future[Any]] = {}

    def __getitem__(self, key: str) -> asyncio.Future[Any]:
        if key not in self._set:
            raise KeyError(key)
        if self._own is None:
            fut = self._memo._lookup_done(key)
            if fut is None:
                raise KeyError(key)
            return fut
        fut = self._cache.get(key)
        if fut is None:
            loop = self._memo._loop
            assert loop is not None
            fut = loop.create_future()
            try:
                fut.set_result(_codec.decode(self._own[bytes.fromhex(key)]))
            except _codec.CodecError as exc:
                fut.set_exception(exc)
                fut.exception()
            self._cache[key] = fut
        return fut

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class Memoizer:
    """Asyncio memoizer: answers whether a task already ran, and checkpoints results.

    Args:
        memoize: False turns the memo off (every ``check_memo`` misses).
        checkpoint_files: checkpoint dirs (or run dirs, or segment files) to
            load at start. None with a mode set: every checkpoint under
            ``config_run_dir`` (Parsl's ``get_all_checkpoints``).
        checkpoint_period: ``"HH:MM:SS"``, seconds, or a timedelta;
            required with ``'periodic'``.
        checkpoint_mode: ``'task_exit'`` (each result durable before
            ``update_memo_result`` returns, group-committed), ``'periodic'``,
            ``'dfk_exit'`` (at close), ``'manual'`` (``checkpoint()``), or
            None (nothing written).
        run_dir: where this run writes (``<run_dir>/checkpoint/``). None:
            the next numbered dir under ``config_run_dir``.
        config_run_dir: the runinfo root.
        store: a :class:`~aiomemo.stores.Store`, or a list of them (tiers,
            e.g. ``[LogStore(), RedisStore(url)]``). None: a LogStore in
            ``run_dir``.
        collapse: identical tasks in flight share one execution.
        parsl_keys: also look misses up under Parsl's md5 key (records
            imported from Parsl's checkpoints).
        max_pending: in ``'periodic'`` mode, drain early once this many
            records wait, so memory stays bounded.
        lease_ttl: seconds a cross-process lease lives without renewal
            (default: the store's own ``lease_ttl``, else 30).
        explain: keep a short digest per argument in each record (8 bytes
            per argument, about 1 µs each when the result is recorded) so
            that ``explain`` can say which input changed; False saves both.
        track_code: key every task also by its function's code fingerprint
            (its own code, the helpers, classes and module-level values it
            reaches, the versions of installed distributions it uses), so a
            changed helper is a miss; a task's ``track_code`` field overrides.
        key_hooks: key hooks of this Memoizer only, tried in order for inputs
            no built-in rule or ``id_for_memo`` registration covers:
            ``hook(obj, output_ref)`` returns a keyable stand-in or
            ``aiomemo._hashing.NOT_HANDLED`` (ParslMemoizer bridges Parsl's
            ``id_for_memo`` this way).

    Raises:
        ValueError, TypeError: bad configuration (unknown mode, bad period,
            a checkpoint file that does not exist...).

    Example::

        async with Memoizer(checkpoint_mode="periodic", checkpoint_period=30) as memo:
            fut = await memo.check_memo(task)
            if fut is None:
                await memo.update_memo_result(task, await run(task))
    """

    def __init__(
        self,
        *,
        memoize: bool = True,
        checkpoint_files: Sequence[str | os.PathLike[str]] | None = None,
        checkpoint_period: str | float | _dt.timedelta | None = None,
        checkpoint_mode: CheckpointMode | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        config_run_dir: str | os.PathLike[str] = "runinfo",
        store: Store | Sequence[Store] | None = None,
        collapse: bool = True,
        parsl_keys: bool = False,
        max_pending: int = 100_000,
        lease_ttl: float | None = None,
        explain: bool = True,
        track_code: bool = False,
        key_hooks: Sequence[KeyHook] = (),
    ) -> None:
        if checkpoint_mode not in _MODES:
            raise ValueError(
                f"checkpoint_mode must be one of 'task_exit', 'periodic', 'dfk_exit', "
                f"'manual' or None, not {checkpoint_mode!r}"
            )
        self.checkpoint_mode: CheckpointMode | None = checkpoint_mode
        self.checkpoint_period: float | None = None
        if checkpoint_period is not None:
            self.checkpoint_period = parse_period(checkpoint_period)
        elif checkpoint_mode == "periodic":
            raise ValueError("checkpoint_mode='periodic' needs a checkpoint_period (e.g. '00:05:00')")
        if isinstance(checkpoint_files, str | os.PathLike):
            raise TypeError("checkpoint_files must be a list of paths, not a single path")
        self.checkpoint_files: list[str] | None = None
        if checkpoint_files is not None:
            files = [os.fspath(p) for p in checkpoint_files]
            for i, p in enumerate(files):
                if not os.path.exists(p):
                    raise ValueError(f"checkpoint_files[{i}]: {p!r} does not exist")
            self.checkpoint_files = files
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        stores: list[Store]
        if store is None:
            stores = []
        elif isinstance(store, Store):
            stores = [store]
        else:
            stores = list(store)
            for i, s in enumerate(stores):
                if not isinstance(s, Store):
                    raise TypeError(f"store[{i}] is a {type(s).__name__}, not an aiomemo Store")
        if lease_ttl is None:
            ttls = [getattr(st, "lease_ttl", None) for st in stores]
            lease_ttl = next((float(t) for t in ttls if isinstance(t, int | float)), 30.0)
        if not lease_ttl > 0:
            raise ValueError(f"lease_ttl must be positive, not {lease_ttl}")
        self.memoize = memoize
        self.collapse = collapse
        self.parsl_keys = parsl_keys
        self.max_pending = max_pending
        self.lease_ttl = lease_ttl
        self.explain_digests = explain
        self.track_code = track_code
        self._key_hooks: tuple[KeyHook, ...] = tuple(key_hooks)
        for i, hook in enumerate(self._key_hooks):
            if not callable(hook):
                raise TypeError(f"key_hooks[{i}] is a {type(hook).__name__}, not a callable")
        self.config_run_dir = os.fspath(config_run_dir)
        self._run_dir: Path | None = Path(run_dir) if run_dir is not None else None
        self._user_stores = stores
        self._sinks: list[_Sink] = []
        self._shared: list[Store] = []
        self._state = _State.NEW
        self._start_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leases: dict[str, Lease] = {}  # key -> the lease this process holds

        # key -> result, or _Raised(exception): plain values rather than one
        # Future per entry, so a big memo costs less memory and the garbage
        # collector has far less to walk; hits get a fresh done Future
        self._done: dict[str, Any] = {}
        self._loaded: dict[bytes, bytes] = {}
        self._inflight: dict[str, _Flight] = {}
        self._queued_keys: set[str] = set()
        self._has_parsl_keys = False
        self._loaded_paths: list[str] = []

        self._drain_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake: asyncio.Event | None = None
        # the batch now filling (task_exit group commit), awaited by its callers
        self._commit: _Commit | None = None
        self._func_names: dict[object, str] = {}
        self._bg: set[asyncio.Future[Any]] = set()  # publishes and releases
        self._remote_waits: set[asyncio.Future[Any]] = set()  # followers of other processes
        self._closing: asyncio.Future[None] | None = None
        self._warned_types: set[str] = set()

        self._hits = 0
        self._misses = 0
        self._collapsed = 0
        self._checkpointed = 0
        self._unserializable = 0
        self._load_errors = 0
        self._write_errors = 0
        self._store_errors = 0
        self._remote_hits = 0
        self._last_checkpoint: float | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def run_dir(self) -> Path | None:
        """Where this run writes (known once started; created on the first write)."""
        return self._run_dir

    async def __aenter__(self) -> Memoizer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Load checkpoints, open the stores and start the drain task. Idempotent."""
        if self._state is _State.STARTED:
            return
        if self._state is _State.CLOSED:
            raise MemoizerClosedError("this Memoizer was closed; make a new one")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._state is not _State.NEW:
                return
            await self._start()

    async def _start(self) -> None:
        from aiomemo import _checkpoint, _rundir
        from aiomemo.stores._log import LogStore

        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._run_dir is None:
            self._run_dir = await asyncio.to_thread(_rundir.next_run_dir, self.config_run_dir)
        stores = list(self._user_stores)
        if not stores and self.checkpoint_mode is not None:
            stores = [LogStore()]
        opened: list[Store] = []
        try:
            for s in stores:
                await s.open(run_dir=self._run_dir)
                opened.append(s)
            paths: list[str] = []
            if self.checkpoint_files is not None:
                paths = self.checkpoint_files
            elif self.checkpoint_mode is not None:
                paths = await asyncio.to_thread(_rundir.get_all_checkpoints, self.config_run_dir)
            self._loaded_paths = list(paths)
            reports: list[LoadReport] = []
            if self.memoize and paths:
                reports.append(await asyncio.to_thread(_checkpoint.load_paths, paths))
            for s in stores:
                if self.memoize and not s.shared:
                    reports.append(await s.load())
            if self._state is _State.CLOSED:
                raise MemoizerClosedError("the Memoizer was closed while it was starting")
        except BaseException:
            for s in opened:
                with contextlib.suppress(Exception):
                    await s.aclose()
            raise
        for rep in reports:
            self._absorb(rep)
        self._sinks = [_Sink(s) for s in stores]
        self._shared = [s for s in stores if s.shared]
        if self.checkpoint_mode in ("periodic", "task_exit") or (
            self.collapse and any(isinstance(st, LeaseStore) for st in self._shared)
        ):
            # (mode None with a shared store: the drain only retries failed publishes)
            self._drain_task = asyncio.create_task(self._drain_loop(), name="aiomemo-drain")
        self._state = _State.STARTED
        logger.info(
            "aiomemo started: %d loaded entries, mode %s, run dir %s",
            len(self._loaded),
            self.checkpoint_mode,
            self._run_dir,
        )

    def _absorb(self, rep: LoadReport) -> None:
        # a scan of every key: only when Parsl-key lookups were asked for
        if self.parsl_keys and not self._has_parsl_keys:
            self._has_parsl_keys = any(len(k) == 16 for k in rep.table)
        if self._loaded:
            self._loaded.update(rep.table)
        else:
            self._loaded = rep.table  # no copy: a million entries cost ~40 MB of dict

        self._load_errors += max(rep.skipped, len(rep.errors))
        for line in rep.errors:
            warnings.warn(f"aiomemo: {line}", RuntimeWarning, stacklevel=3)
            logger.warning("%s", line)

    async def close(self) -> None:
        """Make the final checkpoint (every mode but None), stop the drain, close stores.

        Idempotent. Tasks still in flight are dropped: their followers get
        :class:`~aiomemo.MemoizerClosedError`.

        Raises:
            CheckpointError: records that could not be saved (how many).
        """
        if self._closing is not None:
            # another close() is making the final checkpoint: wait for it
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closing)
            return
        if self._state is _State.CLOSED:
            return
        if self._state is not _State.STARTED:
            # never started; a start() in progress sees CLOSED when it ends
            # and closes what it opened
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        assert self._loop is not None
        self._closing = self._loop.create_future()
        try:
            await self._close_started()
        finally:
            self._closing.set_result(None)

    async def _close_started(self) -> None:
        unsaved = 0
        errors: list[str] = []
        try:
            if self._drain_task is not None:
                # never cancel the drain mid-write: ask it to stop after its pass
                self._stopping = True
                assert self._wake is not None
                self._wake.set()
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._drain_task)
            # followers of other processes' tasks stop waiting (they get
            # MemoizerClosedError); leases our unfinished tasks hold are let go
            for w in list(self._remote_waits):
                w.cancel()
            for key, fl in list(self._inflight.items()):
                if fl.lease_store is not None:
                    if fl.renew_task is not None:
                        fl.renew_task.cancel()
                    self._spawn(self._release(fl.lease_store, key))
            # give background publishes a moment (bounded) so shared results land
            if self._bg:
                await asyncio.wait(list(self._bg), timeout=5)
            if self.checkpoint_mode is not None or any(s.queue for s in self._sinks):
                await asyncio.shield(self._flush(final=True))
            unsaved = sum(len(s.queue) for s in self._sinks)
            errors = [f"{type(s.store).__name__}: {s.last_error}" for s in self._sinks if s.queue]
        finally:
            self._release_commit()  # whatever happened, no task_exit caller waits forever
            for fl in self._inflight.values():
                if fl.renew_task is not None:
                    fl.renew_task.cancel()
                if not fl.future.done():
                    fl.future.set_exception(
                        MemoizerClosedError("the Memoizer closed before this task finished")
                    )
                    fl.future.exception()  # retrieved: no "never retrieved" noise
            self._inflight.clear()
            for t in list(self._bg):
                t.cancel()
            for s in self._sinks:
                try:
                    await s.store.aclose()
                except Exception as exc:  # closing must go on for the others
                    errors.append(f"{type(s.store).__name__}: close failed: {exc}")
                    logger.warning("closing %s failed: %s", s.store, exc)
        if unsaved:
            raise CheckpointError(
                f"{unsaved} checkpoint record(s) could not be saved: " + "; ".join(errors),
                unsaved=unsaved,
            )

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise MemoizerClosedError("this Memoizer is closed")

    async def _ensure_started(self) -> None:
        if self._state is not _State.STARTED:
            self._check_open()
            await self.start()

    # ------------------------------------------------------------------ lookup
    async def make_hash(self, task: Task) -> str:
        """The task's key (64 hex chars); large inputs are hashed off the loop."""
        self._check_open()
        if self.track_code and "track_code" not in task:
            task["track_code"] = True
        return (await hash_task_async(cast(Mapping[str, Any], task), self._key_hooks)).hex()

    async def check_memo(self, task: Task) -> asyncio.Future[Any] | None:
        """Look the task up; sets ``task["hashsum"]``.

        Returns:
            A done Future on a hit; a Future that completes with the running
            identical task's outcome when one is in flight (``collapse``);
            None on a miss: the caller runs the task and then calls
            ``update_memo_result`` or ``update_memo_exception``.

        Raises:
            UnhashableInputError: an input has no key (says where and why).
            MemoizerClosedError: after ``close()``.
        """
        if self._state is not _State.STARTED:
            await self._ensure_started()
        t: Any = task  # any mutable mapping (Parsl's TaskRecord, a dict...)
        if not self.memoize or not t.get("memoize", True):
            t["hashsum"] = None
            return None
        if self.track_code and "track_code" not in t:
            t["track_code"] = True  # the record and explain see it too
        raw = await hash_task_async(t, self._key_hooks)
        key = raw.hex()
        t["hashsum"] = key
        value = self._done.get(key, _MISSING)
        if value is not _MISSING:
            self._hits += 1
            return self._hit(value)
        fut = self._from_loaded(key, raw)
        if fut is None and self._has_parsl_keys:
            fut = self._from_parsl_key(t, key)
        if fut is not None:
            self._hits += 1
            return fut
        flight = self._inflight.get(key)
        if flight is not None and self.collapse:
            self._collapsed += 1
            return self._follow(flight.future)
        loop = self._loop
        assert loop is not None
        flight = _Flight(loop.create_future())
        if self.collapse:
            self._inflight[key] = flight
        if self._shared:
            try:
                return await self._check_shared(t, key, raw, flight)
            except BaseException:
                # cancelled (or a store failed unexpectedly) before anyone
                # was told to run it: drop the entry so nobody waits on it
                if self._inflight.get(key) is flight:
                    del self._inflight[key]
                if flight.renew_task is not None:
                    flight.renew_task.cancel()
                if not flight.future.done():
                    flight.future.set_exception(
                        LeaderCancelledError(f"the lookup of {key[:12]}… was interrupted")
                    )
                    flight.future.exception()
                raise
        self._misses += 1
        return None

    def _from_loaded(self, key: str, raw: bytes) -> asyncio.Future[Any] | None:
        enc = self._loaded.get(raw)
        if enc is None:
            return None
        return self._decode_into_done(key, raw, enc)

    def _decode_into_done(self, key: str, raw: bytes, enc: bytes) -> asyncio.Future[Any] | None:
        try:
            value = _codec.decode(enc)
        except _codec.CodecError as exc:
            self._loaded.pop(raw, None)
            self._load_errors += 1
            logger.warning("checkpointed result for %s could not be decoded: %s", key, exc)
            return None
        self._done[key] = value
        self._loaded.pop(raw, None)  # now held decoded in _done
        return self._hit(value)

    def _hit(self, value: Any) -> asyncio.Future[Any]:
        """A done Future for a memo entry (the same exception object for a _Raised)."""
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[Any] = loop.create_future()
        if type(value) is _Raised:
            fut.set_exception(value.exc)
            fut.exception()  # a memo entry, not a lost error: no "never retrieved" log
        else:
            fut.set_result(value)
        return fut

    def _lookup_done(self, key: str) -> asyncio.Future[Any] | None:
        value = self._done.get(key, _MISSING)
        if value is not _MISSING:
            return self._hit(value)
        return self._from_loaded(key, bytes.fromhex(key))

    def _from_parsl_key(self, task: Mapping[str, Any], key: str) -> asyncio.Future[Any] | None:
        try:
            from parsl.dataflow.memoization import make_hash as parsl_make_hash
        except ImportError:
            return None
        try:
            t = dict(task)
            t.setdefault("ignore_for_cache", [])
            pkey = parsl_make_hash(cast(Any, t))
        except Exception:  # Parsl cannot key it: no Parsl record either
            return None
        raw = bytes.fromhex(pkey)
        enc = self._loaded.get(raw)
        if enc is None:
            return None
        return self._decode_into_done(key, raw, enc)

    def _follow(self, leader: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """A follower's own Future: cancelling it leaves the leader and other followers alone."""
        loop = self._loop
        assert loop is not None
        mine: asyncio.Future[Any] = loop.create_future()

        def _copy(src: asyncio.Future[Any]) -> None:
            if mine.done():
                return
            if src.cancelled():
                mine.cancel()
            elif (exc := src.exception()) is not None:
                mine.set_exception(exc)
            else:
                mine.set_result(src.result())

        leader.add_done_callback(_copy)
        return mine

    # ------------------------------------------------------------------ shared stores
    async def _check_shared(
        self, task: MutableMapping[str, Any], key: str, raw: bytes, flight: _Flight
    ) -> asyncio.Future[Any] | None:
        for store in self._shared:
            try:
                enc = await store.get(raw)
            except StoreError as exc:
                self._store_error(store, exc)
                continue
            if enc is not None:
                return self._resolve_remote(key, raw, flight, enc)
        if self.collapse:
            for store in self._shared:
                if not isinstance(store, LeaseStore):
                    continue
                try:
                    lease = await store.claim(raw, self.lease_ttl)
                except StoreError as exc:
                    self._store_error(store, exc)
                    continue
                if lease is not None:
                    self._leases[key] = lease
                    flight.lease_store = store
                    flight.renew_task = asyncio.create_task(self._renew(store, raw, key))
                    break
                # another process runs it: wait for its result
                self._spawn(self._await_remote(store, key, raw, flight), self._remote_waits)
                self._collapsed += 1
                return self._follow(flight.future)
        self._misses += 1
        return None

    def _resolve_remote(
        self, key: str, raw: bytes, flight: _Flight, enc: bytes
    ) -> asyncio.Future[Any] | None:
        try:
            value = _codec.decode(enc)
        except _codec.CodecError as exc:
            self._load_errors += 1
            logger.warning("shared result for %s could not be decoded: %s", key, exc)
            self._misses += 1
            return None
        self._inflight.pop(key, None)
        if not flight.future.done():
            flight.future.set_result(value)
        self._done[key] = value
        self._hits += 1
        self._remote_hits += 1
        return flight.future

    async def _await_remote(self, store: LeaseStore, key: str, raw: bytes, flight: _Flight) -> None:
        try:
            while True:
                # wait_for returns early with None only when the lease is gone;
                # a None after the full wait means the holder is still running
                window = max(self.lease_ttl * 2, 1.0)
                t0 = time.monotonic()
                enc = await store.wait_for(raw, window)
                if enc is not None or time.monotonic() - t0 < window * 0.9:
                    break
            if enc is None:
                with contextlib.suppress(StoreError):
                    enc = await store.get(raw)
        except Exception as exc:  # StoreError, or anything a store does wrong
            self._store_error(store, exc)
            enc = None
        except asyncio.CancelledError:
            self._inflight.pop(key, None)
            if not flight.future.done():
                flight.future.set_exception(MemoizerClosedError("closed while waiting"))
                flight.future.exception()
            raise
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if flight.future.done():
            return
        if enc is not None:
            try:
                value = _codec.decode(enc)
            except _codec.CodecError:
                enc = None
            else:
                flight.future.set_result(value)
                self._done[key] = value
                self._remote_hits += 1
                return
        # the remote holder died or gave up: followers resubmit, one takes over
        flight.future.set_exception(
            LeaderCancelledError("the process running this task stopped before it finished")
        )
        flight.future.exception()

    async def _renew(self, store: Store, raw: bytes, key: str) -> None:
        interval = self.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            lease = self._leases.get(key)
            if lease is None:
                return
            try:
                if not await lease.renew():
                    logger.warning("lease on %s was lost; another process may run it too", key)
                    return
            except StoreError as exc:
                self._store_error(store, exc)

    def _store_error(self, store: Store, exc: BaseException) -> None:
        self._store_errors += 1
        if self._store_errors == 1 or self._store_errors % 1000 == 0:
            logger.warning(
                "%s unavailable (%s); carrying on with the local memo", type(store).__name__, exc
            )

    def _spawn(
        self, coro: Awaitable[Any], into: set[asyncio.Future[Any]] | None = None
    ) -> asyncio.Future[Any]:
        """Run ``coro`` in the background, held in ``into`` (default: the
        publishes and releases close() waits for, bounded) until it ends."""
        tasks = self._bg if into is None else into
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return t

    # ------------------------------------------------------------------ completion
    async def update_memo_result(self, task: Task, r: Any) -> None:
        """Record the result of a task the engine ran (exactly once per such task).

        In ``'task_exit'`` mode this returns once the record is durable
        (written and fsynced, shared with concurrent completions). A failed
        write does not fail the task: the record stays queued for retry. A
        caller cancelled while it waits gets its CancelledError once the
        batch is written (the write itself is never cancelled).
        """
        if self._state is not _State.STARTED:
            self._check_open()
        key = task.get("hashsum")
        if not self.memoize or not task.get("memoize", True) or not isinstance(key, str):
            return
        flight = self._inflight.pop(key, None)
        loop = self._loop
        assert loop is not None
        if flight is not None and not flight.future.done():
            flight.future.set_result(r)  # followers get it
        self._done[key] = r
        if flight is not None and flight.renew_task is not None:
            flight.renew_task.cancel()
        record = self._record(task, key, r)
        if record is None:
            if flight is not None and flight.lease_store is not None:
                self._spawn(self._release(flight.lease_store, key))
            return
        lease_store = flight.lease_store if flight is not None else None
        if self.checkpoint_mode is not None:
            # queued before any await: a cancelled caller or a close() in
            # between cannot lose it for the other stores
            self._queue(record, key, skip=lease_store)
        if lease_store is not None:
            publish = self._spawn(self._publish(lease_store, record, key))
            if self.checkpoint_mode == "task_exit":
                # durable before we return: the shared store has it (or, if it
                # failed, the record is queued for retry like any other); the
                # write itself is never cancelled with its caller
                await asyncio.shield(publish)
        if self.checkpoint_mode is None or self._state is not _State.STARTED:
            return
        if self.checkpoint_mode == "task_exit":
            if self._stopping:
                return  # close() is making the final pass with this record
            commit = self._commit
            if commit is None:
                commit = self._commit = _Commit(loop=loop)
            self._wake.set()  # type: ignore[union-attr]
            await commit
        elif self.checkpoint_mode == "periodic" and self._pending() >= self.max_pending:
            assert self._wake is not None
            self._wake.set()

    async def update_memo_exception(self, task: Task, e: BaseException) -> None:
        """Record that a task the engine ran raised ``e``.

        Exceptions are memoized for this run only (the same object comes
        back) and never checkpointed. ``asyncio.CancelledError`` drops the
        entry instead: followers get :class:`~aiomemo.LeaderCancelledError`.
        """
        self._check_open()
        key = task.get("hashsum")
        if not self.memoize or not task.get("memoize", True) or not isinstance(key, str):
            return
        flight = self._inflight.pop(key, None)
        if flight is not None:
            if flight.renew_task is not None:
                flight.renew_task.cancel()
            if flight.lease_store is not None:
                self._spawn(self._release(flight.lease_store, key))
        if isinstance(e, asyncio.CancelledError):
            if flight is not None and not flight.future.done():
                flight.future.set_exception(
                    LeaderCancelledError(f"the identical task {key[:12]}… was cancelled")
                )
                flight.future.exception()
            return
        if isinstance(e, StopIteration):
            # a Future refuses StopIteration (as a coroutine turns it into
            # RuntimeError); memoize what awaiting the task would have raised
            wrapped = RuntimeError(f"the task raised StopIteration: {e!r}")
            wrapped.__cause__ = e
            e = wrapped
        if flight is not None and not flight.future.done():
            flight.future.set_exception(e)  # followers get it
            flight.future.exception()  # mark retrieved: a memo entry, not a lost error
        self._done[key] = _Raised(e)

    async def _publish(self, store: Store, record: Record, key: str) -> None:
        try:
            # the result and the lease's release in one step: waiters never
            # see the lease gone without the result
            lease = self._leases.get(key)
            if lease is not None:
                await lease.complete(record)
                self._leases.pop(key, None)
            else:
                await store.put_many([record])
        except Exception as exc:  # StoreError, or anything a store does wrong
            self._store_error(store, exc)
            for s in self._sinks:  # keep it for the drain to retry
                if s.store is store:
                    s.queue.append(record)
                    s.failed(exc)
            if self._wake is not None:
                self._wake.set()  # the drain schedules the retry
            await self._release(store, key)

    async def _release(self, store: Store, key: str) -> None:
        try:
            lease = self._leases.pop(key, None)
            if lease is not None:
                await lease.release()
        except Exception as exc:  # the lease then expires by itself
            self._store_error(store, exc)

    def _record(self, task: Mapping[str, Any], key: str, r: Any) -> Record | None:
        try:
            value = _codec.encode(r)
        except _codec.UnencodableResultError as exc:
            self._unserializable += 1
            tname = exc.type_name
            if tname not in self._warned_types:
                self._warned_types.add(tname)
                msg = (
                    f"aiomemo: results of type {tname} cannot be checkpointed ({exc}); "
                    "they stay memoized in memory for this run"
                )
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                logger.warning("%s", msg)
            return None
        func = task.get("func")
        try:
            name = self._func_names[func]
        except (KeyError, TypeError):
            name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
            if len(self._func_names) < 10_000:
                with contextlib.suppress(TypeError):
                    self._func_names[func] = name
        digests = arg_digests(task, self._key_hooks) if self.explain_digests else b""
        if digests and task.get("track_code"):
            digests = _fingerprint.with_code_digests(digests, func)
        return Record(bytes.fromhex(key), value, name, time.time(), digests)

    # ------------------------------------------------------------------ checkpoints
    def update_checkpoint(self, task: Task) -> None:
        """Queue a finished task's result for the next drain (non-blocking).

        Results are queued by ``update_memo_result`` already (in every mode
        but None); this is for tasks whose record is not queued yet, e.g.
        with ``checkpoint_mode=None`` and a manual ``checkpoint()``.
        """
        self._check_open()
        key = task.get("hashsum")
        if not isinstance(key, str) or key in self._queued_keys:
            return
        record = self._finished_record(task, key)
        if record is not None:
            self._queue(record, key)

    def _finished_record(self, task: Mapping[str, Any], key: str) -> Record | None:
        """The record of a task that finished with a result (None: no result, or not encodable)."""
        value = self._done.get(key, _MISSING)
        if value is _MISSING or type(value) is _Raised:
            return None
        return self._record(task, key, value)

    def _queue(self, record: Record, key: str, skip: Store | None = None) -> None:
        if not self._sinks and self._state is _State.STARTED:
            self._add_default_sink()
        self._queued_keys.add(key)
        for s in self._sinks:
            if s.store is not skip:
                s.queue.append(record)

    def _add_default_sink(self) -> None:
        # checkpoint_mode None with a manual checkpoint(): a LogStore on demand
        from aiomemo.stores._log import LogStore

        store = LogStore(Path(self._run_dir or ".") / "checkpoint")
        self._sinks.append(_Sink(store))

    def _pending(self) -> int:
        return max((len(s.queue) for s in self._sinks), default=0)

    def _release_commit(self, commit: _Commit | None = None) -> None:
        if commit is None:
            commit, self._commit = self._commit, None
        if commit is not None and not commit.done():
            commit.set_result(None)

    async def _drain_loop(self) -> None:
        assert self._wake is not None
        period = self.checkpoint_period
        while not self._stopping:
            timeout: float | None = period if self.checkpoint_mode == "periodic" else None
            retry = min((s.retry_at for s in self._sinks if s.queue and s.failures), default=None)
            if retry is not None:
                delay = max(0.0, retry - time.monotonic())
                timeout = delay if timeout is None else min(timeout, delay)
            if timeout is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._stopping:
                return  # close() makes the final pass
            commit, self._commit = self._commit, None
            try:
                # a pass that carries task_exit callers tries every store now,
                # even one in back-off: they return on the strength of this try
                await self._flush(final=commit is not None)
            except Exception:  # the drain must survive anything a store does
                logger.exception("checkpoint drain failed")
            finally:
                self._release_commit(commit)

    async def _flush(self, final: bool = False) -> int:
        """Write every sink's queue; return records written (to the first sink)."""
        written = 0
        now = time.monotonic()
        for i, sink in enumerate(self._sinks):
            if sink.failures and not final and sink.retry_at > now and sink.queue:
                continue
            n = await self._flush_sink(sink)
            if i == 0:
                written = n
        if written:
            self._checkpointed += written
            self._last_checkpoint = time.time()
            logger.info("Done checkpointing %d tasks", written)
        else:
            logger.debug("No tasks checkpointed in this pass.")
        if not any(s.queue for s in self._sinks):
            self._queued_keys.clear()
        return written

    async def _flush_sink(self, sink: _Sink) -> int:
        async with sink.lock:
            return await self._flush_sink_locked(sink)

    async def _flush_sink_locked(self, sink: _Sink) -> int:
        written = 0
        while sink.queue:
            chunk = sink.queue[:_CHUNK]
            try:
                await sink.store.put_many(chunk)
            except Exception as exc:  # CheckpointError, StoreError, or a store's bug
                sink.failed(exc)
                self._write_errors += 1
                if sink.failures == 1 or sink.failures % 100 == 0:
                    msg = (
                        f"aiomemo: checkpoint write to {type(sink.store).__name__} failed "
                        f"({exc}); {len(sink.queue)} record(s) stay queued and will be retried"
                    )
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    logger.warning("%s", msg)
                return written
            del sink.queue[: len(chunk)]
            sink.failures = 0
            written += len(chunk)
            await asyncio.sleep(0)  # let the loop breathe between chunks
        return written

    async def checkpoint_queue(self) -> int:
        """Write every queued record now; return how many were written.

        Raises:
            CheckpointError: some records could not be written (they stay
                queued and are retried later).
        """
        await self._ensure_started()
        n = await self._flush(final=True)
        failed = [s for s in self._sinks if s.queue]
        if failed:
            pending = max(len(s.queue) for s in failed)
            raise CheckpointError(
                f"{pending} record(s) could not be checkpointed yet "
                f"({failed[0].last_error}); they stay queued",
                unsaved=pending,
            )
        return n

    async def checkpoint(self) -> int:
        """Manual checkpoint: write every queued record; return how many."""
        return await self.checkpoint_queue()

    async def checkpoint_one(self, *, task: Task) -> int:
        """Write one finished task's record now (1), or 0 when it has none."""
        await self._ensure_started()
        key = task.get("hashsum")
        if not isinstance(key, str):
            return 0
        record = self._finished_record(task, key)
        if record is None:
            return 0
        if not self._sinks:
            self._add_default_sink()
        self._queued_keys.add(key)
        for s in self._sinks:
            async with s.lock:  # a flush takes records from this queue's head
                s.queue[:] = [r for r in s.queue if r.key != record.key]
                try:
                    await s.store.put_many([record])
                except (CheckpointError, StoreError, OSError) as exc:
                    s.queue.append(record)
                    raise CheckpointError(
                        f"could not checkpoint task {key}: {exc}; it stays queued", unsaved=1
                    ) from exc
        self._checkpointed += 1
        self._last_checkpoint = time.time()
        return 1

    async def load_checkpoints(
        self, dirs: Sequence[str | os.PathLike[str]] | None
    ) -> Mapping[str, asyncio.Future[Any]]:
        """Load checkpoint dirs into the memo; returns hex key -> done Future (lazy)."""
        from aiomemo import _checkpoint

        await self._ensure_started()
        if not dirs:
            return {}
        rep = await asyncio.to_thread(_checkpoint.load_paths, [os.fspath(d) for d in dirs])
        keys = list(rep.table)
        if not self.memoize:
            return _LazyTable(self, keys, own=rep.table)
        self._absorb(rep)
        return _LazyTable(self, keys)

    async def explain(self, task: Task) -> Explanation:
        """Why did this task miss? Compare it with the recorded calls of its function.

        Reads the checkpoints this Memoizer loaded and the ones it wrote (in a
        worker thread) and names the inputs that differ from the nearest
        recorded call of the same function, e.g. ``kwargs['n'] differs from
        the nearest recorded call of mod.fn (2 of 3 inputs match)``. Records
        carry per-argument digests unless the Memoizer was made with
        ``explain=False``. Results still queued in memory are not on disk yet.
        """
        from aiomemo._explain import explain as explain_task

        await self._ensure_started()
        paths = list(self._loaded_paths)
        if self._run_dir is not None:
            paths.append(os.fspath(self._run_dir))
        snapshot = dict(cast(Mapping[str, Any], task))
        return await asyncio.to_thread(explain_task, snapshot, paths)

    # ------------------------------------------------------------------ stats
    def stats(self) -> MemoStats:
        """Counters: hits, misses, collapsed, entries, checkpointed, pending, ..."""
        return MemoStats(
            hits=self._hits,
            misses=self._misses,
            collapsed=self._collapsed,
            entries=len(self._done) + len(self._loaded),
            checkpointed=self._checkpointed,
            pending=self._pending(),
            unserializable=self._unserializable,
            load_errors=self._load_errors,
            last_checkpoint=self._last_checkpoint,
            write_errors=self._write_errors,
            store_errors=self._store_errors,
            remote_hits=self._remote_hits,
        )

    # ------------------------------------------------------------------ decorator
    @overload
    def cached(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        ignore: IgnoreNames = (),
        version: object = None,
        track_code: bool | None = None,
    ) -> Callable[P, Awaitable[R]]: ...

    @overload
    def cached(
        self,
        fn: None = None,
        *,
        ignore: IgnoreNames = (),
        version: object = None,
        track_code: bool | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]: ...

    def cached(
        self,
        fn: Callable[P, Awaitable[R]] | None = None,
        *,
        ignore: IgnoreNames = (),
        version: object = None,
        track_code: bool | None = None,
    ) -> Any:
        """Memoize a plain ``async def`` function through this Memoizer.

        ``ignore`` names keyword arguments left out of the key; ``version``
        separates functions that share a qualname (closures, lambdas) or
        marks a changed implementation; ``track_code`` (default: the
        Memoizer's) keys calls also by the code fingerprint of the function
        and what it reaches. Identical concurrent calls run once;
        if the running one is cancelled, a waiting caller takes over.
        ``wrapper.key(*args, **kwargs)`` gives the key a call would have.
        """
        ignore_list = check_ignore(ignore)  # a bare str would be read letter by letter
        if fn is None:
            return functools.partial(
                self.cached, ignore=ignore_list, version=version, track_code=track_code
            )
        if not asyncio.iscoroutinefunction(fn):
            raise TypeError(f"memo.cached needs an async def function, got {fn!r}")
        func = fn

        def _task(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
            task = {
                "func": func,
                "args": args,
                "kwargs": kwargs,
                "ignore_for_cache": ignore_list,
                "version": version,
            }
            if track_code is not None:
                task["track_code"] = track_code
            return task

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            task = _task(args, kwargs)
            while True:
                fut = await self.check_memo(task)
                if fut is None:
                    try:
                        result = await func(*args, **kwargs)
                    except BaseException as exc:
                        if not self.closed:
                            await self.update_memo_exception(task, exc)
                        raise
                    if not self.closed:
                        await self.update_memo_result(task, result)
                    return result
                following = not fut.done()  # a done Future is a memoized outcome
                try:
                    return await fut  # type: ignore[no-any-return]
                except LeaderCancelledError:
                    if not following:
                        raise
                    continue  # the leader was cancelled: resubmit, one of us leads

        async def key(*args: P.args, **kwargs: P.kwargs) -> str:
            return await self.make_hash(_task(args, kwargs))

        wrapper.key = key  # type: ignore[attr-defined]
        wrapper._aiomemo_func = func  # type: ignore[attr-defined]  # for ``aiomemo explain``
        return wrapper

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._state is _State.CLOSED
