"""``aiomemo gc``: expired, forgotten, superseded, too old, over budget; crash safety; bad input."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomemo import MaintenanceError, Memoizer
from aiomemo._checkpoint import load_paths
from aiomemo._cli import main
from aiomemo._gc import AGE_UNITS, SIZE_UNITS, gc, parse_age, parse_size
from aiomemo._records import NEVER, Record, func_tombstone, key_tombstone
from aiomemo._rundir import get_all_checkpoints
from helpers import mk, run, write_segment_file

T0 = 1_800_000_000.0  # record times of the synthetic stores
NOW = T0 + 1000.0


def rec(
    i: int, t: float, value: bytes | None = None, *, func: str = "m.f", expires: float = NEVER
) -> Record:
    key = i.to_bytes(4, "big") * 8
    return Record(key, value if value is not None else b"v%d@%d" % (i, t), func, t, b"", expires)


def seg_name(n: int) -> str:
    return f"seg-20260101T0000{n:02d}.000000Z-1-{n:08x}.amlog"


def store(root: Path, runs: list[list[Record]]) -> Path:
    """A runinfo root with one run dir (one segment) per list of records."""
    for r, records in enumerate(runs):
        write_segment_file(root / f"{r:03d}" / "checkpoint", records, seg_name(r))
    return root


def table(root: Path, now: float = NOW) -> dict[bytes, Any]:
    """What loads, large values read back."""
    from aiomemo._checkpoint import read_value

    rep = load_paths(get_all_checkpoints(os.fspath(root)), now=now)
    assert not rep.errors, rep.errors
    return {k: v if isinstance(v, bytes) else read_value(v) for k, v in rep.table.items()}


def size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.amlog"))


def files(root: Path) -> dict[str, bytes]:
    return {
        os.fspath(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "n"),
    [("0", 0), ("1000", 1000), ("500MB", 500 * 10**6), ("10GiB", 10 * 2**30), ("1.5kB", 1500),
     ("2 KiB", 2048), ("7b", 7), ("3tb", 3 * 10**12), (4096, 4096)],
)  # fmt: skip
def test_sizes(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(
    "text", ["", "MB", "10XB", "-5", "5k", "1e9", "10 G", "1.2.3MB", True, 2.5, -1]
)
def test_bad_sizes(text: Any) -> None:
    with pytest.raises(MaintenanceError, match="max-bytes") as e:
        parse_size(text)
    assert e.value.code == 2 and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "s"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 14 * 86400),
     ("1d12h", 129600), ("3600", 3600), ("0.5h", 1800), (60, 60)],
)  # fmt: skip
def test_ages(text: str | int, s: float) -> None:
    assert parse_age(text) == s


@pytest.mark.parametrize(
    "text", ["", "d", "3x", "-1d", "0", "0d", "1d-2h", "inf", "nan", "12 hours", True]
)
def test_bad_ages(text: Any) -> None:
    with pytest.raises(MaintenanceError, match="max-age") as e:
        parse_age(text)
    assert e.value.code == 2 and "\n" not in str(e.value)


@given(st.integers(0, 10**6), st.sampled_from(sorted(SIZE_UNITS)), st.booleans())
def test_size_units(n: int, unit: str, upper: bool) -> None:
    """Every unit, either case: n units is n times the unit's bytes."""
    assert parse_size(f"{n}{unit.upper() if upper else unit}") == n * SIZE_UNITS[unit]


@given(
    st.lists(
        st.tuples(st.integers(1, 1000), st.sampled_from(sorted(AGE_UNITS))), min_size=1, max_size=3
    )
)
def test_age_parts(parts: list[tuple[int, str]]) -> None:
    assert parse_age("".join(f"{n}{u}" for n, u in parts)) == sum(
        n * AGE_UNITS[u] for n, u in parts
    )


@given(st.text(max_size=12))
def test_garbage_is_a_clear_error(text: str) -> None:
    """Any string gives a size/age or a MaintenanceError, never another exception."""
    for parse in (parse_size, parse_age):
        try:
            parse(text)
        except MaintenanceError as exc:
            assert exc.code == 2


# --------------------------------------------------------------------------- what goes


def test_expired_forgotten_superseded_go_the_table_stays(tmp_path: Path) -> None:
    """Without budgets gc removes only what loading would not return: same table after."""
    root = store(
        tmp_path / "ri",
        [
            [rec(1, T0), rec(2, T0), rec(3, T0, func="m.g"), rec(4, T0, expires=NOW - 1), rec(7, T0)],
            [rec(1, T0 + 5, b"new"), rec(5, T0 + 5, expires=NOW + 50), rec(7, T0 + 3, expires=NOW - 1),
             key_tombstone(rec(2, 0).key, "m.f", T0 + 1)],
            [func_tombstone("m.g", T0 + 2), rec(6, T0 + 9), rec(4, T0 - 5)],
        ],
    )  # fmt: skip
    before = table(root)
    # load order decides: rec(4, T0 - 5) comes last and stands; rec(7)'s last record expired
    assert set(before) == {rec(i, 0).key for i in (1, 4, 5, 6)}
    s = gc(root, now=NOW)
    assert table(root) == before
    assert s["removed"] == {
        "superseded": 3, "forgotten": 2, "expired": 1, "too_old": 0, "over_budget": 0
    }  # fmt: skip
    assert s["records_out"] == 4 + 2 and s["tombstones_kept"] == 2
    assert table(root, now=NOW + 100) == {k: v for k, v in before.items() if k != rec(5, 0).key}
    assert gc(root, now=NOW)["records_removed"] == 0  # idempotent


def test_a_forgotten_newest_record_lets_an_older_one_stand(tmp_path: Path) -> None:
    """A key tombstone at t forgets records up to t; a later record of the key stays."""
    k = rec(1, 0).key
    root = store(
        tmp_path / "ri",
        [[rec(1, T0 + 10, b"late")], [rec(1, T0, b"early"), key_tombstone(k, "m.f", T0 + 5)]],
    )
    before = table(root)
    assert before == {k: b"late"}
    gc(root, now=NOW)
    assert table(root) == before


def test_max_age(tmp_path: Path) -> None:
    root = store(tmp_path / "ri", [[rec(i, T0 + i * 100) for i in range(10)]])
    s = gc(root, max_age="5m", now=T0 + 1000)  # written before T0 + 700 go
    assert s["removed"]["too_old"] == 7
    assert sorted(table(root)) == sorted(rec(i, 0).key for i in (7, 8, 9))


def test_max_bytes_removes_least_recently_written_first(tmp_path: Path) -> None:
    """The budget holds afterwards, and every record that went is older than every one kept."""
    rng = random.Random(5)
    times = [T0 + rng.random() * 100 for _ in range(300)]
    runs = [
        [rec(i, times[i], os.urandom(rng.choice([10, 100, 20_000]))) for i in range(r, 300, 3)]
        for r in range(3)
    ]
    root = store(tmp_path / "ri", runs)
    before = table(root)
    budget = size(root) // 3
    s = gc(root, max_bytes=budget, now=NOW)
    assert size(root) <= budget and s["budget_met"] and s["bytes_out"] == size(root)
    after = table(root)
    assert after and all(before[k] == v for k, v in after.items())
    kept = [times[i] for i in range(300) if rec(i, 0).key in after]
    gone = [times[i] for i in range(300) if rec(i, 0).key not in after]
    assert max(gone) <= min(kept)
    assert s["removed"]["over_budget"] == len(gone)
    assert size(root) > budget - 25_000  # not far below: about one record of slack


def test_dry_run_removes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = store(
        tmp_path / "ri", [[rec(i, T0 + i) for i in range(50)], [rec(i, T0 + 60) for i in range(10)]]
    )
    snap = files(root)
    assert main(["gc", os.fspath(root), "--max-bytes", "2KB", "--max-age", "30d", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would remove ") and "would keep" in out
    assert files(root) == snap
    assert main(["gc", os.fspath(root), "--max-bytes", "2KB"]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("removed ")
        and "least recently written" in out
        and "of a 2.0 KB budget" in out
    )
    assert size(root) <= 2000


@pytest.mark.parametrize(
    ("argv", "msg"),
    [(["--max-bytes", "10XB"], "max-bytes"), (["--max-bytes", "-1"], "max-bytes"),
     (["--max-age", "30 days"], "max-age"), (["--max-age", "0"], "max-age"),
     (["--max-age", "1y"], "max-age")],
)  # fmt: skip
def test_bad_input_exits_2_and_removes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], msg: str
) -> None:
    root = store(tmp_path / "ri", [[rec(1, T0, expires=NOW - 10)], [rec(1, T0 + 1)]])
    snap = files(root)
    assert main(["gc", os.fspath(root), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err and err.startswith("aiomemo: error: ")
    assert files(root) == snap


def test_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = store(tmp_path / "ri", [[rec(1, T0)]])
    seg = next(root.rglob("*.amlog"))
    assert main(["gc", os.fspath(seg)]) == 2
    assert "is a segment file" in capsys.readouterr().err
    assert main(["gc", os.fspath(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


async def test_refuses_while_a_writer_holds_a_segment(tmp_path: Path) -> None:
    """A running Memoizer's segment: gc refuses and changes nothing."""
    import asyncio

    root = store(tmp_path / "ri", [[rec(1, time.time() - 100, expires=time.time() - 10)]])
    async with Memoizer(checkpoint_mode="task_exit", config_run_dir=root) as memo:
        await run(memo, mk(1), 1)
        snap = files(root)
        with pytest.raises(MaintenanceError, match="a writer holds this segment") as e:
            await asyncio.to_thread(gc, root)
        assert e.value.code == 2 and files(root) == snap
        s = await asyncio.to_thread(gc, root, dry_run=True)  # a dry run only reads
        assert len(s["segments_held"]) == 1 and s["removed"]["expired"] == 1
    assert gc(root)["removed"]["expired"] == 1


def test_damaged_segment_refuses_with_code_1(tmp_path: Path) -> None:
    root = store(tmp_path / "ri", [[rec(i, T0) for i in range(20)]])
    seg = next(root.rglob("*.amlog"))
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    snap = files(root)
    with pytest.raises(MaintenanceError, match="damaged") as e:
        gc(root, max_bytes=100)
    assert e.value.code == 1 and files(root) == snap


# --------------------------------------------------------------------------- against a model

_record = st.tuples(
    st.integers(0, 7),  # key
    st.integers(0, 100),  # time offset
    st.sampled_from([NEVER, NOW - 1, NOW + 100]),  # expiry
    st.sampled_from(["m.f", "m.g"]),
    st.integers(0, 3),  # what: 0-2 a result, 3 a tombstone
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    runs=st.lists(st.lists(_record, min_size=1, max_size=8), min_size=1, max_size=3),
    budget=st.one_of(st.none(), st.integers(0, 3000)),
    age=st.one_of(st.none(), st.integers(901, 1100)),
)
def test_against_the_loader(
    tmp_path_factory: pytest.TempPathFactory,
    runs: list[list[tuple[int, int, float, str, int]]],
    budget: int | None,
    age: int | None,
) -> None:
    """Random records, tombstones and expiries: gc keeps exactly a consistent part of what loads.

    What loads after is what loaded before, less some keys; the keys gone by
    age are older than max_age, and those gone by the budget are older than
    every key kept (ties allowed); the budget holds.
    """
    root = tmp_path_factory.mktemp("ri")
    built = []
    for r in runs:
        out = []
        for k, dt, exp, func, what in r:
            if what == 3:
                out.append(
                    key_tombstone(rec(k, 0).key, func, T0 + dt)
                    if k % 2
                    else func_tombstone(func, T0 + dt)
                )
            else:
                # a key belongs to one function (keys hash the function's name)
                f = "m.g" if k >= 4 else "m.f"
                out.append(rec(k, T0 + dt, b"%d-%d-%d" % (k, dt, what), func=f, expires=exp))
        built.append(out)
    store(root, built)
    before = table(root)
    times = {}
    for r in built:
        for x in r:
            if x.tombstone is None:
                times[x.key] = x.time  # the last one in load order
    s = gc(root, max_bytes=budget, max_age=age, now=NOW)
    after = table(root)
    assert all(k in before and before[k] == v for k, v in after.items())
    gone = set(before) - set(after)
    if budget is None and age is None:
        assert not gone
    if budget is not None:
        # tombstones are never removed for the budget: only they may stay over it
        assert (size(root) <= budget) == s["budget_met"]
        assert s["budget_met"] or not after
    if age is not None:
        assert all(times[k] >= NOW - age for k in after)
    by_budget = {k for k in gone if age is None or times[k] >= NOW - age}
    if by_budget and after:
        assert max(times[k] for k in by_budget) <= min(times[k] for k in after)
    # a second run with the same budgets has nothing left to take
    assert (
        gc(root, max_bytes=budget, max_age=age, now=NOW)["records_removed"] == 0
        or budget is not None
    )
    shutil.rmtree(root)


# --------------------------------------------------------------------------- kill -9


def _big_store(root: Path) -> dict[bytes, Any]:
    """Five runs: overwritten keys, expired newest records over live older ones, a forgotten
    function, large values in value frames. Returns what loads."""
    now = time.time()
    rng = random.Random(11)
    runs: list[list[Record]] = []
    for r in range(5):
        out = []
        for i in range(r * 600, r * 600 + 1500):
            val = os.urandom(20_000) if i % 97 == 0 else b"r%d-%d" % (r, i) * rng.randint(1, 20)
            func = "m.forgot" if i % 11 == 0 else "m.f"  # a key names one function
            exp = now - 60 if r == 4 and i % 5 == 0 else NEVER
            out.append(
                Record(i.to_bytes(4, "big") * 8, val, func, now - 3600 * (5 - r) + i, b"", exp)
            )
        if r == 3:
            out.append(func_tombstone("m.forgot", now - 100))
        runs.append(out)
    store(root, runs)
    rep = load_paths(get_all_checkpoints(os.fspath(root)))
    assert not rep.errors
    return dict(rep.table)


def _loads_correctly(root: Path, expected: dict[bytes, Any]) -> dict[bytes, Any]:
    from aiomemo._checkpoint import read_value

    rep = load_paths(get_all_checkpoints(os.fspath(root)))
    assert not rep.errors, rep.errors
    for k, v in rep.table.items():
        assert k in expected, "a record came back that was expired, forgotten or never live"
        got = v if isinstance(v, bytes) else read_value(v)
        assert got == expected[k], "an older value of a key came back"
    return dict(rep.table)


@pytest.mark.slow
def test_kill_9_during_gc(tmp_path: Path) -> None:
    """gc killed at random points: what loads is always correct; a completed run meets the budget."""
    template = tmp_path / "template"
    _big_store(template)
    budget = size(template) // 2
    cmd = [sys.executable, "-m", "aiomemo", "gc", "", "--max-bytes", str(budget), "--max-age", "4h"]
    rng = random.Random(3)
    # the time a whole run takes, to spread the kills over it
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    t = time.monotonic()
    cmd[4] = os.fspath(probe)
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    took = time.monotonic() - t
    states = set()
    for n in range(8):
        root = tmp_path / f"k{n}"
        shutil.copytree(template, root)
        expected = {
            k: (v if isinstance(v, bytes) else _read(v))
            for k, v in load_paths(get_all_checkpoints(os.fspath(root))).table.items()
        }
        cmd[4] = os.fspath(root)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.25, 1.0) * took)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        temps = list(root.rglob(".compact-*"))
        states.add((proc.returncode, len(temps) > 0, size(root) < size(template)))
        _loads_correctly(root, expected)
        # a completed run afterwards: correct, and the budget holds
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        after = _loads_correctly(root, expected)
        assert size(root) <= budget and after
        assert not list(root.rglob(".compact-*"))  # the dead run's temp file was swept
        shutil.rmtree(root)
    assert any(rc == -signal.SIGKILL for rc, _, _ in states)


def _read(ref: Any) -> bytes:
    from aiomemo._checkpoint import read_value

    return read_value(ref)


def test_cli_reasons_json_and_an_unmet_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The printed reasons; --json; tombstones alone over the budget: exit 1, everything else gone."""
    import json

    now = time.time()
    root = store(
        tmp_path / "ri",
        [
            [
                rec(1, now - 7200),
                rec(2, now - 10),
                func_tombstone("m.g", now - 5),
                rec(3, now - 9, func="m.g"),
            ]
        ],
    )
    assert main(["gc", os.fspath(root), "--max-age", "1h", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["removed"]["too_old"] == 1 and s["removed"]["forgotten"] == 1 and s["budget_met"]
    assert s["records_out"] == 2 and s["bytes_out"] == size(root)
    assert main(["gc", os.fspath(root), "--max-bytes", "10"]) == 1
    out = capsys.readouterr()
    assert "1 least recently written, over the budget" in out.out
    assert "the budget is not met" in out.err
    assert table(root, now=now) == {}
    assert main(["gc", os.fspath(root), "--max-bytes", "10", "--json"]) == 1


def test_a_stale_plan_is_refused(tmp_path: Path) -> None:
    """Another gc ran between planning and applying: nothing more is removed."""
    from aiomemo._gc import apply_gc, plan_gc

    root = store(
        tmp_path / "ri", [[rec(i, T0 + i) for i in range(40)], [rec(i, T0 + 50) for i in range(5)]]
    )
    stale = plan_gc(root, max_bytes=size(root) // 2, now=NOW)
    gc(root, max_bytes=size(root) // 3, now=NOW)
    snap = files(root)
    with pytest.raises(MaintenanceError, match="since gc read it"):
        apply_gc(stale)
    assert files(root) == snap
