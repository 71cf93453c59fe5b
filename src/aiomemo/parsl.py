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

import concurrent.futures
import datetime
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

try:
    from parsl.dataflow.errors import BadCheckpoint as _BadCheckpoint
    from parsl.dataflow.memoization import Memoizer as _ParslMemoizerBase
    from parsl.dataflow.taskrecord import TaskRecord
    from parsl.errors import ConfigurationError as _ParslConfigurationError
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "aiomemo.parsl needs Parsl, which is not installed: "
        "install aiomemo with the parsl extra, e.g. pip install 'aiomemo[parsl]'"
    ) from _exc

from aiomemo import _rundir
from aiomemo._exceptions import CheckpointError, MemoError
from aiomemo._memoizer import Memoizer, MemoStats
from aiomemo._parsl_followers import Followers
from aiomemo._parsl_keys import KEY_HOOKS as _KEY_HOOKS
from aiomemo._parsl_keys import ParslUnhashableInputError
from aiomemo._parsl_lookups import Lookups
from aiomemo._parsl_outcomes import Outcomes
from aiomemo._portal import Portal, PortalClosedError
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


class ParslConfigurationError(_ParslConfigurationError, MemoError, ValueError):
    """A bad ``ParslMemoizer`` argument: Parsl's ConfigurationError, a MemoError and a ValueError."""


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
        ttl: seconds (or a timedelta) an app result stays valid after it was
            recorded; None (default, as Parsl): results never expire.

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
        ttl: float | datetime.timedelta | None = None,
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
        self.ttl = ttl
        # validate now (Parsl validates the period only at start)
        try:
            probe = Memoizer(
                memoize=memoize,
                checkpoint_period=checkpoint_period,
                checkpoint_mode=checkpoint_mode,
                collapse=collapse,
                ttl=ttl,
            )
        except (ValueError, TypeError) as exc:
            raise ParslConfigurationError(str(exc)) from exc
        del probe

        self.checkpointed_tasks = 0
        self._memo: Memoizer | None = None
        self._portal: Portal | None = None
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._lock = threading.Lock()
        self._followers = Followers()
        # the run's lookups (and leaders) and the leaders' outcomes on their
        # way into the memo: while running
        self._lookups: Lookups | None = None
        self._outcomes: Outcomes | None = None

    def __repr__(self) -> str:
        args = [
            f"{name}={getattr(self, name)!r}"
            for name in ("checkpoint_mode", "checkpoint_period", "checkpoint_files", "memoize")
        ]
        args.append(f"collapse={self.collapse!r}")
        if self.track_code:
            args.append("track_code=True")
        if self.ttl is not None:
            args.append(f"ttl={self.ttl!r}")
        if self.store is not None:
            args.append(f"store={self.store!r}")
        return f"ParslMemoizer({', '.join(args)})"

    # ------------------------------------------------------------ lifecycle
    def start(self, *, run_dir: str, config_run_dir: str) -> None:
        """Start the private loop and the aiomemo Memoizer; load checkpoints.

        Called by the DataFlowKernel when it starts. A ParslMemoizer that was
        closed can be started again (a Config reused by a new DataFlowKernel).
        A checkpoint path that does not exist raises Parsl's BadCheckpoint;
        damaged records are skipped with a warning (the good ones around
        them are kept).
        """
        started = time.monotonic()  # the checkpoint period counts from here, as Parsl's
        with self._lock:
            if self._state in ("running", "closing"):
                raise RuntimeError("this ParslMemoizer is already running for a DataFlowKernel")
            self._state = "running"
        self.run_dir = run_dir
        self.config_run_dir = config_run_dir
        self.checkpointed_tasks = 0
        self._followers = Followers()
        self._lookups = None
        self._outcomes = None
        try:
            memo = self._memo = self._make_memo(run_dir, config_run_dir)
        except BaseException:
            self._state = "closed"
            raise
        # Parsl passes an empty last checkpoint on to the next run without a word
        memo._warn_empty_dirs = False
        memo._drain.origin = started
        memo._drain.on_pass = self._log_pass
        self._followers.open()
        self._portal = Portal(name="aiomemo-parsl-loop")
        recorded: set[str] = set()  # keys whose record this run wrote or queued already
        lookups = Lookups(
            memo, self._portal, self._followers, recorded, track_code=self.track_code
        )
        memo._drain.before_pass = lookups.learn_now
        try:
            self._portal.call(memo.start())
        except BaseException:
            self._portal.stop()
            self._followers.shutdown()
            self._state = "closed"
            raise
        self._outcomes = Outcomes(memo, self._portal, self._followers, recorded)
        self._lookups = lookups
        if memo.checkpoint_files:
            logger.info("Completed loading checkpoints: %d tasks", memo.stats().entries)
        if self.memoize:
            logger.info("App caching initialized")
        else:
            logger.info("App caching disabled for all apps")

    def _make_memo(self, run_dir: str, config_run_dir: str) -> Memoizer:
        """The aiomemo Memoizer of a run, with the checkpoints to start from.

        ``checkpoint_files`` as given, or with a mode set and none given,
        every checkpoint under the config's run dir (as BasicMemoizer).
        """
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
        if self.memoize:
            for p in paths:
                logger.info("Loading checkpoints from %s", p)
        try:
            return Memoizer(
                memoize=self.memoize,
                checkpoint_files=paths,
                checkpoint_mode=self.checkpoint_mode,
                checkpoint_period=self.checkpoint_period,
                run_dir=run_dir,
                config_run_dir=config_run_dir,
                store=self.store,
                collapse=self.collapse,
                parsl_keys=True,  # records imported from Parsl's checkpoints
                key_hooks=_KEY_HOOKS,
                ttl=self.ttl,
            )
        except (ValueError, TypeError) as exc:
            raise ParslConfigurationError(str(exc)) from exc

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
        portal, memo, outcomes = self._portal, self._memo, self._outcomes
        assert portal is not None and memo is not None
        try:
            if outcomes is not None:
                outcomes.close()  # completions being recorded in their threads end first
            if self.checkpoint_mode == "periodic":
                logger.info("Stopping checkpoint timer")
            if self.checkpoint_mode is not None:
                logger.info("Making final checkpoint")
            try:
                # the Memoizer's close makes the final pass (logged by _log_pass)
                portal.call(memo.close())
            except CheckpointError as exc:
                logger.error(
                    "aiomemo could not save %d checkpoint record(s) at close: %s",
                    exc.unsaved,
                    exc,
                )
            except Exception:
                logger.exception("aiomemo close failed")
            self._ensure_checkpoint_dir()
        finally:
            portal.stop()
            with self._lock:
                self._state = "closed"
                lookups = self._lookups
            if lookups is not None:
                lookups.clear()
            self._followers.shutdown()

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
        lookups = self._lookups  # plain reads: an attribute, a dict lookup are atomic
        if lookups is not None and lookups.is_leader(task):
            # a retry of a task this memoizer let run: run it again
            return None
        if self._state != "running" or lookups is None:
            t["hashsum"] = None  # shutting down: run it, record nothing
            return None
        return lookups.check(task)

    # ------------------------------------------------------------ completions
    def update_memo_result(self, task: TaskRecord, r: Any) -> None:
        """Record the result of a finished task (called by the DataFlowKernel)."""
        self._update(task, r, None)

    def update_memo_exception(self, task: TaskRecord, e: BaseException) -> None:
        """Record that a task failed; the exception is memoized for this run only."""
        self._update(task, None, e)

    def _update(self, task: TaskRecord, result: Any, exc: BaseException | None) -> None:
        t: Any = task
        # plain reads (each atomic): a close() that begins right after is
        # caught by the Outcomes' own closed flag
        running = self._state == "running"
        lookups, outcomes = self._lookups, self._outcomes
        view = lookups.pop_leader(task) if lookups is not None else None
        hashsum = t.get("hashsum")
        if not isinstance(hashsum, str):
            return  # not memoized, never looked up, or a dependency failure
        if not running or outcomes is None:
            self._followers.after_close(hashsum, result, exc)
            return
        if view is not None:  # else a hit or a follower: aiomemo has the result already
            outcomes.report(view, hashsum, result, exc, t.get("app_fu") if exc is None else None)

    # ------------------------------------------------------------ checkpoints
    def _log_pass(self, count: int) -> None:
        """The drain's per-pass callback: log the pass the way Parsl's BasicMemoizer does."""
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

    def checkpoint_queue(self) -> None:
        """Write every queued record now (as ``BasicMemoizer.checkpoint_queue``)."""
        with self._lock:
            running, portal, memo = self._running(), self._portal, self._memo
        if not running or portal is None or memo is None:
            return
        try:
            portal.call(memo.checkpoint_queue())
        except PortalClosedError:
            return
        except CheckpointError as exc:
            logger.error("Checkpoint pass failed (records stay queued): %s", exc)
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

        None before the first start. Hits answered in the calling thread and
        records loaded at start are included.
        """
        memo = self._memo
        return memo.stats() if memo is not None else None
