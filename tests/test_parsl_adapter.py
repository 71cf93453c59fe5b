"""aiomemo.parsl.ParslMemoizer driven by a real Parsl DataFlowKernel.

Parsl's own memoization and checkpoint tests run against ParslMemoizer in
``scripts/parsl-suite``; the tests here cover what those cannot: the
behaviour of the Parsl tests exempted there (they read Parsl's pickle
format), tested against aiomemo's format, plus what is new (collapse through
Parsl, thread safety, shutdown with tasks in flight, the id_for_memo bridge,
bash app keys, the import error without Parsl).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

parsl = pytest.importorskip("parsl")

from parsl.app.app import bash_app, join_app, python_app  # noqa: E402
from parsl.config import Config  # noqa: E402
from parsl.dataflow.memoization import id_for_memo as parsl_id_for_memo  # noqa: E402
from parsl.errors import ConfigurationError  # noqa: E402
from parsl.executors.threads import ThreadPoolExecutor  # noqa: E402
from parsl.utils import get_last_checkpoint  # noqa: E402

from aiomemo import UnhashableInputError  # noqa: E402
from aiomemo import _checkpoint as ck  # noqa: E402
from aiomemo._checkpoint import load_paths  # noqa: E402
from aiomemo.parsl import (  # noqa: E402
    ParslConfigurationError,
    ParslMemoizer,
    ParslUnhashableInputError,
)

# ---------------------------------------------------------------- helpers

_calls: dict[str, int] = {}
_calls_lock = threading.Lock()


def _count(name: str) -> None:
    with _calls_lock:
        _calls[name] = _calls.get(name, 0) + 1


@pytest.fixture(autouse=True)
def _reset_calls() -> Iterator[None]:
    _calls.clear()
    yield
    # a test that failed half-way must not leave a DFK loaded for the next
    try:
        dfk = parsl.dfk()
    except Exception:
        return
    dfk.cleanup()


def _config(run_root: Path, memoizer: ParslMemoizer, *, threads: int = 4, **kw: Any) -> Config:
    return Config(
        run_dir=str(run_root),
        executors=[ThreadPoolExecutor(max_threads=threads, label="adapter_threads")],
        memoizer=memoizer,
        **kw,
    )


def _records(checkpoint_dir: str | os.PathLike[str]) -> int:
    """Records in an aiomemo checkpoint directory (every one, duplicates too)."""
    report = load_paths([checkpoint_dir])
    assert not report.errors, report.errors
    return report.records


def _keys(checkpoint_dir: str | os.PathLike[str]) -> set[bytes]:
    return set(load_paths([checkpoint_dir]).table)


# ---------------------------------------------------------------- apps


@python_app(cache=True)
def double(x: int, sleep: float = 0.0) -> int:
    _count("double")
    time.sleep(sleep)
    return x * 2


@python_app(cache=True)
def uuid_app(x: int = 0) -> str:
    _count("uuid_app")
    return str(uuid.uuid4())


@python_app(cache=True)
def slow_uuid(x: int, sleep: float = 0.3) -> str:
    _count("slow_uuid")
    time.sleep(sleep)
    return str(uuid.uuid4())


@python_app(cache=True)
def slow_fail(x: int, sleep: float = 0.3) -> None:
    _count("slow_fail")
    time.sleep(sleep)
    raise RuntimeError(f"failure {uuid.uuid4()}")


_flaky_failed: set[int] = set()


@python_app(cache=True)
def flaky(x: int, sleep: float = 0.3) -> str:
    _count("flaky")
    time.sleep(sleep)
    with _calls_lock:
        first = x not in _flaky_failed
        _flaky_failed.add(x)
    if first:
        raise RuntimeError("first try fails")
    return f"ok {x}"


@python_app(cache=True)
def takes(value: object) -> str:
    _count("takes")
    return str(uuid.uuid4())


@bash_app(cache=True)
def echo_a(stdout: str | None = None) -> str:
    return "echo a"


@bash_app(cache=True)
def echo_b(stdout: str | None = None) -> str:
    return "echo b"


@python_app
def const(x: str) -> str:
    return x


@join_app(cache=True)
def joined(x: int) -> Any:
    _count("joined")
    return const(str(uuid.uuid4()))


# ---------------------------------------------------------------- exempted Parsl tests, in aiomemo's format


def test_task_exit_one_record_per_task(tmp_path: Path) -> None:
    """test_checkpointing/test_task_exit.py::test_at_task_exit, in aiomemo's format.

    n distinct tasks in task_exit mode: n records, durable by the time the
    app futures are done (no wait needed).
    """
    n = 4
    with parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_mode="task_exit"))) as dfk:
        futs = [double(i) for i in range(n)]
        assert [f.result() for f in futs] == [0, 2, 4, 6]
        ckpt = Path(dfk.run_dir) / "checkpoint"
        assert _records(ckpt) == n
        # hits of the same tasks add nothing
        assert [double(i).result() for i in range(n)] == [0, 2, 4, 6]
    assert _calls["double"] == n
    assert _records(ckpt) == n


@python_app(cache=True)
def triple(x: int) -> int:
    return x * 3


def test_task_exit_every_app_future_completes_after_its_record(tmp_path: Path) -> None:
    """2,000 quick apps on 4 threads: each AppFuture's callback finds its record on disk.

    The completing threads do not wait for the disk (the result is held back
    on the AppFuture until the group's sync), and the syncs are fewer than
    the tasks (the syncs are made slow, so that this holds on any disk).
    """
    from aiomemo import _checkpoint as ck

    n = 2_000
    syncs = [0]
    real_append = ck._append_synced

    def counting(fd: int, data: bytes) -> None:
        # A disk that takes 50 ms a sync: completions arriving faster than
        # that (20 a second: any machine, even a loaded one) must share
        # syncs, however fast this machine's own disk is.
        syncs[0] += 1
        time.sleep(0.05)
        real_append(fd, data)

    late: list[int] = []
    ck._append_synced = counting
    t0 = time.monotonic()
    try:
        with parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_mode="task_exit"))) as dfk:
            ckpt = Path(dfk.run_dir) / "checkpoint"
            futs = []
            for i in range(n):
                fut = triple(i)

                def check(f: Any, i: int = i) -> None:
                    key = f.task_record["hashsum"]
                    # one file read per 50 tasks keeps the test quick
                    if i % 50 == 0 and bytes.fromhex(key) not in _keys(ckpt):
                        late.append(i)

                fut.add_done_callback(check)
                futs.append(fut)
            assert [f.result() for f in futs] == [3 * i for i in range(n)]
    finally:
        ck._append_synced = real_append
    elapsed = time.monotonic() - t0
    assert not late, f"apps {late} completed before their record was durable"
    assert _records(ckpt) == n
    # the syncs follow the time (one group at a time), not the tasks
    assert syncs[0] <= elapsed / 0.05 + 1, (syncs[0], elapsed)
    assert syncs[0] < n / 2, (syncs[0], elapsed)


def test_task_exit_done_callback_may_wait_for_another_app(tmp_path: Path) -> None:
    """A done callback that waits for an app it launches completes (no deadlock).

    The result of a task_exit app is released by the group-commit thread once
    its record is durable; the Future's callbacks must not run there, or a
    callback waiting for another app (whose record that thread has yet to
    write) waits forever.
    """
    got: list[int] = []
    threads: list[str] = []
    done = threading.Event()
    with parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_mode="task_exit"))):
        first = triple(1)

        def then(f: Any) -> None:
            threads.append(threading.current_thread().name)
            got.append(triple(f.result() + 100).result(timeout=30))
            done.set()

        first.add_done_callback(then)
        assert first.result(timeout=30) == 3
        assert done.wait(30), "the callback's app never completed"
    assert got == [309]
    assert not threads[0].startswith("aiomemo-group-commit"), threads


def test_task_exit_blocked_callback_holds_back_no_other_app(tmp_path: Path) -> None:
    """One callback blocked until every other app is done does not stall those apps."""
    gate = threading.Event()
    n = 200
    with parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_mode="task_exit"))):
        first = triple(-1)
        first.add_done_callback(lambda f: gate.wait(60))
        assert first.result(timeout=30) == -3
        futs = [triple(i) for i in range(n)]
        try:
            assert [f.result(timeout=30) for f in futs] == [3 * i for i in range(n)]
        finally:
            gate.set()


def test_held_result_callbacks_run_in_order_and_survive_errors() -> None:
    """Released by the group commit: waiters wake, callbacks run in order, errors are logged."""
    from aiomemo._parsl_followers import Followers
    from aiomemo._parsl_outcomes import HeldCompletion

    followers = Followers()
    followers.open()  # its completer threads run the callbacks

    fut: concurrent.futures.Future[int] = concurrent.futures.Future()
    seen: list[tuple[str, int, str]] = []
    ran = threading.Event()

    def boom(f: Any) -> None:
        seen.append(("boom", f.result(), threading.current_thread().name))
        raise RuntimeError("a callback's own error")

    def after(f: Any) -> None:
        seen.append(("after", f.result(), threading.current_thread().name))
        ran.set()

    fut.add_done_callback(boom)
    fut.add_done_callback(after)
    held = HeldCompletion.hold(fut, followers.run_elsewhere)
    assert held is not None
    fut.set_result(7)  # the DataFlowKernel's call: held back
    assert not fut.done()
    held.durable(None)  # the record is on disk: released
    assert fut.result(timeout=5) == 7
    assert ran.wait(5)
    assert [s[:2] for s in seen] == [("boom", 7), ("after", 7)]
    assert seen[0][2] == seen[1][2] != threading.current_thread().name
    late: list[int] = []
    fut.add_done_callback(lambda f: late.append(f.result()))  # added once done: runs here
    assert late == [7]
    followers.shutdown()


def test_manual_checkpoint_creates_records(tmp_path: Path) -> None:
    """test_checkpointing/test_manual.py::test_manual_checkpoint, in aiomemo's format."""
    memoizer = ParslMemoizer(checkpoint_mode="manual")
    with parsl.load(_config(tmp_path, memoizer)) as dfk:
        uuid_app().result()
        ckpt = Path(dfk.run_dir) / "checkpoint"
        assert not ckpt.exists() or _records(ckpt) == 0, "nothing is written before checkpoint()"
        memoizer.checkpoint()
        assert ckpt.is_dir()
        assert _records(ckpt) == 1


# ---------------------------------------------------------------- checkpoint modes and logs


def _checkpoint_lines(run_dir: str) -> list[str]:
    text = (Path(run_dir) / "parsl.log").read_text()
    return [
        line
        for line in text.splitlines()
        if " Done checkpointing" in line or " No tasks checkpointed in this pass" in line
    ]


def test_periodic_logs_parsl_lines(tmp_path: Path) -> None:
    """Periodic passes log Parsl's lines into parsl.log, through the parsl.aiomemo logger."""
    memoizer = ParslMemoizer(checkpoint_mode="periodic", checkpoint_period="00:00:01")
    with parsl.load(_config(tmp_path, memoizer, threads=1)) as dfk:
        futs = [double(i, sleep=0.6) for i in range(4)]  # ~2.4 s on one thread
        assert [f.result() for f in futs] == [0, 2, 4, 6]
        run_dir = dfk.run_dir
    lines = _checkpoint_lines(run_dir)
    assert len(lines) >= 3, lines
    assert all("parsl.aiomemo" in line for line in lines)
    assert any("Done checkpointing" in line for line in lines)
    assert _records(Path(run_dir) / "checkpoint") == 4


def test_dfk_exit_writes_at_cleanup(tmp_path: Path) -> None:
    with parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_mode="dfk_exit"))) as dfk:
        assert [double(i).result() for i in range(3)] == [0, 2, 4]
        ckpt = Path(dfk.run_dir) / "checkpoint"
        assert not ckpt.exists() or _records(ckpt) == 0
        run_dir = dfk.run_dir
    assert _records(ckpt) == 3
    assert any("Done checkpointing 3 tasks" in line for line in _checkpoint_lines(run_dir))


def test_checkpoint_dir_exists_after_a_run_without_results(tmp_path: Path) -> None:
    """As with Parsl, a run with a mode set leaves <run_dir>/checkpoint/ to load from."""
    with parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_mode="task_exit"))) as dfk:
        assert isinstance(slow_fail(1, sleep=0).exception(), RuntimeError)
        ckpt = Path(dfk.run_dir) / "checkpoint"
    assert ckpt.is_dir()
    with parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_files=[str(ckpt)]))):
        assert isinstance(slow_fail(1, sleep=0).exception(), RuntimeError)
    assert _calls["slow_fail"] == 2, "exceptions are not checkpointed"


def test_hits_are_recorded_in_the_new_run_once(tmp_path: Path) -> None:
    """A result used from an older checkpoint is written into this run's checkpoint (once)."""
    with parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_mode="task_exit"))):
        first = uuid_app(7).result()
    for _ in range(2):  # each run loads only the run before it
        memoizer = ParslMemoizer(
            checkpoint_mode="task_exit", checkpoint_files=get_last_checkpoint(str(tmp_path))
        )
        with parsl.load(_config(tmp_path, memoizer)) as dfk:
            assert [uuid_app(7).result() for _ in range(3)] == [first] * 3
            run_dir = dfk.run_dir
        assert _records(Path(run_dir) / "checkpoint") == 1
    assert _calls["uuid_app"] == 1


def test_memoize_false_disables_caching(tmp_path: Path) -> None:
    with parsl.load(_config(tmp_path, ParslMemoizer(memoize=False, checkpoint_mode="task_exit"))):
        a, b = uuid_app(1).result(), uuid_app(1).result()
    assert a != b
    assert _calls["uuid_app"] == 2


# ---------------------------------------------------------------- collapse, exceptions, retries


#: Events the gated apps wait on, by name
_gates: dict[str, threading.Event] = {}


@python_app(cache=True)
def gated_uuid(x: int, gate: str) -> str:
    _count("gated_uuid")
    _gates[gate].wait(30)
    return str(uuid.uuid4())


def _wait_until(done: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``done`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _called(name: str) -> int:
    with _calls_lock:
        return _calls.get(name, 0)


def test_collapse_runs_identical_in_flight_tasks_once(tmp_path: Path) -> None:
    """The leader is held until all five twins were checked: each one collapses, none is a hit."""
    memoizer = ParslMemoizer()
    gate = _gates["collapse"] = threading.Event()
    with parsl.load(_config(tmp_path, memoizer)):
        futs = [gated_uuid(1, "collapse") for _ in range(6)]
        try:
            _wait_until(lambda: (s := memoizer.stats()) is not None and s.collapsed >= 5)
        finally:
            gate.set()
        results = {f.result(timeout=30) for f in futs}
        stats = memoizer.stats()
    assert len(results) == 1
    assert _calls["gated_uuid"] == 1
    assert stats is not None and (stats.misses, stats.collapsed, stats.hits) == (1, 5, 0)


def test_collapse_off_runs_each(tmp_path: Path) -> None:
    """collapse=False: identical apps in flight together each run (none finishes before all started)."""
    gate = _gates["off"] = threading.Event()
    with parsl.load(_config(tmp_path, ParslMemoizer(collapse=False))):
        futs = [gated_uuid(2, "off") for _ in range(3)]
        try:
            _wait_until(lambda: _called("gated_uuid") >= 3)
            started = _called("gated_uuid")
        finally:
            gate.set()
        results = {f.result(timeout=30) for f in futs}
    assert started == 3
    assert len(results) == 3
    assert _calls["gated_uuid"] == 3


def test_followers_blocked_callbacks_hold_back_no_other_follower(tmp_path: Path) -> None:
    """Followers whose done callbacks block (more than a few) do not stall the other followers."""
    gate = threading.Event()
    with parsl.load(_config(tmp_path, ParslMemoizer())):
        futs = [slow_uuid(3, sleep=0.5) for _ in range(14)]
        for f in futs[:12]:
            f.add_done_callback(lambda f: gate.wait(60))
        try:
            last = {f.result(timeout=20) for f in futs[12:]}
        finally:
            gate.set()
        assert {f.result(timeout=30) for f in futs} == last and len(last) == 1
    assert _calls["slow_uuid"] == 1


def test_collapsed_followers_get_the_same_exception_object(tmp_path: Path) -> None:
    with parsl.load(_config(tmp_path, ParslMemoizer())):
        futs = [slow_fail(1) for _ in range(3)]
        excs = [f.exception(timeout=30) for f in futs]
        later = slow_fail(1).exception(timeout=30)
    assert isinstance(excs[0], RuntimeError)
    assert all(e is excs[0] for e in excs)
    assert later is excs[0]
    assert _calls["slow_fail"] == 1


def test_leader_retry_does_not_wait_on_itself(tmp_path: Path) -> None:
    """A leader that fails and is retried by Parsl runs again; its followers get the retry's result."""
    _flaky_failed.clear()
    with parsl.load(_config(tmp_path, ParslMemoizer(), retries=1)):
        futs = [flaky(3) for _ in range(3)]
        results = [f.result(timeout=30) for f in futs]
    assert results == ["ok 3"] * 3
    assert _calls["flaky"] == 2


def test_join_app_memoized(tmp_path: Path) -> None:
    with parsl.load(_config(tmp_path, ParslMemoizer())):
        first = joined(1).result(timeout=30)
        assert joined(1).result(timeout=30) == first
    assert _calls["joined"] == 1


def test_many_threads_many_duplicates(tmp_path: Path) -> None:
    """Launch and completions from many threads at once: right results, no deadlock."""
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    with parsl.load(_config(tmp_path, memoizer, threads=8)) as dfk:
        futs = [double(i % 25, sleep=0.001) for i in range(400)]
        results = [f.result(timeout=60) for f in futs]
        ckpt = Path(dfk.run_dir) / "checkpoint"
    assert results == [(i % 25) * 2 for i in range(400)]
    assert _calls["double"] == 25
    assert _records(ckpt) == 25


# ---------------------------------------------------------------- shutdown


@python_app(cache=True)
def gated(x: int, gate: str) -> str:
    _count("gated")
    _gates[gate].wait(30)
    return f"done {x}"


def test_cleanup_with_tasks_in_flight_and_followers(tmp_path: Path) -> None:
    """DFK cleanup (memoizer.close) while a leader and its followers are in flight.

    The leader completes after close(): its update returns quietly and the
    followers still complete, with the leader's result.
    """
    gate = threading.Event()
    _gates["g1"] = gate
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    dfk = parsl.load(_config(tmp_path, memoizer))
    futs = [gated(1, "g1") for _ in range(3)]
    _wait_until(lambda: _called("gated") >= 1, timeout=10)
    time.sleep(0.1)  # the followers are launched too
    threading.Timer(0.5, gate.set).start()  # the leader finishes during cleanup
    dfk.cleanup()  # closes the memoizer first, then waits for the executor
    assert [f.result(timeout=10) for f in futs] == ["done 1"] * 3
    assert _calls["gated"] == 1
    memoizer.close()  # idempotent


def test_calls_after_close_return_quietly(tmp_path: Path) -> None:
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    with parsl.load(_config(tmp_path, memoizer)) as dfk:
        double(1).result()
    task: dict[str, Any] = {
        "id": 99,
        "func": double.func,
        "args": (5,),
        "kwargs": {},
        "memoize": True,
        "ignore_for_cache": [],
        "hashsum": None,
    }
    assert memoizer.check_memo(task) is None  # type: ignore[arg-type]
    memoizer.update_memo_result(task, 10)  # type: ignore[arg-type]
    memoizer.update_memo_exception(task, RuntimeError("x"))  # type: ignore[arg-type]
    memoizer.checkpoint()
    assert dfk.cleanup_called


def test_memoizer_restarts_for_a_new_dfk(tmp_path: Path) -> None:
    """A Config (and its memoizer) reused by a second DataFlowKernel, as Parsl's tests do."""
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    config = _config(tmp_path, memoizer)
    with parsl.load(config):
        first = uuid_app(3).result()
    with parsl.load(config):
        assert uuid_app(3).result() == first  # loaded from the first run's checkpoint
    assert _calls["uuid_app"] == 1


# ---------------------------------------------------------------- moving from BasicMemoizer


def test_switching_from_basic_memoizer_keeps_old_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Old tasks.pkl checkpoints: skipped with a hint, then used after import-parsl."""
    from parsl.dataflow.memoization import BasicMemoizer

    with parsl.load(_config(tmp_path, BasicMemoizer(checkpoint_mode="task_exit"))):
        first = uuid_app(11).result()

    # not converted yet: the pickle is never loaded, and the log says what to do
    with (
        caplog.at_level(logging.WARNING, logger="parsl.aiomemo"),
        pytest.warns(RuntimeWarning, match=r"tasks\.pkl: Parsl pickle checkpoint skipped"),
        parsl.load(_config(tmp_path, ParslMemoizer(checkpoint_mode="task_exit"))),
    ):
        assert uuid_app(11).result() != first
    assert any("import-parsl" in r.getMessage() for r in caplog.records)

    out = subprocess.run(
        [sys.executable, "-m", "aiomemo", "import-parsl", "--trust", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    _calls.clear()
    converted = [
        d
        for d in sorted(tmp_path.iterdir())
        if (d / "checkpoint").is_dir()
        and not (d / "checkpoint" / "tasks.pkl").exists()
        and _records(d / "checkpoint") == 1
        and len(next(iter(_keys(d / "checkpoint")))) == 16
    ]
    assert converted, "import-parsl wrote a segment keyed by Parsl's hash"
    memoizer = ParslMemoizer(checkpoint_files=[str(converted[0] / "checkpoint")])
    with parsl.load(_config(tmp_path, memoizer)):
        assert uuid_app(11).result() == first  # found under its Parsl key
    assert "uuid_app" not in _calls


# ---------------------------------------------------------------- keys


class Registered:
    def __init__(self, v: int) -> None:
        self.v = v


class Failing:
    pass


class Unknown:
    pass


class RegistrationError(ValueError):
    pass


@parsl_id_for_memo.register(Registered)
def _id_registered(obj: Registered, output_ref: bool = False) -> bytes:
    return f"Registered:{obj.v}".encode()


@parsl_id_for_memo.register(Failing)
def _id_failing(obj: Failing, output_ref: bool = False) -> bytes:
    raise RegistrationError("deliberate")


def test_parsl_id_for_memo_registrations_key_inputs(tmp_path: Path) -> None:
    with parsl.load(_config(tmp_path, ParslMemoizer())):
        a = takes(Registered(1)).result()
        assert takes(Registered(1)).result() == a
        assert takes(Registered(2)).result() != a
        assert takes([Registered(1)]).result() != a  # nested: a different input
    assert _calls["takes"] == 3


def test_errors_of_a_registration_reach_the_task(tmp_path: Path) -> None:
    with parsl.load(_config(tmp_path, ParslMemoizer())):
        exc = takes(Failing()).exception(timeout=30)
        nested = takes({"k": [Failing()]}).exception(timeout=30)
    assert type(exc) is RegistrationError
    assert type(nested) is RegistrationError
    assert "takes" not in _calls


def test_unknown_types_fail_as_with_parsl(tmp_path: Path) -> None:
    with parsl.load(_config(tmp_path, ParslMemoizer())):
        exc = takes({"cfg": [1, Unknown()]}).exception(timeout=30)
    assert isinstance(exc, ParslUnhashableInputError)
    assert isinstance(exc, ValueError)  # what Parsl raises
    assert isinstance(exc, UnhashableInputError)
    assert "Unknown" in str(exc)
    assert "takes" not in _calls


def test_bash_apps_have_keys_of_their_own(tmp_path: Path) -> None:
    """Parsl submits every bash app as the same wrapper: aiomemo must still tell them apart."""
    out_a, out_b = tmp_path / "a.out", tmp_path / "b.out"
    with parsl.load(_config(tmp_path / "runinfo", ParslMemoizer())):
        echo_a(stdout=str(out_a)).result()
        echo_b(stdout=str(out_a)).result()  # same arguments, another app: runs
        echo_b(stdout=str(out_b)).result()  # another stdout: runs
    assert out_a.read_text() == "a\nb\n"
    assert out_b.read_text() == "b\n"


def test_bash_app_versions_past_the_cache_stay_their_own() -> None:
    """Each bash-app wrapper keeps its own version, cached or not (past the cache's size too)."""
    import functools

    from parsl.app.bash import remote_side_bash_executor

    from aiomemo import _parsl_keys

    def wrapper_of(i: int) -> Callable[..., Any]:
        def user() -> str:
            return "true"

        user.__qualname__ = f"user_{i}"

        def wrapper(*a: Any, **k: Any) -> Any:
            return None

        wrapper.__wrapped__ = functools.partial(remote_side_bash_executor, user)  # type: ignore[attr-defined]
        return wrapper

    wrappers = [wrapper_of(i) for i in range(5000)]
    for _ in range(2):  # a second time: from the cache where it was cached
        versions = [_parsl_keys.view_of({"func": w, "args": ()})["version"] for w in wrappers]  # type: ignore[arg-type, typeddict-item]
        assert len(set(versions)) == 5000
        assert versions[4999].endswith("user_4999")
    assert len(_parsl_keys._VERSIONS) <= 4096
    plain = _parsl_keys.view_of({"func": wrapper_of.__call__, "args": ()})  # type: ignore[arg-type, typeddict-item]
    assert "version" not in plain  # a callable that is no plain function: not cached, no version


# ---------------------------------------------------------------- configuration


def test_configuration_errors() -> None:
    with pytest.raises(ParslConfigurationError) as info:
        ParslMemoizer(checkpoint_mode="sometimes")  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigurationError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ParslConfigurationError):
        ParslMemoizer(checkpoint_mode="periodic")
    with pytest.raises(ParslConfigurationError):
        ParslMemoizer(checkpoint_mode="periodic", checkpoint_period="5 minutes")


def test_basic_memoizer_attributes_kept() -> None:
    m = ParslMemoizer(checkpoint_mode="periodic", checkpoint_period="00:00:05")
    assert (m.checkpoint_mode, m.checkpoint_period, m.memoize) == ("periodic", "00:00:05", True)
    assert m.checkpoint_files is None
    assert m.stats() is None
    assert repr(m).startswith("ParslMemoizer(checkpoint_mode='periodic'")
    with pytest.raises(ParslConfigurationError):
        ParslMemoizer(checkpoint_files="runinfo/000/checkpoint")  # type: ignore[arg-type]


def test_logger_is_under_parsl() -> None:
    from aiomemo import parsl as adapter

    assert adapter.logger.name.startswith("parsl.")
    assert adapter.logger.parent is not None
    assert logging.getLogger("parsl") in _ancestors(adapter.logger)


def _ancestors(log: logging.Logger) -> list[logging.Logger]:
    out: list[logging.Logger] = []
    cur: logging.Logger | None = log.parent
    while cur is not None:
        out.append(cur)
        cur = cur.parent
    return out


def test_import_without_parsl_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['parsl'] = None\n"  # import parsl -> ImportError
        "try:\n"
        "    import aiomemo.parsl\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "aiomemo[parsl]" in out, out


def test_check_memo_never_blocks_the_calling_threads_forever(tmp_path: Path) -> None:
    """Concurrent check_memo/update calls straight from many threads (no DFK)."""
    memoizer = ParslMemoizer(checkpoint_mode="task_exit")
    memoizer.start(run_dir=str(tmp_path / "000"), config_run_dir=str(tmp_path))
    try:

        def one(i: int) -> Any:
            task: dict[str, Any] = {
                "id": i,
                "func": double.func,
                "args": (i % 7,),
                "kwargs": {},
                "memoize": True,
                "ignore_for_cache": [],
                "hashsum": None,
            }
            fut = memoizer.check_memo(task)  # type: ignore[arg-type]
            if fut is None:
                memoizer.update_memo_result(task, (i % 7) * 2)  # type: ignore[arg-type]
                return (i % 7) * 2
            return fut.result(timeout=10)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(300)))
        assert results == [(i % 7) * 2 for i in range(300)]
    finally:
        memoizer.close()
    assert _records(tmp_path / "000" / "checkpoint") == 7


# ---------------------------------------------------------------- the calling thread's path


def _bare_task(i: int, x: int) -> dict[str, Any]:
    return {
        "id": i,
        "func": double.func,
        "args": (x,),
        "kwargs": {},
        "memoize": True,
        "ignore_for_cache": [],
        "hashsum": None,
    }


def _started(tmp_path: Path, mode: Any) -> ParslMemoizer:
    period = "00:05:00" if mode == "periodic" else None
    memoizer = ParslMemoizer(checkpoint_mode=mode, checkpoint_period=period)
    memoizer.start(run_dir=str(tmp_path / "000"), config_run_dir=str(tmp_path))
    return memoizer


def test_miss_follow_hit_and_completion_never_wait_for_the_loop(tmp_path: Path) -> None:
    """With the loop thread busy, the DataFlowKernel's calls still return at once."""
    memoizer = _started(tmp_path, "periodic")
    portal = memoizer._portal
    assert portal is not None
    busy, release = threading.Event(), threading.Event()

    async def hog() -> None:
        busy.set()
        release.wait(30)  # blocks the loop thread on purpose

    blocked = portal.submit(hog())
    try:
        assert busy.wait(10)
        leader, twin = _bare_task(1, 21), _bare_task(2, 21)
        t0 = time.monotonic()
        assert memoizer.check_memo(leader) is None  # type: ignore[arg-type]
        follower = memoizer.check_memo(twin)  # type: ignore[arg-type]
        assert follower is not None and not follower.done()
        assert twin["hashsum"] == leader["hashsum"] and isinstance(leader["hashsum"], str)
        memoizer.update_memo_result(leader, 42)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 10  # the loop is held for 30 s
        assert not follower.done()  # the loop records it, once it is free
    finally:
        release.set()
    blocked.result(10)
    assert follower.result(10) == 42
    hit = memoizer.check_memo(_bare_task(3, 21))  # type: ignore[arg-type]
    assert hit is not None and hit.result(0) == 42
    stats = memoizer.stats()
    assert stats is not None and (stats.misses, stats.collapsed, stats.hits) == (1, 1, 1)
    memoizer.close()


def test_task_exit_group_commits_across_completion_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent completions share fsyncs, and each returns with its record durable."""
    n = 32
    memoizer = _started(tmp_path, "task_exit")
    tasks = [_bare_task(i, i) for i in range(n)]
    for task in tasks:
        assert memoizer.check_memo(task) is None  # type: ignore[arg-type]
    fsyncs = [0]
    real_append = ck._append_synced
    slow = threading.Lock()

    def counting_append(fd: int, data: bytes) -> None:
        with slow:
            fsyncs[0] += 1
        time.sleep(0.01)  # a slow disk: completions pile up behind a commit
        real_append(fd, data)

    # the completing threads append and sync each group in one call
    monkeypatch.setattr(ck, "_append_synced", counting_append)
    gate = threading.Barrier(n)
    durable: list[int] = []

    def complete(task: dict[str, Any]) -> None:
        gate.wait(10)
        memoizer.update_memo_result(task, task["args"][0] * 2)  # type: ignore[arg-type]
        durable.append(_records(tmp_path / "000" / "checkpoint"))

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(complete, tasks))
    monkeypatch.undo()
    # each caller saw its own record (at least) on disk when it returned
    assert min(durable) >= 1 and max(durable) == n
    assert _records(tmp_path / "000" / "checkpoint") == n
    assert 1 <= fsyncs[0] <= n // 4, fsyncs[0]
    memoizer.close()


def test_ttl_is_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ttl unless configured (Parsl's behaviour); with ttl=, an app result expires."""
    from aiomemo import _expiry

    with pytest.raises(ParslConfigurationError, match="positive"):
        ParslMemoizer(ttl=0)
    assert ParslMemoizer().ttl is None and "ttl" not in repr(ParslMemoizer())
    now = [time.time()]
    monkeypatch.setattr(_expiry, "now", lambda: now[0])
    memo = ParslMemoizer(checkpoint_mode="task_exit", ttl=60)
    with parsl.load(_config(tmp_path, memo)):
        assert double(21).result() == 42
        assert double(21).result() == 42
        assert _calls["double"] == 1
        now[0] += 61
        assert double(21).result() == 42
        assert _calls["double"] == 2


def test_a_hits_done_future_behaves_as_a_set_one() -> None:
    """The Future a hit returns: done, its result, callbacks at once, wait() and as_completed()."""
    import concurrent.futures as cf

    from aiomemo._parsl_followers import done_future

    fut = done_future({"x": 1}, None)
    assert fut.done() and not fut.running() and not fut.cancelled()
    assert fut.result(0) == {"x": 1} and fut.exception(0) is None
    seen: list[Any] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    assert seen == [{"x": 1}]
    assert cf.wait([fut], timeout=1).done == {fut}
    assert next(cf.as_completed([fut], timeout=1)) is fut
    assert not fut.cancel()
    err = ValueError("boom")
    failed = done_future(None, err)
    assert failed.exception(0) is err
    with pytest.raises(ValueError):
        failed.result(0)
