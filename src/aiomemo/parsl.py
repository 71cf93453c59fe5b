"""aiomemo for Parsl: :class:`ParslMemoizer`, a drop-in for Parsl's ``BasicMemoizer``.

Parsl users switch by changing one line of their ``Config``::

    from aiomemo.parsl import ParslMemoizer

    config = Config(
        executors=[...],
        memoizer=ParslMemoizer(checkpoint_mode="periodic", checkpoint_period="00:00:05"),
    )

``ParslMemoizer`` takes ``BasicMemoizer``'s keywords (``memoize``,
``checkpoint_files``, ``checkpoint_period``, ``checkpoint_mode``) plus
aiomemo's ``store`` and ``collapse``. It runs one asyncio
:class:`aiomemo._memoizer.Memoizer` on a private event-loop thread, started by
the DataFlowKernel through :meth:`ParslMemoizer.start` and stopped by
:meth:`ParslMemoizer.close`. The DataFlowKernel calls it from its task-launch
thread and from executor threads; every call is thread-safe, and calls that
arrive after ``close()`` began (tasks finishing during shutdown) return
quietly.

What changes for a Parsl workflow:

* identical tasks in flight at the same time run once (``collapse=True``):
  the others complete when the first one does;
* checkpoints are aiomemo's checksummed segment files (no pickle), in
  ``<run_dir>/checkpoint/`` as before; ``get_all_checkpoints`` /
  ``get_last_checkpoint`` keep working; old ``tasks.pkl`` checkpoints are
  found again after ``aiomemo import-parsl --trust runinfo/`` (their Parsl
  keys are looked up on a miss);
* inputs are keyed by aiomemo's canonical hashing; values of types aiomemo
  has no rule for are keyed through Parsl's own ``id_for_memo`` registry, so
  registrations made for Parsl keep working (and their errors reach the task
  as with Parsl).

Importing this module without Parsl raises an ImportError naming the extra
``aiomemo[parsl]``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import datetime
import functools
import logging
import os
import threading
import time
import types
from collections.abc import Coroutine, Sequence
from typing import Any, Literal, TypeVar

try:
    import parsl.dataflow.memoization as _parsl_memoization
    from parsl.dataflow.errors import BadCheckpoint as _BadCheckpoint
    from parsl.dataflow.memoization import Memoizer as _ParslMemoizerBase
    from parsl.dataflow.taskrecord import TaskRecord
    from parsl.errors import ConfigurationError as _ParslConfigurationError
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "aiomemo.parsl needs Parsl, which is not installed: "
        "install aiomemo with the parsl extra, e.g. pip install 'aiomemo[parsl]'"
    ) from _exc

from aiomemo import _checkpoint, _codec, _hashing, _rundir
from aiomemo._exceptions import (
    CheckpointError,
    LeaderCancelledError,
    MemoizerClosedError,
    UnhashableInputError,
)
from aiomemo._memoizer import Memoizer, MemoStats
from aiomemo.stores._base import Store

__all__ = [
    "ParslConfigurationError",
    "ParslMemoizer",
    "ParslUnhashableInputError",
]

#: Under ``parsl.`` so the lines land in the run's ``parsl.log``.
logger = logging.getLogger("parsl.aiomemo")

T = TypeVar("T")

CheckpointMode = Literal["task_exit", "periodic", "dfk_exit", "manual"]


class ParslConfigurationError(_ParslConfigurationError, ValueError):
    """A bad ``ParslMemoizer`` argument: Parsl's ConfigurationError, also a ValueError."""


class ParslUnhashableInputError(UnhashableInputError, ValueError):
    """An input that neither aiomemo nor Parsl's ``id_for_memo`` can key.

    Also a ``ValueError``, which is what Parsl's own memoizer raises for an
    unknown type, so code written against ``BasicMemoizer`` still catches it.
    """


# --------------------------------------------------------------------------
# keying through Parsl's id_for_memo registry
# --------------------------------------------------------------------------

_parsl_id_for_memo: Any = _parsl_memoization.id_for_memo

#: Parsl's own registrations (the default, str/int/float/None, list, tuple,
#: dict, functions): aiomemo keys these types itself, better (Parsl's raise
#: for subclasses of list/tuple/dict); only registrations made by users or
#: by other Parsl modules are bridged.
_PARSL_BUILTIN_IMPLS: frozenset[Any] = frozenset(
    _parsl_id_for_memo.dispatch(t)
    for t in (object, str, int, float, type(None), list, tuple, dict, types.FunctionType)
)

#: Errors raised by a Parsl registration while a key is being made, so that
#: the adapter can hand the task the very exception (as Parsl would) even if
#: hashing wrapped it. A list per check_memo call, shared across the threads
#: that hashing may use (contextvars are copied into them).
_hook_errors: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar(
    "aiomemo_parsl_hook_errors", default=None
)


def _parsl_id_for_memo_hook(obj: object, output_ref: bool = False) -> object:
    """aiomemo fallback hook: key ``obj`` with Parsl's ``id_for_memo`` when Parsl has a registration.

    Returns Parsl's value (usually bytes) or :data:`aiomemo._hashing.NOT_HANDLED`.
    """
    impl = _parsl_id_for_memo.dispatch(type(obj))
    if impl in _PARSL_BUILTIN_IMPLS:
        return _hashing.NOT_HANDLED
    try:
        return impl(obj, output_ref=output_ref)
    except BaseException as exc:
        box = _hook_errors.get()
        if box is not None:
            box.append(exc)
        raise


#: the key hooks of every ParslMemoizer (and of nothing else: importing this
#: module changes no other Memoizer's keys)
_KEY_HOOKS: tuple[_hashing.KeyHook, ...] = (_parsl_id_for_memo_hook,)


# --------------------------------------------------------------------------
# the task as aiomemo sees it
# --------------------------------------------------------------------------

_BASH_VERSION_PREFIX = "parsl.bash_app:"

#: seconds the loop waits for more hits on loaded results before recording a batch
_LEARN_DELAY = 0.02


def _bash_app_version(func: object) -> str | None:
    """For a Parsl bash app, a ``version`` naming the user's function; else None.

    Parsl submits every bash app as the same wrapper
    (``functools.partial(remote_side_bash_executor, user_func)`` wrapped by
    ``wrap_error``), whose module and qualname are the same for all bash
    apps: aiomemo, which keys functions by module + qualname, would give two
    bash apps called with the same arguments the same key. The user's
    function goes into the task's ``version`` instead (the ``func`` itself is
    left alone so Parsl's own key, used for records imported from Parsl
    checkpoints, stays the same).
    """
    inner = getattr(func, "__wrapped__", None)
    if not isinstance(inner, functools.partial) or not inner.args:
        return None
    if getattr(inner.func, "__name__", None) != "remote_side_bash_executor":
        return None
    user = inner.args[0]
    mod = getattr(user, "__module__", None) or "?"
    qual = getattr(user, "__qualname__", None) or getattr(user, "__name__", None) or "?"
    return f"{_BASH_VERSION_PREFIX}{mod}.{qual}"


def _view(task: TaskRecord) -> dict[str, Any]:
    """The fields of a Parsl task record that make its key, as a plain dict."""
    t: Any = task
    view: dict[str, Any] = {
        "func": t["func"],
        "args": t.get("args", ()),
        "kwargs": t.get("kwargs") or {},
        "ignore_for_cache": list(t.get("ignore_for_cache") or ()),
        "memoize": t.get("memoize", True),
    }
    if "id" in t:
        view["id"] = t["id"]
    version = _bash_app_version(t["func"])
    if version is not None:
        view["version"] = version
    hashsum = t.get("hashsum")
    if isinstance(hashsum, str):
        view["hashsum"] = hashsum
    return view


# --------------------------------------------------------------------------
# the private event loop
# --------------------------------------------------------------------------


class _LoopClosedError(Exception):
    """The private loop stopped (or is stopping): the call did not run."""


class _LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._stopping = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._started.set)
        try:
            loop.run_forever()
        finally:
            try:
                # like asyncio.run: cancel what is left, let callbacks run once
                leftovers = asyncio.all_tasks(loop)
                for t in leftovers:
                    t.cancel()
                loop.run_until_complete(
                    asyncio.gather(*leftovers, asyncio.sleep(0), return_exceptions=True)
                )
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def on_loop_thread(self) -> bool:
        """True when called from the loop's own thread."""
        return threading.get_ident() == self._thread.ident

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; raises _LoopClosedError once stopping."""
        with self._lock:
            if self._stopping:
                coro.close()
                raise _LoopClosedError("the aiomemo loop is stopped")
            return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it (from any other thread).

        Raises:
            _LoopClosedError: the loop stopped before the call could finish.
        """
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError("a blocking aiomemo call was made on its own event-loop thread")
        fut = self.submit(coro)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise _LoopClosedError("the aiomemo loop stopped during the call") from None

    def stop(self) -> None:
        """Stop the loop (pending calls are cancelled) and join the thread. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.on_loop_thread():
            self._thread.join()


# --------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------


def _translate(exc: BaseException, hook_errors: list[BaseException]) -> BaseException:
    """The error a task gets when its key cannot be made: Parsl's, where Parsl has one.

    An error raised by a Parsl ``id_for_memo`` registration reaches the task
    as itself (even if hashing wrapped it); an input nobody can key gives
    :class:`ParslUnhashableInputError`, a ValueError as with Parsl.
    """
    if hook_errors and exc is not hook_errors[0]:
        return hook_errors[0]
    if isinstance(exc, UnhashableInputError) and not isinstance(exc, ValueError):
        err = ParslUnhashableInputError(str(exc), where=exc.where, type_name=exc.type_name)
        err.__cause__ = exc
        return err
    return exc


def _log_failure(fut: concurrent.futures.Future[Any]) -> None:
    """Done callback of a call nobody waits for: log what went wrong, quietly at close."""
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None and not isinstance(exc, MemoizerClosedError):
        logger.error("aiomemo call failed: %r", exc, exc_info=exc)


def _done_future(result: Any, exc: BaseException | None) -> concurrent.futures.Future[Any]:
    """A finished Future holding ``result`` or ``exc``."""
    cf: concurrent.futures.Future[Any] = concurrent.futures.Future()
    if exc is not None:
        cf.set_exception(exc)
    else:
        cf.set_result(result)
    return cf


def _settle(cf: concurrent.futures.Future[Any], result: Any, exc: BaseException | None) -> None:
    """Complete ``cf`` unless it is done already (a racing settle)."""
    try:
        if exc is not None:
            cf.set_exception(exc)
        else:
            cf.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class ParslMemoizer(_ParslMemoizerBase):
    """Parsl ``Memoizer`` backed by aiomemo: a drop-in for ``BasicMemoizer``.

    Args:
        checkpoint_files: checkpoint directories to load at start (as
            ``BasicMemoizer``; see ``parsl.utils.get_all_checkpoints`` and
            ``get_last_checkpoint``). None with a mode set: every checkpoint
            under the config's ``run_dir``.
        checkpoint_period: ``"HH:MM:SS"`` (also seconds or a timedelta); needed
            with ``checkpoint_mode='periodic'``.
        checkpoint_mode: ``'task_exit'``, ``'periodic'``, ``'dfk_exit'``,
            ``'manual'`` or None (no checkpoints written).
        memoize: False turns app caching off for every app.
        store: an aiomemo :class:`~aiomemo.stores.Store` (or a list: tiers),
            e.g. a RedisStore shared by several machines. None: local files
            in ``<run_dir>/checkpoint/``.
        collapse: identical tasks in flight at the same time run once.
        track_code: key every app call also by the code fingerprint of the
            app's function (its code, the helpers, classes and module-level
            values it reaches in your code, the versions of installed
            distributions it uses): editing a helper is then a miss.

    Raises:
        ParslConfigurationError: a bad mode or period (Parsl's
            ConfigurationError, also a ValueError).
    """

    run_dir: str

    def __init__(
        self,
        *,
        checkpoint_files: Sequence[str] | None = None,
        checkpoint_period: str | float | datetime.timedelta | None = None,
        checkpoint_mode: CheckpointMode | None = None,
        memoize: bool = True,
        store: Store | Sequence[Store] | None = None,
        collapse: bool = True,
        track_code: bool = False,
    ) -> None:
        if isinstance(checkpoint_files, str | os.PathLike):
            raise ParslConfigurationError(
                "checkpoint_files must be a list of checkpoint directories, not a single path"
            )
        self.checkpoint_files = checkpoint_files
        self.checkpoint_period = checkpoint_period
        self.checkpoint_mode = checkpoint_mode
        self.memoize = memoize
        self.store = store
        self.collapse = collapse
        self.track_code = track_code
        # validate now (Parsl validates the period only at start)
        try:
            probe = Memoizer(
                memoize=memoize,
                checkpoint_period=checkpoint_period,
                checkpoint_mode=checkpoint_mode,
                collapse=collapse,
            )
        except (ValueError, TypeError) as exc:
            raise ParslConfigurationError(str(exc)) from exc
        self._period_seconds: float | None = probe.checkpoint_period

        self.checkpointed_tasks = 0
        self._memo: Memoizer | None = None
        self._loop: _LoopThread | None = None
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._lock = threading.Lock()
        # id(task record) -> (task record, its view): tasks this memoizer let
        # run (misses), until their update_memo_*; a leader's retry is let run
        # again instead of waiting on itself
        self._leaders: dict[int, tuple[TaskRecord, dict[str, Any]]] = {}
        # key -> followers' futures not completed yet (settled directly when
        # the leader completes after close)
        self._followers: dict[str, list[concurrent.futures.Future[Any]]] = {}
        # keys whose record this run has written or queued already
        self._recorded: set[str] = set()
        # the fast path: finished tasks by key, as done Futures shared by all
        # their hits; read by any thread without a hop to the loop
        self._fast: dict[str, concurrent.futures.Future[Any]] = {}
        # checkpoint records loaded at start (raw key -> encoded result),
        # decoded on their first hit in the calling thread
        self._loaded: dict[bytes, bytes] = {}
        self._loaded_parsl_keys = False
        self._fast_hits = 0
        self._load_errors = 0
        # loaded results used, on their way to the aiomemo Memoizer (under _lock)
        self._learn_queue: list[tuple[dict[str, Any], Any]] = []
        self._completer: concurrent.futures.ThreadPoolExecutor | None = None
        self._timer: asyncio.Task[None] | None = None
        self._timer_stop: asyncio.Event | None = None
        self._early: asyncio.Future[None] | None = None
        self._pass_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        args = [
            f"{name}={getattr(self, name)!r}"
            for name in ("checkpoint_mode", "checkpoint_period", "checkpoint_files", "memoize")
        ]
        args.append(f"collapse={self.collapse!r}")
        if self.track_code:
            args.append("track_code=True")
        if self.store is not None:
            args.append(f"store={self.store!r}")
        return f"ParslMemoizer({', '.join(args)})"

    # ------------------------------------------------------------ lifecycle
    def start(self, *, run_dir: str, config_run_dir: str) -> None:
        """Start the private loop and the aiomemo Memoizer; load checkpoints.

        Called by the DataFlowKernel when it starts. A ParslMemoizer that was
        closed can be started again (a Config reused by a new DataFlowKernel).
        """
        started = time.monotonic()  # the checkpoint period counts from here, as Parsl's
        with self._lock:
            if self._state in ("running", "closing"):
                raise RuntimeError("this ParslMemoizer is already running for a DataFlowKernel")
            self._state = "running"
        self.run_dir = run_dir
        self.config_run_dir = config_run_dir
        self.checkpointed_tasks = 0
        self._leaders = {}
        self._followers = {}
        self._recorded = set()
        self._fast = {}
        self._fast_hits = 0
        self._learn_queue = []
        self._pass_lock = None  # made on the new loop
        try:
            self._load(config_run_dir)
        except BaseException:
            self._state = "closed"
            raise
        # 'periodic' is driven from here, so the passes are logged in Parsl's words
        mode = "manual" if self.checkpoint_mode == "periodic" else self.checkpoint_mode
        try:
            self._memo = Memoizer(
                memoize=self.memoize,
                checkpoint_files=[],  # loaded above, served by the fast path
                checkpoint_mode=mode,
                run_dir=run_dir,
                config_run_dir=config_run_dir,
                store=self.store,
                collapse=self.collapse,
                key_hooks=_KEY_HOOKS,
            )
        except (ValueError, TypeError) as exc:
            self._state = "closed"
            raise ParslConfigurationError(str(exc)) from exc
        self._completer = concurrent.futures.ThreadPoolExecutor(
            thread_name_prefix="aiomemo-parsl-complete"
        )
        self._loop = _LoopThread(name="aiomemo-parsl-loop")
        try:
            self._loop.call(self._memo.start())
        except BaseException:
            self._loop.stop()
            self._completer.shutdown(wait=False)
            self._state = "closed"
            raise
        if self.memoize:
            logger.info("App caching initialized")
        else:
            logger.info("App caching disabled for all apps")
        if self.checkpoint_mode == "periodic":
            assert self._period_seconds is not None
            self._loop.call(self._start_timer(self._period_seconds, started))

    def _load(self, config_run_dir: str) -> None:
        """Load the checkpoints to start from (as BasicMemoizer: at start, all at once).

        ``checkpoint_files`` as given, or with a mode set and none given,
        every checkpoint under the config's run dir. A missing path raises
        Parsl's BadCheckpoint; damaged records are skipped with a warning (the
        good ones around them are kept).
        """
        self._loaded = {}
        self._loaded_parsl_keys = False
        self._load_errors = 0
        if self.checkpoint_files is not None:
            paths = [os.fspath(p) for p in self.checkpoint_files]
        elif self.checkpoint_mode is not None:
            paths = _rundir.get_all_checkpoints(config_run_dir)
        else:
            paths = []
        for p in paths:
            if not os.path.exists(p):
                logger.error("Checkpoint file was not found: %s", p)
                raise _BadCheckpoint(f"Checkpoint file was not found: {p}")
        if not self.memoize or not paths:
            return
        for p in paths:
            logger.info("Loading checkpoints from %s", p)
        report = _checkpoint.load_paths(paths)
        self._loaded = report.table
        self._loaded_parsl_keys = any(len(k) == 16 for k in report.table)
        self._load_errors = report.skipped
        for line in report.errors:
            logger.warning("%s", line)
        logger.info(
            "Completed loading checkpoints: %d records, %d tasks", report.records, len(report.table)
        )

    def close(self) -> None:
        """Make the final checkpoint and stop the loop. Idempotent.

        Called by the DataFlowKernel at cleanup, possibly while tasks are still
        running: their completions arrive later and return quietly (a
        collapsed follower of such a task still completes with it). A
        checkpoint that could not be saved is logged as an error, never
        raised, so the DataFlowKernel's cleanup goes on.
        """
        with self._lock:
            if self._state != "running":
                return
            self._state = "closing"
        loop, memo = self._loop, self._memo
        assert loop is not None and memo is not None
        try:
            if self._timer is not None:
                logger.info("Stopping checkpoint timer")
                loop.call(self._stop_timer())
            if self.checkpoint_mode is not None:
                logger.info("Making final checkpoint")
            before = memo.stats().checkpointed
            try:
                # the Memoizer's close makes the final pass itself (after its
                # drain's last pass: an extra pass here could race that one)
                loop.call(self._close_memo())
            except CheckpointError as exc:
                logger.error(
                    "aiomemo could not save %d checkpoint record(s) at close: %s",
                    exc.unsaved,
                    exc,
                )
            except Exception:
                logger.exception("aiomemo close failed")
            if self.checkpoint_mode is not None:
                self._log_pass(memo.stats().checkpointed - before)
            self._ensure_checkpoint_dir()
        finally:
            loop.stop()
            with self._lock:
                self._state = "closed"
                self._leaders.clear()
            if self._completer is not None:
                self._completer.shutdown(wait=False)

    def _ensure_checkpoint_dir(self) -> None:
        """Create ``<run_dir>/checkpoint/`` after a pass, as Parsl's memoizer does.

        Parsl creates it on every checkpoint pass, even one that writes
        nothing, and workflows pass it on as ``checkpoint_files`` to the next
        run; aiomemo's own store creates it only with the first record.
        Only for the default store (local files in the run dir).
        """
        if self.checkpoint_mode is None or self.store is not None:
            return
        try:
            os.makedirs(os.path.join(self.run_dir, "checkpoint"), exist_ok=True)
        except OSError as exc:
            logger.warning("could not create the checkpoint directory: %s", exc)

    def _running(self) -> bool:
        return self._state == "running"

    # ------------------------------------------------------------ lookups
    def check_memo(self, task: TaskRecord) -> concurrent.futures.Future[Any] | None:
        """Look the task up; sets ``task['hashsum']``.

        Returns:
            A done Future on a hit (a memoized exception comes back as the
            same object); when an identical task is running (collapse), a
            Future that completes when it does; None on a miss (the
            DataFlowKernel runs the task).

        Raises:
            Whatever a Parsl ``id_for_memo`` registration raised for an input;
            ParslUnhashableInputError (a ValueError) for an input nobody can key.
        """
        t: Any = task
        if not self.memoize or not t.get("memoize", True):
            t["hashsum"] = None
            logger.debug("Task %s will not be memoized", t.get("id"))
            return None
        # plain reads: a dict lookup and an attribute are atomic
        if id(task) in self._leaders:
            # a retry of a task this memoizer let run: run it again
            return None
        loop = self._loop
        if self._state != "running" or loop is None:
            t["hashsum"] = None  # shutting down: run it, record nothing
            return None
        view = _view(task)
        if self.track_code:
            view["track_code"] = True  # the app's code fingerprint joins the key
        hit = self._fast_check(task, view)
        if hit is not None:
            return hit
        if loop.on_loop_thread():  # never expected: Parsl does not launch from here
            logger.warning(
                "check_memo on the aiomemo loop thread; task %s not memoized", t.get("id")
            )
            t["hashsum"] = None
            return None
        try:
            return loop.call(self._check(task, view))
        except (_LoopClosedError, MemoizerClosedError):
            t["hashsum"] = None
            return None

    def _fast_check(
        self, task: TaskRecord, view: dict[str, Any]
    ) -> concurrent.futures.Future[Any] | None:
        """Answer a hit on a finished task in the calling thread, without a hop to the loop.

        None: not known to be finished (a miss, or in flight); the loop decides.
        """
        if not self._fast and not self._loaded:
            return None
        box: list[BaseException] = []
        token = _hook_errors.set(box)
        try:
            raw = _hashing.hash_task(view, _KEY_HOOKS)
        except BaseException as exc:
            raise _translate(exc, box) from None
        finally:
            _hook_errors.reset(token)
        key = raw.hex()
        done = self._fast.get(key)
        if done is None:
            done = self._from_loaded(view, raw, key)
            if done is None:
                return None
        t: Any = task
        t["hashsum"] = key
        logger.info("Task %s using result from cache", t.get("id"))
        with self._lock:
            self._fast_hits += 1
        return done  # shared, done: as BasicMemoizer shares its memo futures

    def _from_loaded(
        self, view: dict[str, Any], raw: bytes, key: str
    ) -> concurrent.futures.Future[Any] | None:
        """A loaded checkpoint record for the task (its aiomemo key, or Parsl's), decoded."""
        enc = self._loaded.get(raw)
        if enc is None and self._loaded_parsl_keys:
            try:
                t: Any = dict(view)
                t.pop("hashsum", None)
                raw = bytes.fromhex(_parsl_memoization.make_hash(t))
                enc = self._loaded.get(raw)
            except Exception:  # Parsl cannot key it: no Parsl record either
                enc = None
        if enc is None:
            # lost a race with a thread that just decoded it (see below)?
            return self._fast.get(key)
        try:
            value = _codec.decode(enc)
        except _codec.CodecError as exc:
            logger.warning("checkpointed result for %s could not be decoded: %s", key, exc)
            with self._lock:
                self._load_errors += 1
            self._loaded.pop(raw, None)
            return None
        done = self._fast.setdefault(key, _done_future(value, None))
        self._loaded.pop(raw, None)  # held decoded from now on (set before popped)
        # the aiomemo Memoizer learns it too, which (with a mode set) writes
        # it into this run's checkpoint, as Parsl does for every task that
        # used a result: get_last_checkpoint() then still finds it next time
        view["hashsum"] = key
        with self._lock:
            self._learn_queue.append((view, done.result()))
            first = len(self._learn_queue) == 1
        loop = self._loop
        if first and loop is not None:
            # one hop for a whole burst of hits, not one per hit
            with contextlib.suppress(_LoopClosedError):
                loop.submit(self._learn(_LEARN_DELAY)).add_done_callback(_log_failure)
        return done

    async def _learn(self, delay: float = 0.0) -> None:
        """Hand the loaded results used since the last call to the aiomemo Memoizer.

        With a mode set, it writes them into this run's checkpoint (as Parsl
        does for every task that used a result). Also called before every
        checkpoint pass and before close, so none is left behind.
        """
        if delay:
            await asyncio.sleep(delay)  # let a burst of hits gather into one batch
        memo = self._memo
        assert memo is not None
        with self._lock:
            batch, self._learn_queue = self._learn_queue, []
        if not batch or memo.closed:
            return
        todo = []
        for view, value in batch:
            key = view["hashsum"]
            if key not in self._recorded:
                self._recorded.add(key)
                todo.append(memo.update_memo_result(view, value))
        if self.checkpoint_mode == "task_exit":
            # concurrently: they share one group commit
            results: list[Any] = await asyncio.gather(*todo, return_exceptions=True)
        else:
            results = []  # these do not wait for anything: no task each
            for coro in todo:
                try:
                    await coro
                except Exception as exc:
                    results.append(exc)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, MemoizerClosedError):
                logger.error("aiomemo could not record a result used from a checkpoint: %r", r)

    async def _check(
        self, task: TaskRecord, view: dict[str, Any]
    ) -> concurrent.futures.Future[Any] | None:
        memo = self._memo
        assert memo is not None
        t: Any = task
        box: list[BaseException] = []
        token = _hook_errors.set(box)
        try:
            afut = await memo.check_memo(view)
        except BaseException as exc:
            raise _translate(exc, box) from None
        finally:
            _hook_errors.reset(token)
        hashsum = view.get("hashsum")
        t["hashsum"] = hashsum
        logger.debug("Task %s has memoization hash %s", t.get("id"), hashsum)
        if afut is None:
            logger.info("Task %s had no result in cache", t.get("id"))
            with self._lock:
                self._leaders[id(task)] = (task, view)
            return None
        cf: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if afut.done():
            logger.info("Task %s using result from cache", t.get("id"))
            # a fresh Future with no callbacks yet: completing it here is safe
            if afut.cancelled():
                _settle(cf, None, LeaderCancelledError("the memoized task was cancelled"))
            else:
                error = afut.exception()
                value = afut.result() if error is None else None
                _settle(cf, value, error)
                if isinstance(hashsum, str):
                    self._fast.setdefault(hashsum, cf)
            if (
                self.checkpoint_mode is not None
                and isinstance(hashsum, str)
                and afut.exception() is None
                and hashsum not in self._recorded
            ):
                # Parsl writes a record for every task that used a result, so
                # this run's checkpoint holds it too (get_last_checkpoint)
                self._recorded.add(hashsum)
                memo.update_checkpoint(view)
            return cf
        logger.info("Task %s waits for the identical task running now", t.get("id"))
        assert isinstance(hashsum, str)
        with self._lock:
            self._followers.setdefault(hashsum, []).append(cf)
        afut.add_done_callback(functools.partial(self._relay, cf, hashsum))
        return cf

    def _relay(
        self, cf: concurrent.futures.Future[Any], key: str, afut: asyncio.Future[Any]
    ) -> None:
        """Loop callback: pass the leader's outcome to a follower, off the loop thread.

        Completing ``cf`` runs the DataFlowKernel's callbacks, which call back
        into this memoizer and block on the loop: never on the loop thread.
        """
        if afut.cancelled():
            exc: BaseException | None = LeaderCancelledError("the identical task was cancelled")
            result = None
        else:
            exc = afut.exception()
            result = afut.result() if exc is None else None
        if isinstance(exc, MemoizerClosedError):
            # closed with the leader still running: its completion, which
            # arrives later, settles cf (see _after_close)
            return
        with self._lock:
            waiting = self._followers.get(key)
            if waiting is not None:
                with contextlib.suppress(ValueError):
                    waiting.remove(cf)
                if not waiting:
                    del self._followers[key]
        completer = self._completer
        if completer is None:
            return
        try:
            completer.submit(_settle, cf, result, exc)
        except RuntimeError:  # completer shut down: settle from a fresh thread
            threading.Thread(target=_settle, args=(cf, result, exc), daemon=True).start()

    # ------------------------------------------------------------ completions
    def update_memo_result(self, task: TaskRecord, r: Any) -> None:
        """Record the result of a finished task (called by the DataFlowKernel)."""
        self._update(task, r, None)

    def update_memo_exception(self, task: TaskRecord, e: BaseException) -> None:
        """Record that a task failed; the exception is memoized for this run only."""
        self._update(task, None, e)

    def _update(self, task: TaskRecord, result: Any, exc: BaseException | None) -> None:
        t: Any = task
        with self._lock:
            entry = self._leaders.pop(id(task), None)
            running = self._running()
            loop = self._loop
        hashsum = t.get("hashsum")
        if not isinstance(hashsum, str):
            return  # not memoized, never looked up, or a dependency failure
        if not running or loop is None:
            self._after_close(hashsum, result, exc)
            return
        if entry is None:
            # a hit or a collapsed follower: aiomemo has the result already
            return
        view = entry[1]
        try:
            if self.checkpoint_mode == "task_exit" and exc is None and not loop.on_loop_thread():
                # returns once the record is durable, as BasicMemoizer's write
                loop.call(self._record_outcome(view, result, exc))
            else:
                # nothing to wait for: later calls queue behind it on the loop
                loop.submit(self._record_outcome(view, result, exc)).add_done_callback(_log_failure)
        except (_LoopClosedError, MemoizerClosedError):
            self._after_close(hashsum, result, exc)
        except Exception:
            # a memo that cannot record must never fail the task
            logger.exception("aiomemo could not record the outcome of task %s", t.get("id"))

    async def _record_outcome(
        self, view: dict[str, Any], result: Any, exc: BaseException | None
    ) -> None:
        memo = self._memo
        assert memo is not None
        key = view.get("hashsum")
        try:
            if exc is not None:
                await memo.update_memo_exception(view, exc)
            else:
                if isinstance(key, str):
                    self._recorded.add(key)
                await memo.update_memo_result(view, result)
        except MemoizerClosedError:
            if isinstance(key, str):  # closed under us: complete the followers anyway
                threading.Thread(
                    target=self._after_close, args=(key, result, exc), daemon=True
                ).start()
            return
        if isinstance(key, str) and memo.memoize:
            self._fast[key] = _done_future(result, exc)
        if self.checkpoint_mode == "task_exit":
            logger.debug("Task %s checkpointed", view.get("id"))
        elif (
            self.checkpoint_mode == "periodic"
            and (self._early is None or self._early.done())
            and memo.stats().pending >= memo.max_pending
        ):
            self._early = asyncio.ensure_future(self._pass())  # memory bound: drain early

    def _after_close(self, key: str, result: Any, exc: BaseException | None) -> None:
        """A leader finished after close: complete its followers directly."""
        with self._lock:
            waiting = self._followers.pop(key, [])
        for cf in waiting:
            _settle(cf, result, exc)

    # ------------------------------------------------------------ checkpoints
    def _log_pass(self, count: int) -> None:
        """Log a checkpoint pass the way Parsl's BasicMemoizer does."""
        memo = self._memo
        # every record aiomemo wrote in this run (task_exit writes them as tasks end)
        self.checkpointed_tasks = (
            memo.stats().checkpointed if memo is not None else self.checkpointed_tasks + count
        )
        if count == 0:
            if self.checkpointed_tasks == 0:
                logger.warning(
                    "No tasks checkpointed so far in this run. Please ensure caching is enabled"
                )
            else:
                logger.debug("No tasks checkpointed in this pass.")
        else:
            logger.info("Done checkpointing %d tasks", count)

    async def _close_memo(self) -> None:
        memo = self._memo
        assert memo is not None
        async with self._pass_guard():
            await self._learn()
            await memo.close()

    def _pass_guard(self) -> asyncio.Lock:
        """One checkpoint pass at a time (timer, early drain, manual, close): on the loop."""
        if self._pass_lock is None:
            self._pass_lock = asyncio.Lock()
        return self._pass_lock

    async def _pass(self) -> None:
        memo = self._memo
        assert memo is not None
        async with self._pass_guard():
            if memo.closed:
                return
            await self._learn()
            try:
                self._log_pass(await memo.checkpoint_queue())
            except CheckpointError as exc:
                logger.error("Checkpoint pass failed (records stay queued): %s", exc)

    async def _start_timer(self, period: float, started: float) -> None:
        self._timer_stop = asyncio.Event()
        self._timer = asyncio.create_task(
            self._periodic(period, self._timer_stop, started),
            name="aiomemo-parsl-checkpoint-timer",
        )

    async def _stop_timer(self) -> None:
        """Stop the timer between passes (a pass under way finishes first)."""
        if self._timer_stop is not None:
            self._timer_stop.set()
        if self._timer is not None:
            await self._timer
        self._timer = self._timer_stop = None

    async def _periodic(self, period: float, stop: asyncio.Event, started: float) -> None:
        """Checkpoint every ``period`` seconds from ``started`` (``time.monotonic()``).

        Fixed rate: passes at started + k * period, whatever a pass takes (a
        tick missed while a pass ran is skipped), so they do not drift.
        """
        tick = 1
        while True:
            delay = started + tick * period - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                else:
                    return
            await self._pass()
            tick = max(tick + 1, int((time.monotonic() - started) // period) + 1)

    def checkpoint_queue(self) -> None:
        """Write every queued record now (as ``BasicMemoizer.checkpoint_queue``)."""
        with self._lock:
            running, loop = self._running(), self._loop
        if not running or loop is None:
            return
        with contextlib.suppress(_LoopClosedError):
            loop.call(self._pass())
        self._ensure_checkpoint_dir()

    def checkpoint(self) -> None:
        """Manual checkpoint (the user-facing call, as ``BasicMemoizer.checkpoint``)."""
        self.checkpoint_queue()

    # ------------------------------------------------------------ introspection
    @property
    def memoizer(self) -> Memoizer | None:
        """The aiomemo Memoizer of the current run (None before start)."""
        return self._memo

    def stats(self) -> MemoStats | None:
        """aiomemo's counters for this run (hits, misses, collapsed, checkpointed, ...).

        None before the first start. Hits answered without the loop and
        records loaded at start are included.
        """
        memo = self._memo
        if memo is None:
            return None
        st = memo.stats()
        return st._replace(
            hits=st.hits + self._fast_hits,
            entries=st.entries + len(self._loaded),
            load_errors=st.load_errors + self._load_errors,
        )
