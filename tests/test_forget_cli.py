"""``aiomemo forget``: offline, crash-safe, one-line errors with exit 2 and nothing removed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiomemo import _cli, _maintenance
from aiomemo._checkpoint import SegmentWriter, encode_batch, file_header, load_paths
from aiomemo._explain import _candidate_keys
from aiomemo._hashing import arg_digests
from aiomemo._records import Record

T = 1_700_000_000.0


def call_key(func: str, *args: object) -> bytes:
    return next(iter(_candidate_keys({"func": func, "args": list(args), "kwargs": {}})))


def record(func: str, x: int, t: float) -> Record:
    task = {"func": func, "args": [x], "kwargs": {}}
    return Record(call_key(func, x), b"\xcd" + x.to_bytes(2, "big"), func, t, arg_digests(task))


def make_dir(root: Path) -> Path:
    """A run dir with two segments: mymod.simulate(0..9) at T and T+100, mymod.other(0..2)."""
    ck = root / "000" / "checkpoint"
    ck.mkdir(parents=True)
    a = [record("mymod.simulate", i, T) for i in range(5)] + [record("mymod.other", i, T) for i in range(3)]
    b = [record("mymod.simulate", i, T + 100) for i in range(5, 10)]
    (ck / "seg-1.amlog").write_bytes(file_header() + encode_batch(a))
    (ck / "seg-2.amlog").write_bytes(file_header() + encode_batch(b))
    return root


def table(root: Path) -> dict[bytes, bytes]:
    r = load_paths([root / "000"])
    assert r.errors == []
    return {k: v for k, v in r.table.items() if isinstance(v, bytes)}


def test_forget_function(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dir(tmp_path / "runinfo")
    assert _cli.main(["forget", str(root), "--func", "mymod.simulate"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("removed 10 record(s) of mymod.simulate written up to ")
    assert out[1].startswith("tombstone: ") and len(out) == 2
    assert set(table(root)) == {call_key("mymod.other", i) for i in range(3)}
    # verify: a tombstone is a sound record, not a value that fails to decode
    assert _cli.main(["verify", str(root)]) == 0
    capsys.readouterr()
    assert _cli.main(["inspect", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tombstones"] == 1 and "" not in info["functions"]
    assert info["functions"]["mymod.simulate"]["records"] == 10
    # again: nothing left to remove, nothing written
    assert _cli.main(["forget", str(root), "--func", "mymod.simulate", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["removed"] == 0 and summary["segments_written"] == []


def test_forget_calls_and_before(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dir(tmp_path / "runinfo")
    run = str(root / "000")
    assert _cli.main(["forget", run, "--func", "mymod.simulate", "--args", "[3]"]) == 0
    assert "removed 1 record(s)" in capsys.readouterr().out
    assert call_key("mymod.simulate", 3) not in table(root) and len(table(root)) == 12
    cut = "2023-11-14T22:14:10Z"  # T + 50: between the two segments' records
    assert _cli.main(["forget", run, "--func", "mymod.simulate", "--before", cut]) == 0
    assert "removed 4 record(s)" in capsys.readouterr().out
    left = table(root)
    assert {call_key("mymod.simulate", i) for i in range(5, 10)} <= set(left) and len(left) == 8


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dir(tmp_path / "runinfo")
    before = sorted(p.name for p in (root / "000" / "checkpoint").iterdir())
    assert _cli.main(["forget", str(root), "--func", "mymod.other", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would remove 3 record(s) of mymod.other")
    assert sorted(p.name for p in (root / "000" / "checkpoint").iterdir()) == before
    assert len(table(root)) == 13


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--func", "mymod.sim"], "no records of mymod.sim; did you mean mymod.simulate?"),
        (["--func", "zz.top"], "no records of zz.top (in "),
        (["--func", "mymod.simulate", "--before", "soon"], "--before: not a date: 'soon'"),
        (["--func", "mymod.simulate", "--args", "[1"], "--args: not valid JSON"),
        (["--func", "mymod.simulate", "--kwargs", "[1]"], "--kwargs: must be a JSON object"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    root = make_dir(tmp_path / "runinfo")
    names = sorted(p.name for p in (root / "000" / "checkpoint").iterdir())
    assert _cli.main(["forget", str(root), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aiomemo: error: ") and message in err[0]
    assert sorted(p.name for p in (root / "000" / "checkpoint").iterdir()) == names
    assert len(table(root)) == 13


def test_missing_path_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["forget", str(tmp_path / "nope"), "--func", "a.b"]) == 2
    assert "nope" in capsys.readouterr().err
    assert _cli.main(["forget", str(tmp_path)]) == 2  # --func is required
    assert "--func" in capsys.readouterr().err


async def test_refuses_while_a_writer_holds_a_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_dir(tmp_path / "runinfo")
    w = await SegmentWriter.create(root / "000" / "checkpoint", lazy=False)
    try:
        assert _cli.main(["forget", str(root), "--func", "mymod.simulate"]) == 2
        assert "a writer holds this segment open" in capsys.readouterr().err
        assert len(table(root)) == 13
    finally:
        await w.close()


def test_library_summary(tmp_path: Path) -> None:
    root = make_dir(tmp_path / "runinfo")
    s = _maintenance.forget(root, func="mymod.simulate", keys={call_key("mymod.simulate", 7)})
    assert s["removed"] == 1 and s["checkpoint_dirs"] == 1 and not s["dry_run"]
    assert _maintenance.forget(root, func="mymod.simulate", before=T - 1)["removed"] == 0


def test_kill_9_at_random_points_leaves_a_correct_checkpoint(tmp_path: Path) -> None:
    """aiomemo forget killed at random moments: a load gives the table of some prefix of the forgets.

    The process forgets ten calls one by one (ten tombstone segments) and
    says when each is done; each case lets it finish a random number of them
    and kills it a random few milliseconds later, inside or between writes.
    """
    root = make_dir(tmp_path / "base")
    before = table(root)
    order = [call_key("mymod.simulate", i) for i in range(10)]
    states = [{k: v for k, v in before.items() if k not in order[:j]} for j in range(11)]
    script = (
        "import sys; from aiomemo import _cli\n"
        "for i in range(10):\n"
        "    _cli.main(['forget', sys.argv[1], '--func', 'mymod.simulate', '--args', f'[{i}]'])\n"
        "    print('done', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rng = random.Random(16)
    reached = []
    for n in range(12):
        d = tmp_path / f"case{n}"
        shutil.copytree(root, d)
        p = subprocess.Popen(
            [sys.executable, "-c", script, str(d)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert p.stdout is not None
        wait_for = rng.randrange(10)
        lines = 0
        while lines < wait_for:
            lines += "removed" in p.stdout.readline()
        time.sleep(rng.uniform(0, 0.004))
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        got = table(d)  # loads without an error: no torn segment under a real name
        assert got in states, n
        j = states.index(got)
        assert j >= wait_for, (wait_for, j)  # every forget it reported done is there
        reached.append(j)
        # a fresh load of the run dir agrees (temp files are never read)
        assert {k for k in load_paths([d / "000"]).table} == set(got)
    assert len(set(reached)) >= 3, reached  # the kills landed at different points
