"""pytest plugin: run Parsl's own tests with aiomemo's ParslMemoizer swapped in.

Loaded by ``scripts/parsl-suite`` with ``-p aiomemo_parsl_plugin`` (this
directory is put on ``PYTHONPATH``). Plugins given with ``-p`` are configured
before any test module is collected, so the swap below is in place when
Parsl's test modules run ``from parsl.dataflow.memoization import
BasicMemoizer`` and when a DataFlowKernel falls back to its default memoizer.

``AIOMEMO_PARSL_MEMOIZER``:

* ``aiomemo`` (default): ``BasicMemoizer`` is replaced by
  :class:`aiomemo.parsl.ParslMemoizer` in ``parsl.dataflow.memoization``
  (where the tests and the test configs import it from) and in
  ``parsl.dataflow.dflow`` (the DataFlowKernel's default, ``config.memoizer
  is None``); the tests listed in :data:`EXEMPT` are deselected; at the end
  the plugin checks that every DataFlowKernel of the session did run a
  ParslMemoizer, so a swap that silently did not happen fails the run.
* ``basic``: nothing is replaced and nothing is deselected: Parsl's own
  baseline.

``AIOMEMO_PARSL_OUTCOMES=PATH`` (both modes): write every test's outcome
(node id -> ``passed``, ``failed``, ``error``, ``skipped``, ``xfailed``,
``xpassed``, ``deselected``, or ``collect-error`` for a module that could not
be collected) to PATH as JSON, for ``tests/parsl_harness/compare.py``, which
checks the two memoizers' runs test for test.

Nothing inside site-packages is edited: only module attributes are rebound,
in this pytest process.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

MODE = os.environ.get("AIOMEMO_PARSL_MEMOIZER", "aiomemo")

#: Parsl tests that read Parsl's own checkpoint format (``tasks.pkl``, a
#: stream of pickles) and so cannot pass against aiomemo's format. Keys are
#: node ids relative to the parsl package directory (``--rootdir``), matched
#: as suffixes. tests/test_parsl_adapter.py tests the same behaviour against
#: aiomemo's own format.
EXEMPT: dict[str, str] = {
    "tests/test_checkpointing/test_task_exit.py::test_at_task_exit": (
        "counts the pickle records in <run_dir>/checkpoint/tasks.pkl; aiomemo writes "
        "checksummed segment files instead (one record per task is tested in "
        "tests/test_parsl_adapter.py::test_task_exit_one_record_per_task)"
    ),
    "tests/test_checkpointing/test_manual.py::test_manual_checkpoint": (
        "checks that <run_dir>/checkpoint/tasks.pkl does not exist before and exists "
        "after memoizer.checkpoint(); aiomemo's checkpoint is segment files "
        "(tests/test_parsl_adapter.py::test_manual_checkpoint_creates_records)"
    ),
}

#: Parsl tests that run against ParslMemoizer with one non-default argument,
#: because they depend on BasicMemoizer running identical in-flight tasks
#: more than once (ParslMemoizer collapses them by default). Parsl's
#: assertions are unchanged; the test module's ``BasicMemoizer`` name is bound
#: to ``ParslMemoizer`` with these keyword defaults for the test's duration.
ADAPTED: dict[str, tuple[dict[str, Any], str]] = {
    "tests/test_checkpointing/test_periodic.py::test_periodic": (
        {"collapse": False},
        "launches 4 identical slow_double(3) calls (1 s each, one worker thread) so "
        "that the run spans two 2 s checkpoint periods; with collapse they run once "
        "and the run ends after 1 s, before the first period; periodic passes with "
        "collapse on are tested in "
        "tests/test_parsl_adapter.py::test_periodic_logs_parsl_lines",
    ),
}

_dfk_memoizers: list[str] = []
_adapted_run: set[str] = set()
_outcomes: dict[str, str] = {}
OUTCOMES = os.environ.get("AIOMEMO_PARSL_OUTCOMES")


def _swap() -> None:
    """Rebind BasicMemoizer to ParslMemoizer wherever Parsl looks it up."""
    import parsl.dataflow.dflow as dflow
    import parsl.dataflow.memoization as memoization

    from aiomemo.parsl import ParslMemoizer

    original = memoization.BasicMemoizer
    if original is ParslMemoizer:
        return
    # every already-imported module holding the name (dflow for the DFK's
    # default, test configs if one was imported early)
    for name, module in list(sys.modules.items()):
        if (name == "parsl" or name.startswith("parsl.")) and getattr(
            module, "BasicMemoizer", None
        ) is original:
            module.BasicMemoizer = ParslMemoizer  # type: ignore[attr-defined]
    assert memoization.BasicMemoizer is ParslMemoizer
    assert dflow.BasicMemoizer is ParslMemoizer

    # record which memoizer every DataFlowKernel ends up with
    dfk_init = dflow.DataFlowKernel.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        dfk_init(self, *args, **kwargs)
        _dfk_memoizers.append(
            "ok" if isinstance(self.memoizer, ParslMemoizer) else type(self.memoizer).__qualname__
        )

    dflow.DataFlowKernel.__init__ = recording_init  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    if MODE not in ("aiomemo", "basic"):
        raise pytest.UsageError(
            f"AIOMEMO_PARSL_MEMOIZER must be 'aiomemo' or 'basic', not {MODE!r}"
        )
    if MODE == "aiomemo":
        _swap()


def pytest_report_header(config: pytest.Config) -> list[str]:
    if MODE == "basic":
        return ["aiomemo harness: Parsl's own BasicMemoizer (baseline), no exemptions"]
    return [
        "aiomemo harness: BasicMemoizer -> aiomemo.parsl.ParslMemoizer; "
        f"{len(EXEMPT)} exempt test(s) deselected (Parsl pickle format)"
    ]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if MODE != "aiomemo":
        return
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if any(item.nodeid.endswith(node) for node in EXEMPT):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(autouse=True)
def _aiomemo_adapted(request: pytest.FixtureRequest) -> Iterator[None]:
    """Apply :data:`ADAPTED` keyword defaults to the test's ``BasicMemoizer``."""
    adapted = None
    if MODE == "aiomemo":
        adapted = next(
            (kw for node, (kw, _) in ADAPTED.items() if request.node.nodeid.endswith(node)), None
        )
    if adapted is None:
        yield
        return
    from aiomemo.parsl import ParslMemoizer

    _adapted_run.add(request.node.nodeid)
    module = request.module
    saved = module.BasicMemoizer
    module.BasicMemoizer = functools.partial(ParslMemoizer, **adapted)
    try:
        yield
    finally:
        module.BasicMemoizer = saved


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if MODE != "aiomemo":
        return
    tr = terminalreporter
    tr.section("aiomemo harness")
    seen = {getattr(item, "nodeid", "") for item in tr.stats.get("deselected", [])}
    for node, reason in EXEMPT.items():
        if any(s.endswith(node) for s in seen):
            tr.write_line(f"exempt: {node}: {reason}")
    for node, (kw, reason) in ADAPTED.items():
        if any(s.endswith(node) for s in _adapted_run):
            tr.write_line(f"adapted: {node}: runs with ParslMemoizer({kw}): {reason}")
    bad = [m for m in _dfk_memoizers if m != "ok"]
    tr.write_line(
        f"DataFlowKernels started: {len(_dfk_memoizers)}, with ParslMemoizer: "
        f"{len(_dfk_memoizers) - len(bad)}"
    )
    if bad:
        tr.write_line(f"ERROR: DataFlowKernels ran other memoizers: {sorted(set(bad))}", red=True)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _outcomes[report.nodeid] = "collect-error"


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        _outcomes.setdefault(item.nodeid, "deselected")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Fold a test's setup/call/teardown reports into one outcome (worst wins)."""
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        outcome = "passed"
    rank = ("passed", "skipped", "xfailed", "xpassed", "failed", "error")
    prev = _outcomes.get(report.nodeid)
    if prev is None or prev == "deselected" or rank.index(outcome) > rank.index(prev):
        _outcomes[report.nodeid] = outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if MODE == "aiomemo" and any(m != "ok" for m in _dfk_memoizers):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if OUTCOMES:
        with open(OUTCOMES, "w") as f:
            json.dump(
                {
                    "memoizer": MODE,
                    "dfk_memoizers": _dfk_memoizers,
                    "outcomes": dict(sorted(_outcomes.items())),
                },
                f,
                indent=1,
            )
