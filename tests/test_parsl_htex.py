"""ParslMemoizer with Parsl's HighThroughputExecutor: real worker processes.

An ``htex_local``-style configuration (LocalProvider, one block, two worker
processes, the interchange and the workers on 127.0.0.1 only) runs a cached
workflow twice: python apps, an app depending on another's future, python
and bash apps producing ``File`` outputs, and an app returning nested
containers. The apps run in other processes, so they count their own runs by
appending to a log file; the first run executes every app once, the second
run (a new DataFlowKernel loading the first run's checkpoint) executes none
and gets the same results, with the output files still in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

parsl = pytest.importorskip("parsl")

from parsl.app.app import bash_app, python_app  # noqa: E402
from parsl.config import Config  # noqa: E402
from parsl.data_provider.files import File  # noqa: E402
from parsl.dataflow.memoization import id_for_memo as parsl_id_for_memo  # noqa: E402
from parsl.executors import HighThroughputExecutor  # noqa: E402
from parsl.launchers import SimpleLauncher  # noqa: E402
from parsl.providers import LocalProvider  # noqa: E402
from parsl.utils import get_last_checkpoint  # noqa: E402

from aiomemo._checkpoint import load_paths  # noqa: E402
from aiomemo.parsl import ParslMemoizer  # noqa: E402

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
N = 6  # apps of each kind per run


# Parsl has no memo rule for its File type (BasicMemoizer fails such a task with
# "unknown type for memoization"): a workflow with File arguments registers one
# with Parsl's id_for_memo, and ParslMemoizer keys File through that
# registration. Outputs are keyed by where they go (output_ref=True), as
# Parsl's docs suggest; this workflow keys inputs the same way.
@parsl_id_for_memo.register(File)
def _file_id(obj: File, output_ref: bool = False) -> bytes:
    return f"parsl-file:{obj.url}".encode()


# The apps run in the worker processes, which import this module by name:
# the provider's worker_init puts tests/ on their PYTHONPATH.
@python_app(cache=True)
def square(x: int, log: str) -> int:
    with open(log, "a") as f:
        f.write(f"square {x} {os.getpid()}\n")
    return x * x


@python_app(cache=True)
def plus_one(x: int, log: str) -> int:
    with open(log, "a") as f:
        f.write(f"plus_one {x}\n")
    return x + 1


@python_app(cache=True)
def nested(x: int, log: str) -> dict[str, Any]:
    with open(log, "a") as f:
        f.write(f"nested {x}\n")
    return {"x": x, "items": [x, float(x) / 2, str(x), None, b"\x00" * x], "t": (x, [x])}


@python_app(cache=True)
def write_file(x: int, log: str, outputs: list[File] = ()) -> str:  # type: ignore[assignment]
    with open(log, "a") as f:
        f.write(f"write_file {x}\n")
    with open(outputs[0].filepath, "w") as f:
        f.write(f"python {x}\n")
    return outputs[0].filepath


@bash_app(cache=True)
def bash_write(x: int, log: str, outputs: list[File] = ()) -> str:  # type: ignore[assignment]
    return f"echo bash_write {x} >> {log} && echo bash {x} > {outputs[0].filepath}"


def _config(root: Path, memoizer: ParslMemoizer) -> Config:
    return Config(
        executors=[
            HighThroughputExecutor(
                label="htex_memo",
                address="127.0.0.1",
                loopback_address="127.0.0.1",
                cores_per_worker=1,
                max_workers_per_node=2,
                worker_logdir_root=str(root / "workers"),
                provider=LocalProvider(
                    init_blocks=1,
                    min_blocks=0,
                    max_blocks=1,
                    launcher=SimpleLauncher(),
                    worker_init=f"export PYTHONPATH={TESTS_DIR}:${{PYTHONPATH:-}}",
                ),
            )
        ],
        strategy="none",
        run_dir=str(root / "runinfo"),
        memoizer=memoizer,
        initialize_logging=False,
    )


def _workflow(data: Path, log: str) -> dict[str, Any]:
    sq = [square(i, log) for i in range(N)]
    chained = [plus_one(f, log) for f in sq]  # keyed by the upstream result
    nest = [nested(i, log) for i in range(N)]
    py_files = [write_file(i, log, outputs=[File(str(data / f"py{i}.txt"))]) for i in range(N)]
    sh_files = [bash_write(i, log, outputs=[File(str(data / f"sh{i}.txt"))]) for i in range(N)]
    return {
        "square": [f.result(timeout=120) for f in sq],
        "plus_one": [f.result(timeout=120) for f in chained],
        "nested": [f.result(timeout=120) for f in nest],
        "write_file": [f.result(timeout=120) for f in py_files],
        "write_file_outputs": [f.outputs[0].result(timeout=120).filepath for f in py_files],
        "bash_write": [f.result(timeout=120) for f in sh_files],
        "bash_write_outputs": [f.outputs[0].result(timeout=120).filepath for f in sh_files],
    }


def _runs(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            name = line.split()[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_cached_workflow_twice_on_htex(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "calls.log"

    first_memo = ParslMemoizer(checkpoint_mode="task_exit")
    with parsl.load(_config(tmp_path, first_memo)) as dfk:
        first = _workflow(data, str(log))
        first_run_dir = dfk.run_dir
        first_stats = first_memo.stats()
    assert first_stats is not None

    expected = {
        "square": [i * i for i in range(N)],
        "plus_one": [i * i + 1 for i in range(N)],
        "nested": [
            {"x": i, "items": [i, float(i) / 2, str(i), None, b"\x00" * i], "t": (i, [i])}
            for i in range(N)
        ],
        "write_file": [str(data / f"py{i}.txt") for i in range(N)],
        "write_file_outputs": [str(data / f"py{i}.txt") for i in range(N)],
        "bash_write": [0] * N,
        "bash_write_outputs": [str(data / f"sh{i}.txt") for i in range(N)],
    }
    assert first == expected
    kinds = ("square", "plus_one", "nested", "write_file", "bash_write")
    assert _runs(log) == {k: N for k in kinds}, "every app ran exactly once, in a worker"
    pids = {line.split()[2] for line in log.read_text().splitlines() if line.startswith("square")}
    assert str(os.getpid()) not in pids, "the apps ran in worker processes"
    for i in range(N):
        assert (data / f"py{i}.txt").read_text() == f"python {i}\n"
        assert (data / f"sh{i}.txt").read_text() == f"bash {i}\n"
    # task_exit: every result is on disk before the workflow saw it
    report = load_paths([Path(first_run_dir) / "checkpoint"])
    assert not report.errors
    assert len(report.table) == len(kinds) * N

    # second run: a new DataFlowKernel, new worker processes, the first run's checkpoint
    checkpoints = get_last_checkpoint(str(tmp_path / "runinfo"))
    assert checkpoints == [os.path.join(first_run_dir, "checkpoint")]
    second_memo = ParslMemoizer(checkpoint_mode="task_exit", checkpoint_files=checkpoints)
    with parsl.load(_config(tmp_path, second_memo)):
        second = _workflow(data, str(log))
        stats = second_memo.stats()
    assert stats is not None
    assert second == expected
    # nested containers come back with their types (tuples stay tuples)
    assert isinstance(second["nested"][1]["t"], tuple)
    assert _runs(log) == {k: N for k in kinds}, "the second run executed no app"
    assert stats.hits >= len(kinds) * N
    for i in range(N):
        assert (data / f"sh{i}.txt").read_text() == f"bash {i}\n"
