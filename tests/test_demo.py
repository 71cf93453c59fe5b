"""The demo: a workflow run twice against one runinfo dir (``aiomemo demo``, ``scripts/demo``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiomemo import _cli
from aiomemo._checkpoint import load_paths
from aiomemo._demo import format_report, run_demo
from aiomemo._rundir import get_all_checkpoints

ROOT = Path(__file__).resolve().parents[1]


async def test_second_run_finishes_from_the_memo(tmp_path: Path) -> None:
    result = await run_demo(tmp_path, tasks=300)
    first, second = result["runs"]
    assert (first["run"], second["run"]) == ("000", "001")
    assert first["tasks"] == second["tasks"] >= 250
    # run 1: every distinct task ran once; duplicates collapsed or hit
    assert first["misses"] == first["executed"] > 0
    assert first["collapsed"] > 0 and first["hits"] > 0
    assert first["hits"] + first["misses"] + first["collapsed"] == first["tasks"]
    assert first["checkpointed"] == first["misses"]
    assert first["checkpointed_on_timer"] > 0  # the 0.2 s timer fired while it ran
    # run 2: nothing ran, everything came from run 1's checkpoint
    assert second["executed"] == 0 and second["misses"] == 0
    assert second["hits"] == second["tasks"]
    assert second["checkpointed"] == 0
    assert result["same_result"]
    assert second["seconds"] < first["seconds"]
    assert (
        "kwargs['weight'] differs from the nearest recorded call of aiomemo._demo.score"
        in (result["explain"])
    )
    rep = load_paths(get_all_checkpoints(tmp_path))
    assert rep.records == first["misses"] and not rep.errors
    text = format_report(result)
    assert text.splitlines()[0].split() == [
        "run",
        "tasks",
        "hits",
        "misses",
        "collapsed",
        "checkpointed",
        "seconds",
    ]


async def test_small_and_invalid(tmp_path: Path) -> None:
    result = await run_demo(tmp_path, tasks=20, cost=0.001)
    assert result["runs"][1]["executed"] == 0
    with pytest.raises(ValueError):
        await run_demo(tmp_path, tasks=3)


def test_cli_demo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "runs"
    assert _cli.main(["demo", "--tasks", "40", "--dir", str(d), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["directory"] == str(d)
    assert [x["run"] for x in r["runs"]] == ["000", "001"]
    assert _cli.main(["demo", "--tasks", "2"]) == 2
    assert "--tasks" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert _cli.main(["demo", "--dir", str(tmp_path / "file")]) == 2


def test_python_m_demo_in_a_fresh_temp_dir() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    p = subprocess.run(
        [sys.executable, "-m", "aiomemo", "demo", "--tasks", "60"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("runinfo directory: ")
    directory = Path(lines[0].split(": ", 1)[1])
    try:
        assert directory.is_dir() and (directory / "000" / "checkpoint").is_dir()
        assert lines[1].split()[0] == "run"
        assert "same result" in p.stdout
    finally:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
