"""tests/parsl_harness/compare.py: the per-test comparison scripts/parsl-suite relies on."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

HARNESS = Path(__file__).resolve().parent / "parsl_harness"
sys.path.insert(0, str(HARNESS))

import compare  # noqa: E402

EXEMPT_NODE = next(iter(compare.EXEMPT))
ENV_NODE = next(iter(compare.ENVIRONMENTAL))


def run(outcomes: dict[str, str], memoizer: str, dfks: list[str] | None = None) -> dict[str, Any]:
    return {
        "memoizer": memoizer,
        "dfk_memoizers": ["ok"] if dfks is None else dfks,
        "outcomes": outcomes,
    }


def test_agreeing_runs_pass() -> None:
    base = {"tests/a.py::t1": "passed", "tests/a.py::t2": "skipped", ENV_NODE: "failed"}
    ours = dict(base)
    base[EXEMPT_NODE] = "passed"
    ours[EXEMPT_NODE] = "deselected"
    assert compare.compare("p", run(base, "basic"), run(ours, "aiomemo")) == []


@pytest.mark.parametrize(
    ("basic", "ours"),
    [
        ("passed", "failed"),
        ("passed", "error"),
        ("passed", "skipped"),
        ("passed", "absent"),
        ("absent", "passed"),
        ("failed", "passed"),
        ("collect-error", "passed"),
    ],
)
def test_any_difference_is_reported(basic: str, ours: str) -> None:
    b = {"tests/a.py::ok": "passed"}
    a = dict(b)
    if basic != "absent":
        b["tests/a.py::t"] = basic
    if ours != "absent":
        a["tests/a.py::t"] = ours
    problems = compare.compare("p", run(b, "basic"), run(a, "aiomemo"))
    assert len(problems) == 1 and "tests/a.py::t" in problems[0]


def test_shared_failure_must_be_listed() -> None:
    b = {"tests/a.py::ok": "passed", "tests/a.py::broken": "failed"}
    problems = compare.compare("p", run(b, "basic"), run(dict(b), "aiomemo"))
    assert len(problems) == 1 and "ENVIRONMENTAL" in problems[0]


def test_a_shared_failure_that_passes_when_run_again_is_flaky(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unlisted failure under both runs again; passing then, it is named flaky, not a finding."""
    b = tmp_path / "b.json"
    a = tmp_path / "a.json"
    first = {"tests/a.py::ok": "passed", "tests/a.py::z": "failed", "tests/a.py::y": "failed"}
    b.write_text(json.dumps(run(first, "basic")))
    a.write_text(json.dumps(run(dict(first), "aiomemo")))
    diffs = tmp_path / "d.tsv"
    assert compare.main(["--differences", str(diffs), "p", str(b), str(a)]) == 1
    assert diffs.read_text().splitlines() == ["p\ttests/a.py::y", "p\ttests/a.py::z"]
    again = {"tests/a.py::z": "passed", "tests/a.py::y": "failed"}  # y fails again
    for path, memo in ((b, "basic"), (a, "aiomemo")):
        rerun = tmp_path / f"r-{memo}.json"
        rerun.write_text(json.dumps(run(dict(again), memo)))
        assert compare.main(["--merge", str(path), str(rerun)]) == 0
    capsys.readouterr()
    assert compare.main(["p", str(b), str(a)]) == 1  # y is still a finding
    out = capsys.readouterr().out
    flaky = [line for line in out.splitlines() if "FLAKY" in line]
    assert len(flaky) == 1 and "tests/a.py::z" in flaky[0]
    assert "DIFFERENCE p: tests/a.py::y: failed under both" in out


def test_exempt_test_may_not_silently_run_differently() -> None:
    # an exempt test that does run under ParslMemoizer is compared like any other
    b = {"tests/a.py::ok": "passed", EXEMPT_NODE: "passed"}
    a = {"tests/a.py::ok": "passed", EXEMPT_NODE: "failed"}
    assert len(compare.compare("p", run(b, "basic"), run(a, "aiomemo"))) == 1


def test_wrong_memoizer_or_empty_run_is_reported() -> None:
    b = {"tests/a.py::ok": "passed"}
    assert compare.compare("p", run(b, "basic"), run(b, "aiomemo", ["BasicMemoizer"]))
    assert compare.compare("p", run(b, "basic"), run(b, "aiomemo", []))
    assert compare.compare("p", run(b, "basic"), run(b, "basic"))
    skipped = {"tests/a.py::s": "skipped"}
    assert compare.compare("p", run(skipped, "basic"), run(skipped, "aiomemo"))


def test_main_reads_files_and_sets_exit_status(tmp_path: Path) -> None:
    b = tmp_path / "b.json"
    a = tmp_path / "a.json"
    b.write_text(json.dumps(run({"tests/a.py::t": "passed"}, "basic")))
    a.write_text(json.dumps(run({"tests/a.py::t": "passed"}, "aiomemo")))
    assert compare.main(["p", str(b), str(a)]) == 0
    a.write_text(json.dumps(run({"tests/a.py::t": "failed"}, "aiomemo")))
    assert compare.main(["p", str(b), str(a)]) == 1
    assert compare.main(["p", str(b), str(tmp_path / "missing.json")]) == 1
    assert compare.main(["p", str(b)]) == 2


def test_rerun_merge_keeps_first_outcomes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A difference that goes away on the rerun passes, named as flaky; one that stays fails."""
    b = tmp_path / "b.json"
    a = tmp_path / "a.json"
    b.write_text(json.dumps(run({"tests/a.py::t": "passed", "tests/a.py::u": "passed"}, "basic")))
    a.write_text(json.dumps(run({"tests/a.py::t": "failed", "tests/a.py::u": "failed"}, "aiomemo")))
    diffs = tmp_path / "d.tsv"
    assert compare.main(["--differences", str(diffs), "p", str(b), str(a)]) == 1
    assert diffs.read_text().splitlines() == ["p\ttests/a.py::t", "p\ttests/a.py::u"]
    rb = tmp_path / "rb.json"
    ra = tmp_path / "ra.json"
    rb.write_text(json.dumps(run({"tests/a.py::t": "passed", "tests/a.py::u": "passed"}, "basic")))
    ra.write_text(json.dumps(run({"tests/a.py::t": "passed", "tests/a.py::u": "failed"}, "aiomemo")))
    assert compare.main(["--merge", str(b), str(rb)]) == 0
    assert compare.main(["--merge", str(a), str(ra)]) == 0
    assert json.loads(a.read_text())["first_outcomes"] == {
        "tests/a.py::t": "failed",
        "tests/a.py::u": "failed",
    }
    capsys.readouterr()
    assert compare.main(["p", str(b), str(a)]) == 1  # u still differs
    out = capsys.readouterr().out
    assert "FLAKY" in out and "tests/a.py::t" in out.split("FLAKY")[1].splitlines()[0]
    assert "DIFFERENCE p: tests/a.py::u" in out
