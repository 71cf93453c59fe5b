"""The asyncio Memoizer: the coordinator of one run's memo.

The flow of a task, one part per step (each in its own module)::

    task ─▶ key (_hashing) ─▶ table (_table: finished, loaded) ─▶ hit
                                 │ miss
                                 ▼
                         flight (_flights: lead / follow, collapse)
                         shared tier (_leases: other processes' results, leases)
                                 │ update_memo_result
                                 ▼
                         drain (_drain: queues, group commit, passes) ─▶ stores

The Memoizer holds the configuration and the lifecycle, and orchestrates
``check_memo`` / ``update_memo_*`` over those parts; ``memo.cached``
(_cached) is built on its public calls only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import os
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Literal,
    NamedTuple,
    ParamSpec,
    TypedDict,
    TypeVar,
    cast,
    overload,
)

from aiomemo import _metrics, _setup
from aiomemo._counters import Counters, Lifecycle
from aiomemo._drain import Drain
from aiomemo._exceptions import (
    CheckpointError,
    LeaderCancelledError,
    MemoizerClosedError,
    MemoizerUsageError,
)
from aiomemo._flights import Flights, follow, settle
from aiomemo._hashing import IgnoreNames, KeyHook, check_ignore, hash_task_async
from aiomemo._leases import SharedTier
from aiomemo._recorder import RecordMaker
from aiomemo._records import ValueRef
from aiomemo._setup import MIN_PERIOD, parse_period
from aiomemo._table import MISSING, MemoTable, OnDisk, Raised
from aiomemo.stores._base import LoadReport, Record, Store

if TYPE_CHECKING:
    from aiomemo._explain import Explanation

__all__ = [
    "MIN_PERIOD",
    "CheckpointMode",
    "MemoStats",
    "Memoizer",
    "Task",
    "TaskRecord",
    "parse_period",
]

logger = logging.getLogger("aiomemo")

CheckpointMode = Literal["task_exit", "periodic", "dfk_exit", "manual"]

P = ParamSpec("P")
R = TypeVar("R")


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
    #: encoded bytes of results read from disk and held within ``memory_limit``
    bytes_held: int = 0
    #: encoded bytes of loaded results left on disk (read on a hit)
    bytes_on_disk: int = 0
    #: results read back from disk (each verified)
    disk_reads: int = 0


_CLOSED_MID_TASK = "the Memoizer closed before this task finished"


def _settle_raised(fut: asyncio.Future[Any], value: Raised) -> None:
    settle(fut, exc=value.rearm())


#: ``Memoizer(memory_limit=...)`` default: encoded bytes of results read from disk kept
DEFAULT_MEMORY_LIMIT: Final = 256 * 2**20


class _LazyTable(Mapping[str, "asyncio.Future[Any]"]):
    """Read-only view of loaded records as hex key -> done Future (decoded on access).

    It reads through ``table``: the Memoizer's own (which may already have
    decoded an entry), or a private one when the Memoizer keeps nothing
    (``memoize=False``).
    """

    def __init__(self, memo: Memoizer, keys: Sequence[bytes], table: MemoTable) -> None:
        self._memo = memo
        self._keys = [k.hex() for k in keys]
        self._set = set(self._keys)
        self._table = table

    def __getitem__(self, key: str) -> asyncio.Future[Any]:
        if key not in self._set:
            raise KeyError(key)
        value = self._table.lookup(key, bytes.fromhex(key))
        if value is MISSING:
            raise KeyError(key)
        return self._memo._hit(value)

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
        checkpoint_period: ``"HH:MM:SS"``, seconds (at least 0.01), or a
            timedelta; required with ``'periodic'``.
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
        memory_limit: the most encoded bytes of results read back from disk
            (large results of format-2 checkpoints) that the memo keeps,
            least recently used first; the rest are read again on a hit
            (default 256 MiB). None: a result read once stays in memory.
            Results this run produced stay in memory either way.
        key_hooks: extra keying rules, ``hook(obj, output_ref) -> value`` or
            ``NOT_HANDLED``, tried for types aiomemo has no rule for.

    A Memoizer belongs to the event loop it starts on: a call from another
    loop raises :class:`~aiomemo.MemoizerUsageError`.

    Raises:
        ValueError, TypeError: bad configuration (unknown mode, bad period,
            a checkpoint file that does not exist, a flag that is not a bool...).

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
        key_hooks: Sequence[KeyHook] = (),
        track_code: bool = False,
        memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
    ) -> None:
        _setup.check_mode(checkpoint_mode)
        if memory_limit is not None and (
            isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 0
        ):
            raise ValueError(
                f"memory_limit must be a number of bytes (int >= 0) or None, not {memory_limit!r}"
            )
        self.memory_limit = memory_limit
        self.checkpoint_mode: CheckpointMode | None = checkpoint_mode
        self.checkpoint_period: float | None = None
        if checkpoint_period is not None:
            self.checkpoint_period = parse_period(checkpoint_period)
        elif checkpoint_mode == "periodic":
            raise ValueError(
                "checkpoint_mode='periodic' needs a checkpoint_period (e.g. '00:05:00')"
            )
        self.checkpoint_files = _setup.checkpoint_files_of(checkpoint_files)
        self.max_pending = _setup.max_pending_of(max_pending)
        stores = _setup.stores_of(store)
        self.lease_ttl = _setup.lease_ttl_of(lease_ttl, stores)
        self.key_hooks: tuple[KeyHook, ...] = _setup.hooks_of(key_hooks)
        self.memoize = _setup.flag("memoize", memoize)
        self.collapse = _setup.flag("collapse", collapse)
        self.parsl_keys = _setup.flag("parsl_keys", parsl_keys)
        self.explain_digests = _setup.flag("explain", explain)
        self.track_code = _setup.flag("track_code", track_code)
        self.config_run_dir = os.fspath(config_run_dir)
        self._run_dir: Path | None = Path(run_dir) if run_dir is not None else None
        self._user_stores = stores
        self._state = Lifecycle.NEW
        self._start_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Future[None] | None = None
        self._loaded_paths: list[str] = []
        self._warn_empty_dirs = True  # adapters whose engine is silent about it turn it off

        self._counters = Counters()
        _metrics.attach(self, self._counters)
        self._records = RecordMaker(
            self._counters, explain=self.explain_digests, hooks=self.key_hooks
        )
        self._table = MemoTable(
            self._counters, parsl_keys=parsl_keys, memory_limit=memory_limit
        )
        self._flights = Flights(collapse=collapse)
        self._drain = Drain(
            self._counters,
            periodic=self.checkpoint_period if checkpoint_mode == "periodic" else None,
            max_pending=max_pending,
        )
        self._shared = self._shared_tier([])
        if memory_limit is not None:
            self._drain.on_durable = self._spill

    # ------------------------------------------------------------------ lifecycle
    @property
    def run_dir(self) -> Path | None:
        """Where this run writes (known once started; created on the first write)."""
        return self._run_dir

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._state is Lifecycle.CLOSED

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
        if self._state is Lifecycle.STARTED:
            self._check_loop()
            return
        if self._state is Lifecycle.CLOSED:
            raise MemoizerClosedError("this Memoizer was closed; make a new one")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._state is not Lifecycle.NEW:
                return
            await self._start()

    def _shared_tier(self, stores: list[Store]) -> SharedTier:
        return SharedTier(
            stores, self._counters, self.lease_ttl, self._drain.requeue, self._table, self._flights
        )

    async def _start(self) -> None:
        from aiomemo import _rundir
        from aiomemo.stores._log import LogStore

        self._loop = asyncio.get_running_loop()
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
            t0 = time.perf_counter()
            self._loaded_paths, reports = await _setup.load_at_start(
                self.checkpoint_files,
                self.checkpoint_mode,
                self.config_run_dir,
                stores,
                memoize=self.memoize,
                warn_empty=self._warn_empty_dirs,
            )
            if self._state is Lifecycle.CLOSED:
                raise MemoizerClosedError("the Memoizer was closed while it was starting")
        except BaseException:
            for s in opened:
                with contextlib.suppress(Exception):
                    await s.aclose()
            raise
        if reports:
            _metrics.record_load(time.perf_counter() - t0)
        for rep in reports:
            self._absorb(rep)
        self._shared = self._shared_tier(stores)
        # (mode None with a lease store: the drain only retries failed publishes)
        run = self.checkpoint_mode in ("periodic", "task_exit") or bool(
            self.collapse and self._shared.lease_stores
        )
        self._drain.start(stores, run=run)
        self._state = Lifecycle.STARTED
        logger.info(
            "aiomemo started: %d loaded entries, mode %s, run dir %s",
            len(self._table.loaded),
            self.checkpoint_mode,
            self._run_dir,
        )

    def _absorb(self, rep: LoadReport) -> None:
        for line in self._table.absorb(rep):
            warnings.warn(f"aiomemo: {line}", RuntimeWarning, stacklevel=4)
            logger.warning("%s", line)

    async def close(self) -> None:
        """Make the final checkpoint (every mode but None), stop the drain, close stores.

        Idempotent. Tasks still in flight are dropped: their followers get
        :class:`~aiomemo.MemoizerClosedError`. From another event loop: the
        Memoizer's own loop closes it if it still runs; if that loop is gone,
        this loop makes the final checkpoint instead (nothing accepted is lost).

        Raises:
            CheckpointError: records that could not be saved (how many).
        """
        if self._loop is not None and self._state is Lifecycle.STARTED:
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                if self._loop.is_running():
                    cf = asyncio.run_coroutine_threadsafe(self.close(), self._loop)
                    await asyncio.wrap_future(cf)
                    return
                self._adopt(loop)
        if self._closing is not None:
            # another close() is making the final checkpoint: wait for it
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closing)
            return
        if self._state is Lifecycle.CLOSED:
            return
        if self._state is not Lifecycle.STARTED:
            # never started; a start() in progress sees CLOSED when it ends
            # and closes what it opened
            self._state = Lifecycle.CLOSED
            return
        self._state = Lifecycle.CLOSED
        assert self._loop is not None
        self._closing = self._loop.create_future()
        try:
            await self._close_started()
        finally:
            self._closing.set_result(None)

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the Memoizer over to ``loop`` for closing: its own loop is gone."""
        logger.warning("aiomemo: closing from another event loop (its own has stopped)")
        self._loop = loop
        self._drain.rebind()
        for _, fl in self._flights.drain():
            fl.renewal = None  # tasks of a dead loop: nothing to cancel

    async def _close_started(self) -> None:
        unsaved = 0
        errors: list[str] = []
        try:
            await self._drain.stop()
            # followers of other processes' tasks stop waiting, and so do
            # followers of ours (MemoizerClosedError); our leases are let go
            self._shared.stop_waits()
            self._flights.abandon_all(_CLOSED_MID_TASK, self._shared.release_flight)
            await self._shared.settle(5)
            if self.checkpoint_mode is not None or self._drain.pending():
                await asyncio.shield(self._drain.flush(final=True))
            unsaved, errors = self._drain.unsaved()
        finally:
            self._drain.release_commit()  # whatever happened, no task_exit caller waits forever
            self._flights.abandon_all(_CLOSED_MID_TASK)
            self._shared.cancel_all()
            errors += await self._drain.close_stores()
            self._table.close()
        if unsaved:
            raise CheckpointError(
                f"{unsaved} checkpoint record(s) could not be saved: " + "; ".join(errors),
                unsaved=unsaved,
            )

    def _check_open(self) -> None:
        if self._state is Lifecycle.CLOSED:
            raise MemoizerClosedError("this Memoizer is closed")

    def _check_loop(self) -> None:
        """The caller runs on the Memoizer's loop, or gets a clear error."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self._loop:
            raise MemoizerUsageError(
                "this Memoizer is bound to another event loop (the one it started on); "
                "make one Memoizer per event loop, e.g. inside the asyncio.run() that uses it"
            )

    async def _ensure_started(self) -> None:
        if self._state is not Lifecycle.STARTED:
            self._check_open()
            await self.start()
        else:
            self._check_loop()

    # ------------------------------------------------------------------ lookup
    async def make_hash(self, task: Task) -> str:
        """The task's key (64 hex chars); large inputs are hashed off the loop."""
        self._check_open()
        if self.track_code and "track_code" not in task:
            task["track_code"] = True
        return (await hash_task_async(cast(Mapping[str, Any], task), self.key_hooks)).hex()

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
            MemoizerUsageError: called from another event loop than its own.
        """
        if self._state is not Lifecycle.STARTED:
            await self._ensure_started()
        loop = self._loop
        if asyncio.get_running_loop() is not loop:
            self._check_loop()
        assert loop is not None
        t: Any = task  # any mutable mapping (Parsl's TaskRecord, a dict...)
        if not self.memoize or not t.get("memoize", True):
            t["hashsum"] = None
            return None
        if self.track_code and "track_code" not in t:
            t["track_code"] = True  # the record and explain see it too
        raw = await hash_task_async(t, self.key_hooks)
        key = raw.hex()
        t["hashsum"] = key
        value = self._table.lookup(key, raw, t, read=False)
        if type(value) is OnDisk:
            value = await self._table.read(key, value)
        if value is not MISSING:
            self._counters.hits += 1
            return self._hit(value)
        flight, leads = self._flights.claim(key, loop)
        if not leads:
            self._counters.collapsed += 1
            return follow(flight.future, loop)
        if self._shared:
            try:
                return await self._shared.lookup(key, raw, flight)
            except BaseException:
                # cancelled (or a store failed unexpectedly) before anyone
                # was told to run it: drop the entry so nobody waits on it
                self._flights.finish(
                    key,
                    flight,
                    exc=LeaderCancelledError(f"the lookup of {key[:12]}… was interrupted"),
                )
                raise
        self._counters.misses += 1
        return None

    def claim_threadsafe(
        self, task: Mapping[str, Any], key: str, raw: bytes
    ) -> tuple[Literal["hit", "follow", "lead", "loop"], Any]:
        """``check_memo``'s common path for a caller on another thread: no loop hop.

        ``task`` is keyed already (``key``/``raw``). Returns ``("hit", value)``
        (a result or a :class:`Raised`), ``("follow", flight_future)`` (an
        identical task runs now; the Future belongs to the loop),
        ``("lead", None)`` (a miss: the caller runs the task and reports
        through ``update_memo_result``/``update_memo_exception`` on the
        loop), or ``("loop", None)``: not decidable here (not started,
        shared stores to ask, a value to read from disk) and the caller
        goes through ``check_memo``.
        """
        loop = self._loop
        if self._state is not Lifecycle.STARTED or loop is None or self._shared:
            return "loop", None
        value = self._table.lookup(key, raw, task, read=False)
        if type(value) is OnDisk:
            return "loop", None
        if value is not MISSING:
            self._counters.hits += 1
            return "hit", value
        flight, leads = self._flights.claim(key, loop)
        if not leads:
            self._counters.collapsed += 1
            return "follow", flight.future
        # a leader may have finished between the lookup and the claim
        value = self._table.done.get(key, MISSING)
        if value is not MISSING:
            # followers that found this flight meanwhile get the value (on the loop)
            self._flights.finish(key, flight)
            if type(value) is Raised:
                loop.call_soon_threadsafe(_settle_raised, flight.future, value)
            else:
                loop.call_soon_threadsafe(settle, flight.future, value)
            self._counters.hits += 1
            return "hit", value
        self._counters.misses += 1
        return "lead", None

    def _hit(self, value: Any) -> asyncio.Future[Any]:
        """A done Future for a memo entry (the same exception object for a Raised)."""
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[Any] = loop.create_future()
        if type(value) is Raised:
            fut.set_exception(value.rearm())
            fut.exception()  # a memo entry, not a lost error: no "never retrieved" log
        else:
            fut.set_result(value)
        return fut

    # ------------------------------------------------------------------ completion
    async def update_memo_result(self, task: Task, r: Any) -> None:
        """Record the result of a task the engine ran (exactly once per such task).

        In ``'task_exit'`` mode this returns once the record is durable
        (written and fsynced, shared with concurrent completions). A failed
        write does not fail the task: the record stays queued for retry. A
        caller cancelled while it waits gets its CancelledError once the
        batch is written (the write itself is never cancelled).
        """
        if self._state is not Lifecycle.STARTED:
            self._check_open()
        loop = self._loop
        if loop is not None and asyncio.get_running_loop() is not loop:
            self._check_loop()
        key = task.get("hashsum")
        if not self.memoize or not task.get("memoize", True) or not isinstance(key, str):
            return
        self._table.put(key, r)
        flight = self._flights.finish(key, value=r)  # followers get it
        lease_store = flight.lease_store if flight is not None else None
        if self.checkpoint_mode is None and (flight is None or flight.lease is None):
            # nothing to write or publish: a later manual checkpoint() encodes it
            return
        record = self._records.make(task, key, r)
        if record is None:
            if flight is not None:
                self._shared.release_flight(flight)
            return
        if self.checkpoint_mode is not None:
            # queued before any await: a cancelled caller or a close() in
            # between cannot lose it for the other stores
            self._queue(record, key, skip=lease_store)
        if flight is not None and flight.lease is not None and lease_store is not None:
            publish = self._shared.complete(lease_store, flight.lease, record)
            if self.checkpoint_mode == "task_exit":
                # durable before we return: the shared store has it (or, if it
                # failed, the record is queued for retry like any other); the
                # write itself is never cancelled with its caller
                await asyncio.shield(publish)
        if self.checkpoint_mode is None or self._state is not Lifecycle.STARTED:
            return
        if self.checkpoint_mode == "task_exit":
            if self._drain.stopping:
                return  # close() is making the final pass with this record
            assert loop is not None
            await self._drain.commit(loop)
            # durable, so spilled: once this frame lets go of the encoded
            # record, its bytes can go back to the system
            del record
            self._table.trim_if_due()
        elif self.checkpoint_mode == "periodic" and self._drain.queued_enough():
            self._drain.wake()

    async def update_memo_exception(self, task: Task, e: BaseException) -> None:
        """Record that a task the engine ran raised ``e``.

        Exceptions are memoized for this run only (the same object comes
        back) and never checkpointed. An exception that is not an
        ``Exception`` (``asyncio.CancelledError``, ``KeyboardInterrupt``,
        ``SystemExit``, ``GeneratorExit``) says the task was stopped, not
        that it failed: the entry is dropped instead, and followers get
        :class:`~aiomemo.LeaderCancelledError` (they may resubmit).
        """
        self._check_open()
        loop = self._loop
        if loop is not None and asyncio.get_running_loop() is not loop:
            self._check_loop()
        key = task.get("hashsum")
        if not self.memoize or not task.get("memoize", True) or not isinstance(key, str):
            return
        if not isinstance(e, Exception):
            what = (
                "cancelled"
                if isinstance(e, asyncio.CancelledError)
                else f"stopped ({type(e).__name__})"
            )
            flight = self._flights.finish(
                key, exc=LeaderCancelledError(f"the identical task {key[:12]}… was {what}")
            )
        else:
            if isinstance(e, StopIteration):
                # a Future refuses StopIteration (as a coroutine turns it into
                # RuntimeError); memoize what awaiting the task would have raised
                wrapped = RuntimeError(f"the task raised StopIteration: {e!r}")
                wrapped.__cause__ = e
                e = wrapped
            self._table.put(key, Raised(e))
            flight = self._flights.finish(key, exc=e)  # followers get it
        if flight is not None:
            self._shared.release_flight(flight)

    # ------------------------------------------------------------------ checkpoints
    def update_checkpoint(self, task: Task) -> None:
        """Queue a finished task's result for the next drain (non-blocking).

        Results are queued by ``update_memo_result`` already (in every mode
        but None); this is for tasks whose record is not queued yet, e.g.
        with ``checkpoint_mode=None`` and a manual ``checkpoint()``.
        """
        self._check_open()
        if self._loop is not None:
            self._check_loop()
        self._queue_finished(task)

    def _queue_finished(self, task: Mapping[str, Any]) -> None:
        """Queue the record of a finished task unless it is queued already (also while closing)."""
        key = task.get("hashsum")
        if not isinstance(key, str) or key in self._drain.queued_keys:
            return
        record = self._finished_record(task, key)
        if record is not None:
            self._queue(record, key)

    def _finished_record(self, task: Mapping[str, Any], key: str) -> Record | None:
        """The record of a task that finished with a result (None: no result, or not encodable)."""
        value = self._table.finished(key)
        if value is MISSING or type(value) is Raised:
            return None
        return self._records.make(task, key, value)

    def _queue(self, record: Record, key: str, skip: Store | None = None) -> None:
        if not self._drain.sinks and self._state is Lifecycle.STARTED:
            self._add_default_sink()
        self._drain.queue(record, key, skip)

    def _spill(self, store: Store) -> None:
        """Results this run produced that are now durable in ``store`` may leave memory.

        Their large values sit in a segment (``LogStore``): the index points
        there and the decoded value joins the ones held within memory_limit
        (the same object while held; a fresh copy read back after eviction).
        """
        take = getattr(store, "take_refs", None)
        if take is None:
            return
        refs: dict[bytes, ValueRef] = take()
        for raw, ref in refs.items():
            self._table.spill(raw.hex(), raw, ref)
        del refs
        if self.checkpoint_mode != "task_exit":  # there the caller still holds its record
            self._table.trim_if_due()

    def _add_default_sink(self) -> None:
        # checkpoint_mode None with a manual checkpoint(): a LogStore on demand
        from aiomemo.stores._log import LogStore

        self._drain.add_sink(LogStore(Path(self._run_dir or ".") / "checkpoint"))

    async def checkpoint_queue(self) -> int:
        """Write every queued record now; return how many were written.

        Raises:
            CheckpointError: some records could not be written (they stay
                queued and are retried later).
        """
        await self._ensure_started()
        return await self._drain.flush_or_raise()

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
        if not self._drain.sinks:
            self._add_default_sink()
        await self._drain.write_one(record, key)
        return 1

    async def load_checkpoints(
        self, dirs: Sequence[str | os.PathLike[str]] | None
    ) -> Mapping[str, asyncio.Future[Any]]:
        """Load checkpoint dirs into the memo; returns hex key -> done Future (lazy)."""
        from aiomemo import _checkpoint

        await self._ensure_started()
        if not dirs:
            return {}
        t0 = time.perf_counter()
        rep = await asyncio.to_thread(_checkpoint.load_paths, [os.fspath(d) for d in dirs])
        _metrics.record_load(time.perf_counter() - t0)
        keys = list(rep.table)
        if not self.memoize:
            own = MemoTable(Counters())
            own.loaded = rep.table
            return _LazyTable(self, keys, own)
        self._absorb(rep)
        return _LazyTable(self, keys, self._table)

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
        c = self._counters
        return MemoStats(
            hits=c.hits,
            misses=c.misses,
            collapsed=c.collapsed,
            entries=len(self._table),
            checkpointed=c.checkpointed,
            pending=self._drain.pending(),
            unserializable=c.unserializable,
            load_errors=c.load_errors,
            last_checkpoint=c.last_checkpoint,
            write_errors=c.write_errors,
            store_errors=c.store_errors,
            remote_hits=c.remote_hits,
            bytes_held=self._table.held,
            bytes_on_disk=self._table.bytes_on_disk(),
            disk_reads=self._table.disk_reads,
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

        ``ignore`` names keyword arguments left out of the key (a list: a
        bare str is a TypeError); ``version`` separates functions that share
        a qualname (closures, lambdas) or marks a changed implementation;
        ``track_code`` (default: the Memoizer's) keys calls also by the code
        fingerprint of the function and what it reaches.
        Identical concurrent calls run once; if the running one is
        cancelled, a waiting caller takes over. A call that awaits itself
        with the same arguments raises :class:`~aiomemo.MemoizerUsageError`.
        ``wrapper.key(*args, **kwargs)`` gives the key a call would have.
        """
        from aiomemo._cached import cached

        ignore = check_ignore(ignore)  # a bare str would be read letter by letter
        if fn is None:
            return lambda f: cached(
                self, f, ignore=ignore, version=version, track_code=track_code
            )
        return cached(self, fn, ignore=ignore, version=version, track_code=track_code)
