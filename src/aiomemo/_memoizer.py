"""The asyncio Memoizer: the coordinator of one run's memo.

The flow of a task, one part per step (each in its own module)::

    task ─▶ key (_hashing) ─▶ table (_table: finished, loaded) ─▶ hit (_lookup)
                                 │ miss
                                 ▼
                         flight (_flights: lead / follow, collapse)
                         shared tier (_leases: other processes' results, leases)
                                 │ update_memo_result / _exception
                                 ▼
                         completion (_completion: table, followers, record)
                                 ▼
                         drain (_drain: queues, group commit, passes) ─▶ stores

The Memoizer holds the configuration, checks each call (lifecycle and event
loop: _lifecycle) and orchestrates ``check_memo`` / ``update_memo_*`` over
those parts. Around them: configuration checks and start-up loading
(_setup), the final pass at close (_shutdown), ``stats()`` /
``load_checkpoints()`` / ``explain()`` (_views), and ``memo.cached``
(_cached), built on the public calls only.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Literal,
    ParamSpec,
    TypedDict,
    TypeVar,
    cast,
    overload,
)

from aiomemo import _expiry, _metrics, _retention, _setup, _shutdown, _views
from aiomemo._cached import cached_or_decorator
from aiomemo._completion import Completion
from aiomemo._counters import Counters
from aiomemo._drain import Drain
from aiomemo._exceptions import LeaderCancelledError
from aiomemo._flights import Flights, follow
from aiomemo._forget import ByFunc
from aiomemo._hashing import IgnoreNames, KeyHook, PendingKey, hash_task_async, hash_task_now
from aiomemo._leases import SharedTier
from aiomemo._lifecycle import Life, Lifecycle
from aiomemo._lookup import ThreadClaim, done_future
from aiomemo._recorder import RecordMaker
from aiomemo._retention import Retention
from aiomemo._setup import MIN_PERIOD, parse_period
from aiomemo._table import MISSING, MemoTable, OnDisk
from aiomemo._views import MemoStats
from aiomemo.stores._base import Store

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
    default: the Memoizer's ``track_code``), ``ttl`` (seconds or a
    timedelta the result stays valid; default: the Memoizer's ``ttl``;
    ``math.inf``: never expires), ``refresh`` (True: run the task even on a
    hit and replace the stored result). ``check_memo`` writes ``hashsum``.
    Parsl's TaskRecord dicts work as they are.
    """

    func: Callable[..., Any]
    args: Sequence[Any]
    kwargs: dict[str, Any]
    id: int
    memoize: bool
    ignore_for_cache: IgnoreNames
    version: object
    track_code: bool
    ttl: float | _dt.timedelta | None
    refresh: bool
    hashsum: str | None


Task = TaskRecord | MutableMapping[str, Any]


#: ``Memoizer(memory_limit=...)`` default: encoded bytes of results read from disk kept
DEFAULT_MEMORY_LIMIT: Final = 256 * 2**20


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
        explain: keep an 8-byte digest per argument in each record so that
            ``explain`` can say which input changed.
        track_code: key every task also by its function's code fingerprint
            (its code and what it reaches), so a changed helper is a miss.
        memory_limit: the most encoded bytes of results read back from disk
            that the memo keeps (LRU, default 256 MiB; None: no limit).
        key_hooks: extra keying rules, ``hook(obj, output_ref) -> value`` or
            ``NOT_HANDLED``, tried for types aiomemo has no rule for.
        ttl: seconds (or a timedelta) a result stays valid after it was
            recorded (None, the default: forever); a task's ``ttl`` overrides.
        retention: a :class:`~aiomemo.Retention` (``max_bytes``, ``max_age``):
            once loaded, ``aiomemo gc``'s policy runs over the loaded
            checkpoints in the background (a child process); see
            :meth:`retention_report`. None (default): nothing is removed.

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
        ttl: float | _dt.timedelta | None = None,
        retention: Retention | None = None,
    ) -> None:
        _setup.check_mode(checkpoint_mode)
        self.ttl = _expiry.ttl_of(ttl)
        self.memory_limit = _setup.memory_limit_of(memory_limit)
        self.checkpoint_mode: CheckpointMode | None = checkpoint_mode
        self.checkpoint_period = _setup.period_of(checkpoint_period, checkpoint_mode)
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
        self._user_stores = stores
        self._life = Life(Path(run_dir) if run_dir is not None else None)
        self._loaded_paths: list[str] = []
        self._warn_empty_dirs = True  # adapters whose engine is silent about it turn it off

        # the parts (one module each), sharing the counters and the lifecycle
        self._counters = c = Counters()
        _metrics.attach(self, c)
        self._records = RecordMaker(c, explain=self.explain_digests, hooks=self.key_hooks)
        self._table = MemoTable(c, parsl_keys=parsl_keys, memory_limit=memory_limit)
        self._flights = Flights(collapse=collapse)
        self._retention = _retention.of(retention, self._table)
        self._by_func = ByFunc()  # this run's result keys per function, for forget(func=)
        self._drain = Drain(
            c,
            periodic=self.checkpoint_period if checkpoint_mode == "periodic" else None,
            max_pending=max_pending,
        )
        self._shared = SharedTier(
            [], c, self.lease_ttl, self._drain.requeue, self._table, self._flights
        )
        self._completion = Completion(
            self._life,
            checkpoint_mode,
            self._table,
            self._flights,
            self._records,
            self._drain,
            self._shared,
            ttl=self.ttl,
            by_func=self._by_func,
        )
        #: ``check_memo``'s common path for a caller on another thread, no loop
        #: hop (adapters): see :meth:`aiomemo._lookup.ThreadClaim.claim`
        self.claim_threadsafe = ThreadClaim(
            self._life, self._table, self._flights, self._shared, c
        ).claim
        if memory_limit is not None:
            self._drain.on_durable = self._completion.spill

    # ------------------------------------------------------------------ lifecycle
    @property
    def run_dir(self) -> Path | None:
        """Where this run writes (known once started; created on the first write)."""
        return self._life.run_dir

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._life.state is Lifecycle.CLOSED

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
        await self._life.start(functools.partial(_setup.start, self))

    async def close(self) -> None:
        """Make the final checkpoint (every mode but None), stop the drain, close stores.

        Idempotent; works from another event loop too (nothing accepted is
        lost). Followers of tasks still in flight get MemoizerClosedError.
        Raises CheckpointError naming how many records could not be saved.
        """
        adopt = functools.partial(_shutdown.adopt, self._drain, self._flights)
        await self._life.close(self.close, adopt, self._close_started)

    async def _close_started(self) -> None:
        if self._retention is not None:
            await self._retention.stop()  # a rewrite is not left half-way by this process
        await _shutdown.close_parts(
            self.checkpoint_mode, self._drain, self._shared, self._flights, self._table
        )

    async def _ensure_started(self) -> None:
        await self._life.ensure_started(self.start)

    # ------------------------------------------------------------------ lookup
    async def make_hash(self, task: Task) -> str:
        """The task's key (64 hex chars); large inputs are hashed off the loop."""
        self._life.check_open()
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
        life = self._life
        if life.state is not Lifecycle.STARTED:
            await self._ensure_started()
        loop = life.loop
        if asyncio.get_running_loop() is not loop:
            life.check_loop()
        assert loop is not None
        t: Any = task  # any mutable mapping (Parsl's TaskRecord, a dict...)
        if not self.memoize or not t.get("memoize", True):
            t["hashsum"] = None
            return None
        if self.track_code and "track_code" not in t:
            t["track_code"] = True  # the record and explain see it too
        if "ttl" in t:
            _expiry.task_ttl(t, None)  # a bad one fails here, before the task runs
        raw = hash_task_now(t, self.key_hooks)  # the common case: no coroutine
        if isinstance(raw, PendingKey):
            raw = await raw.finish()
        key = raw.hex()
        t["hashsum"] = key
        refresh = t.get("refresh")
        table = self._table
        if refresh:
            value = MISSING
        else:
            # this run's results first, inline: the common hit, when nothing expires
            value = MISSING if table.expires else table.done.get(key, MISSING)
            if value is MISSING:
                value = table.lookup(key, raw, t, read=False)
                if type(value) is OnDisk:
                    value = await table.read(key, value)
        if value is not MISSING:
            self._counters.hits += 1
            return done_future(loop, value)
        flight, leads = self._flights.claim(key, loop)
        if not leads:
            # (a refresh joins an identical task in flight: its result is fresh)
            self._counters.collapsed += 1
            return follow(flight.future, loop)
        if self._shared and not refresh:
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

    # ------------------------------------------------------------------ completion
    async def update_memo_result(self, task: Task, r: Any) -> None:
        """Record the result of a task the engine ran (exactly once per such task).

        In ``'task_exit'`` mode this returns once the record is durable
        (written and fsynced, shared with concurrent completions). A failed
        write does not fail the task: the record stays queued for retry. A
        caller cancelled while it waits gets its CancelledError once the
        batch is written (the write itself is never cancelled).
        """
        life = self._life
        if life.state is not Lifecycle.STARTED:
            life.check_open()
        loop = life.loop
        if loop is not None and asyncio.get_running_loop() is not loop:
            life.check_loop()
        t: Any = task
        key = t.get("hashsum")
        if self.memoize and t.get("memoize", True) and isinstance(key, str):
            durable = self._completion.result(t, key, r)
            if durable is not None:  # task_exit: the record made durable
                await durable

    async def update_memo_exception(self, task: Task, e: BaseException) -> None:
        """Record that a task the engine ran raised ``e`` (memoized for this run only).

        A BaseException that is not an ``Exception`` (cancelled, interrupted)
        says the task was stopped: nothing is memoized, and followers get
        :class:`~aiomemo.LeaderCancelledError` (they may resubmit).
        """
        self._life.check_call()
        key = task.get("hashsum")
        if self.memoize and task.get("memoize", True) and isinstance(key, str):
            self._completion.exception(key, e)

    # ------------------------------------------------------------------ checkpoints
    def update_checkpoint(self, task: Task) -> None:
        """Queue a finished task's result for the next drain, unless it is queued already.

        (``update_memo_result`` queues it in every mode but None.)
        """
        self._life.check_open()
        if self._life.loop is not None:
            self._life.check_loop()
        self._completion.queue_finished(cast(Mapping[str, Any], task))

    def _queue_finished(self, task: Mapping[str, Any]) -> None:
        """Queue the record of a finished task unless it is queued already (also while closing)."""
        self._completion.queue_finished(task)

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
        return await self._completion.write_one(cast(Mapping[str, Any], task))

    async def load_checkpoints(
        self, dirs: Sequence[str | os.PathLike[str]] | None
    ) -> Mapping[str, asyncio.Future[Any]]:
        """Load checkpoint dirs into the memo; returns hex key -> Future (lazy, read-only).

        Done Futures, except for a result left on disk: read off the loop, a
        pending Future (KeyError if it no longer reads back); see _views.
        """
        await self._ensure_started()
        if not dirs:
            return {}
        table = self._table if self.memoize else None
        absorb = functools.partial(_setup.absorb, self._table)
        return await _views.load(dirs, self._life, table, absorb, self.memory_limit)

    async def explain(self, task: Task) -> Explanation:
        """Why did this task miss? Names the inputs that differ from the nearest recorded call.

        Reads (in a worker thread) the checkpoints this Memoizer loaded and
        wrote; results still queued in memory are not on disk yet.
        """
        await self._ensure_started()
        paths = list(self._loaded_paths)
        if self._life.run_dir is not None:
            paths.append(os.fspath(self._life.run_dir))
        return await _views.explain(cast(Mapping[str, Any], task), paths)

    async def forget(
        self, task: Task | None = None, *, func: Callable[..., Any] | str | None = None
    ) -> int:
        """Forget a task's result, or every result of ``func`` (a function or its name).

        Returns how many entries left this memo; every store gets a tombstone
        before it returns (see _forget). UnknownFunctionError: no such records.
        """
        from aiomemo._forget import forget

        return await forget(self, task, func)

    # ------------------------------------------------------------------ stats
    async def retention_report(self) -> dict[str, Any] | None:
        """Wait for the start-time retention run; its summary (as ``aiomemo gc --json``).

        None without ``retention=``, before ``start()``, when it failed (warned), or
        when ``close()`` ended it before it changed anything.
        """
        return None if self._retention is None else await self._retention.report()

    def stats(self) -> MemoStats:
        """Counters: hits, misses, collapsed, entries, checkpointed, pending, ..."""
        return _views.stats(self._counters, self._table, self._drain)

    # ------------------------------------------------------------------ decorator
    @overload
    def cached(
        self,
        fn: Callable[P, Awaitable[R]],
        *,
        ignore: IgnoreNames = (),
        version: object = None,
        track_code: bool | None = None,
        ttl: float | _dt.timedelta | None = None,
        refresh: bool = False,
    ) -> Callable[P, Awaitable[R]]: ...

    @overload
    def cached(
        self,
        fn: None = None,
        *,
        ignore: IgnoreNames = (),
        version: object = None,
        track_code: bool | None = None,
        ttl: float | _dt.timedelta | None = None,
        refresh: bool = False,
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]: ...

    def cached(
        self,
        fn: Callable[P, Awaitable[R]] | None = None,
        *,
        ignore: IgnoreNames = (),
        version: object = None,
        track_code: bool | None = None,
        ttl: float | _dt.timedelta | None = None,
        refresh: bool = False,
    ) -> Any:
        """Memoize a plain ``async def`` function through this Memoizer.

        ``ignore``: kwargs left out of the key (a list); ``version``: tells
        apart functions sharing a qualname; ``track_code``, ``ttl``: the
        Memoizer's by default; ``refresh=True``: run even on a hit. Identical
        concurrent calls run once; ``wrapper.key(...)`` is a call's key.
        """
        return cached_or_decorator(
            self,
            fn,
            ignore=ignore,
            version=version,
            track_code=track_code,
            ttl=ttl,
            refresh=refresh,
        )
