"""Run directories: Parsl's numbering and checkpoint discovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiomemo._rundir import (
    ensure_dir,
    get_all_checkpoints,
    get_last_checkpoint,
    make_run_dir,
    next_run_dir,
)


def make_runs(root: Path, names: list[str], *, with_checkpoint: bool = True) -> None:
    """Create run dirs ``names`` under ``root`` (with a checkpoint/ subdir when asked)."""
    for n in names:
        (root / n / "checkpoint" if with_checkpoint else root / n).mkdir(parents=True)


def test_missing_root_gives_nothing(tmp_path: Path) -> None:
    """A runinfo root that does not exist has no checkpoints and next run 000, and nothing is created."""
    root = tmp_path / "runinfo"
    assert get_all_checkpoints(str(root)) == []
    assert get_last_checkpoint(str(root)) == []
    assert next_run_dir(root) == (root / "000").absolute()
    assert not root.exists()


def test_all_checkpoints_in_run_order(tmp_path: Path) -> None:
    """Every run with a checkpoint dir, numbered runs by number (999 before 1000), as absolute paths."""
    make_runs(tmp_path, ["000", "002", "999", "1000", "zzz"])
    make_runs(tmp_path, ["001"], with_checkpoint=False)
    (tmp_path / "monitoring.db").write_text("")
    got = get_all_checkpoints(str(tmp_path))
    names = [Path(p).parent.name for p in got]
    assert names == ["000", "002", "999", "1000", "zzz"]
    assert all(os.path.isabs(p) and p.endswith("checkpoint") for p in got)


def test_last_checkpoint_by_number(tmp_path: Path) -> None:
    """The last numbered run that has a checkpoint dir wins; 1000 is after 999; other names never count."""
    make_runs(tmp_path, ["998", "999", "1000", "zzzz"])
    make_runs(tmp_path, ["1001"], with_checkpoint=False)
    assert get_last_checkpoint(str(tmp_path)) == [
        str((tmp_path / "1000" / "checkpoint").absolute())
    ]
    assert get_last_checkpoint(tmp_path) == get_last_checkpoint(str(tmp_path))


def test_unicode_digit_names_are_ignored(tmp_path: Path) -> None:
    """Names such as '²' (str.isdigit but not a run number) do not crash anything."""
    make_runs(tmp_path, ["²", "٣", "004"])
    assert get_last_checkpoint(str(tmp_path)) == [str((tmp_path / "004" / "checkpoint").absolute())]
    assert next_run_dir(tmp_path).name == "005"
    assert len(get_all_checkpoints(str(tmp_path))) == 3


def test_next_run_dir_numbering(tmp_path: Path) -> None:
    """Next is one past the highest number, 3-digit padded, and 1000 after 999; nothing is created."""
    assert next_run_dir(tmp_path).name == "000"
    make_runs(tmp_path, ["000", "007"], with_checkpoint=False)
    before = sorted(os.listdir(tmp_path))
    assert next_run_dir(tmp_path) == (tmp_path / "008").absolute()
    assert sorted(os.listdir(tmp_path)) == before
    make_runs(tmp_path, ["999"], with_checkpoint=False)
    assert next_run_dir(tmp_path).name == "1000"
    make_runs(tmp_path, ["1000"], with_checkpoint=False)
    assert next_run_dir(tmp_path).name == "1001"


def test_matches_parsl(tmp_path: Path) -> None:
    """Where Parsl is well defined, the answers are Parsl's own."""
    utils = pytest.importorskip("parsl.utils")
    rundirs = pytest.importorskip("parsl.dataflow.rundirs")
    root = tmp_path / "runinfo"
    make_runs(root, ["000", "001", "003", "010"])
    make_runs(root, ["011"], with_checkpoint=False)
    assert get_all_checkpoints(str(root)) == list(utils.get_all_checkpoints(str(root)))
    assert get_last_checkpoint(str(root)) == list(utils.get_last_checkpoint(str(root)))
    predicted = next_run_dir(root)
    assert Path(rundirs.make_rundir(str(root))) == predicted
    make_runs(root, ["999", "1000"])
    assert get_last_checkpoint(str(root)) == list(utils.get_last_checkpoint(str(root)))
    predicted = next_run_dir(root)
    assert predicted.name == "1001"
    assert Path(rundirs.make_rundir(str(root))) == predicted


def test_make_run_dir_claims_a_fresh_dir(tmp_path: Path) -> None:
    """make_run_dir creates the root and a new numbered dir, never reusing one."""
    root = tmp_path / "a" / "runinfo"
    first = make_run_dir(root)
    second = make_run_dir(root)
    assert (first.name, second.name) == ("000", "001")
    assert first.is_dir() and second.is_dir()


def test_ensure_dir_reports_what_it_created(tmp_path: Path) -> None:
    """ensure_dir returns the directories it made, outermost first, and nothing when they exist."""
    target = tmp_path / "x" / "y" / "z"
    assert ensure_dir(target) == [tmp_path / "x", tmp_path / "x" / "y", target]
    assert ensure_dir(target) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(FileExistsError):
        ensure_dir(tmp_path / "f" / "sub")
