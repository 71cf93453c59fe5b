"""The ``aiomemo`` command: every subcommand through ``main(argv)`` and a real subprocess."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aiomemo import _checkpoint as ck
from aiomemo import _cli, _codec, _maintenance
from aiomemo._checkpoint import SegmentWriter, encode_batch, iter_segment, list_segments, load_paths
from aiomemo._hashing import arg_digests, hash_task
from aiomemo.stores import Record

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def target(a: Any, b: Any = None, *, n: Any = 0) -> None:
    """The function whose calls the records describe (never called)."""


FUNC = f"{target.__module__}.{target.__qualname__}"
_seq = iter(range(10**6))


def make_record(value: Any, *args: Any, t: float = 1.7e9, **kwargs: Any) -> Record:
    task = {"func": target, "args": args, "kwargs": kwargs}
    return Record(hash_task(task), _codec.encode(value), FUNC, t, arg_digests(task))


def write_seg(directory: Path, records: list[Record], *, batch: int = 10) -> Path:
    """A segment as SegmentWriter lays it out, named so that later calls sort later."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"seg-20260101T000000.{next(_seq):06d}Z-1-abcdef01.amlog"
    parts = [encode_batch(records[i : i + batch]) for i in range(0, len(records), batch)]
    path.write_bytes(ck.file_header() + b"".join(parts))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = _cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aiomemo: error: ")
    return lines[0]


@pytest.fixture
def runinfo(tmp_path: Path) -> Path:
    """Two runs: 000 with two segments, 001 with one; key 1 is rewritten later."""
    root = tmp_path / "runinfo"
    ck0 = root / "000" / "checkpoint"
    write_seg(ck0, [make_record(i * 10, i, t=1.7e9 + i) for i in range(30)])
    write_seg(ck0, [make_record("new", 1, t=1.7e9 + 100)])
    write_seg(
        root / "001" / "checkpoint", [make_record(-i, i, n=5, t=1.7e9 + 200) for i in range(5)]
    )
    return root


def table(*paths: Path) -> dict[bytes, bytes]:
    rep = load_paths(list(paths))
    assert not rep.errors, rep.errors
    return rep.table


# ---------------------------------------------------------------- basics


@pytest.mark.parametrize("cmd", ["demo", "inspect", "verify", "compact", "explain", "import-parsl"])
def test_help_on_every_subcommand(capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    code, out, _ = run(capsys, cmd, "--help")
    assert code == 0
    assert out.startswith(f"usage: aiomemo {cmd}")
    assert "--json" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            capsys,
        )[0]
        == 2
    )
    assert run(capsys, "frobnicate")[0] == 2
    code, _, err = run(capsys, "inspect")
    assert code == 2 and "required" in err
    assert run(capsys, "--help")[0] == 0


@pytest.mark.parametrize("cmd", ["inspect", "verify", "compact"])
def test_input_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cmd: str
) -> None:
    code, _, err = run(capsys, cmd, tmp_path / "missing")
    assert code == 2
    assert "no such file or directory" in one_line_error(err)

    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, cmd, tmp_path / "empty")
    assert code == 2
    assert "holds no aiomemo checkpoints" in one_line_error(err)

    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    code, _, err = run(capsys, cmd, tmp_path / "run")
    assert code == 2
    one_line_error(err)

    (tmp_path / "notes.txt").write_text("hello\n")
    code, _, err = run(capsys, cmd, tmp_path / "notes.txt")
    assert code == 2
    assert "not an aiomemo checkpoint segment" in one_line_error(err)

    pkl = tmp_path / "p" / "000" / "checkpoint" / "tasks.pkl"
    pkl.parent.mkdir(parents=True)
    pkl.write_bytes(b"")
    for p in (pkl, tmp_path / "p"):
        code, _, err = run(capsys, cmd, p)
        assert code == 2
        assert "import-parsl" in one_line_error(err)


# ---------------------------------------------------------------- inspect


def test_inspect_json(capsys: pytest.CaptureFixture[str], runinfo: Path) -> None:
    code, r = run_json(capsys, "inspect", runinfo)
    assert code == 0
    assert r["paths"] == [{"path": str(runinfo), "kind": "runinfo root"}]
    assert len(r["checkpoint_dirs"]) == 2
    assert r["segments"] == 3
    assert r["records"] == 36
    assert r["unique_keys"] == 35  # key 1 twice in run 000 (n=5 makes run 001's keys new)
    assert r["records_with_digests"] == 36
    assert r["bad_spans"] == 0 and r["skipped_records"] == 0
    assert r["first_time"] == 1.7e9 and r["last_time"] == 1.7e9 + 200
    assert r["first_time_iso"].endswith("Z")
    f = r["functions"][FUNC]
    assert f["records"] == 36 and f["unique_keys"] == 35
    assert f["value_bytes"] == sum(len(_codec.encode(i * 10)) for i in range(30)) + len(
        _codec.encode("new")
    ) + sum(len(_codec.encode(-i)) for i in range(5))
    assert r["bytes"] == sum(s["bytes"] for s in r["segment_list"])
    assert [s["records"] for s in r["segment_list"]] == [30, 1, 5]


def test_inspect_every_kind_of_path(capsys: pytest.CaptureFixture[str], runinfo: Path) -> None:
    seg = list_segments(runinfo / "000" / "checkpoint")[0]
    for path, kind, n in [
        (runinfo / "000", "run dir", 31),
        (runinfo / "000" / "checkpoint", "checkpoint dir", 31),
        (seg, "segment", 30),
    ]:
        code, r = run_json(capsys, "inspect", path)
        assert code == 0
        assert r["paths"][0]["kind"] == kind
        assert r["records"] == n
    code, r = run_json(capsys, "inspect", runinfo / "000", runinfo / "001")
    assert code == 0 and r["records"] == 36
    code, r = run_json(capsys, "inspect", runinfo, runinfo / "000", seg)  # overlapping
    assert code == 0 and r["records"] == 36 and r["segments"] == 3
    code, out, _ = run(capsys, "inspect", runinfo)
    assert code == 0
    assert "unique keys   35" in out and FUNC in out


# ---------------------------------------------------------------- verify and damage


def test_verify_sound(capsys: pytest.CaptureFixture[str], runinfo: Path) -> None:
    code, r = run_json(capsys, "verify", runinfo)
    assert code == 0
    assert r == {
        "ok": True,
        "segments": 3,
        "records": 36,
        "bad": [],
        "in_flight": [],
        "lost_records": 0,
        "skipped_files": [],
    }
    code, out, _ = run(capsys, "verify", runinfo)
    assert code == 0 and out.startswith("OK: 36 sound records")


def test_flipped_byte(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "ck"
    seg = write_seg(d, [make_record(i, i) for i in range(30)])
    infos = [i for i in iter_segment(seg) if isinstance(i, ck.RecordInfo)]
    victim = infos[12]  # in the second batch
    pos = victim.offset + victim.length // 2
    data = bytearray(seg.read_bytes())
    data[pos] ^= 0xFF
    seg.write_bytes(bytes(data))

    code, r = run_json(capsys, "verify", d)
    assert code == 1
    assert not r["ok"] and r["records"] == 29 and r["lost_records"] == 1
    (bad,) = r["bad"]
    assert bad["path"] == str(seg)
    assert bad["offset"] <= pos < bad["offset"] + bad["length"]
    code, out, _ = run(capsys, "verify", d)
    assert code == 1
    assert f"{seg}: offset {bad['offset']}" in out and "BAD" in out

    code, r = run_json(capsys, "inspect", d)
    assert code == 0  # inspect reports, it does not judge
    assert r["records"] == 29 and r["skipped_records"] == 1 and r["bad_spans"] == 1
    assert r["recovered_records"] == 9  # the rest of the damaged batch


def test_truncated_segment(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "ck"
    seg = write_seg(d, [make_record(i, i) for i in range(30)])
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - 25)
    code, r = run_json(capsys, "verify", seg)
    assert code == 1
    (bad,) = r["bad"]
    assert bad["torn"] and bad["offset"] + bad["length"] == size - 25
    assert r["records"] + r["lost_records"] == 30
    code, r = run_json(capsys, "inspect", seg)
    assert r["skipped_records"] >= 1 and r["records"] < 30


def test_value_that_does_not_decode(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = make_record(1, 1)
    bad = Record(b"k" * 32, b"\xc1", FUNC, 1.7e9)  # 0xc1: never valid msgpack
    seg = write_seg(tmp_path / "ck", [good, bad])
    code, r = run_json(capsys, "verify", seg)
    assert code == 1
    assert "does not decode" in r["bad"][0]["reason"]
    assert r["bad"][0]["offset"] > 0
    assert run(capsys, "verify", seg, "--no-decode")[0] == 0


async def test_torn_tail_of_a_live_writer_is_not_a_finding(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    w = await SegmentWriter.create(tmp_path / "ck")
    await w.write_batch([make_record(1, 1)], fsync=False)
    assert w.path is not None
    with open(w.path, "ab") as f:  # half a batch, as if a write were in flight
        f.write(encode_batch([make_record(2, 2)])[:30])
    try:
        code, r = run_json(capsys, "verify", tmp_path / "ck")
        assert code == 0
        assert r["ok"] and len(r["in_flight"]) == 1
        code, r = run_json(capsys, "inspect", tmp_path / "ck")
        assert r["segments_in_use"] == 1
    finally:
        await w.close()
    assert run(capsys, "verify", tmp_path / "ck")[0] == 1  # the writer is gone: a torn tail


# ---------------------------------------------------------------- compact


def _two_segment_dir(d: Path) -> tuple[list[Path], dict[bytes, bytes]]:
    s1 = write_seg(d, [make_record(i, i) for i in range(40)])
    s2 = write_seg(d, [make_record(i * 100, i) for i in range(0, 40, 2)])  # newer values
    before = table(d)
    assert len(before) == 40
    return [s1, s2], before


def test_compact_in_place(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "run" / "checkpoint"
    old, before = _two_segment_dir(d)
    code, r = run_json(capsys, "compact", tmp_path / "run")
    assert code == 0
    assert r["in_place"] and r["segments_in"] == 2
    assert r["records_in"] == 60 and r["records_out"] == 40
    assert sorted(r["removed"]) == sorted(map(str, old))
    (seg,) = list_segments(d)
    assert str(seg) == r["output"]
    assert table(d) == before
    assert _codec.decode(before[make_record(0, 2).key]) == 200
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
    # again: idempotent
    assert run(capsys, "compact", d)[0] == 0
    assert table(d) == before and len(list_segments(d)) == 1


def test_compacted_segment_keeps_its_place_in_load_order(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    old, _ = _two_segment_dir(d)
    summary = _maintenance.compact(d)
    later = write_seg(d, [make_record("latest", 2)])  # a run that starts after compaction
    segs = list_segments(d)
    assert segs == [Path(summary["output"]), later]
    assert ck.segment_stamp(summary["output"]) == ck.segment_stamp(old[0])
    assert _codec.decode(table(d)[make_record(0, 2).key]) == "latest"
    # names aiomemo did not make: the output goes right after the last of them
    e = tmp_path / "other"
    write_seg(e, [make_record(1, 1)])
    odd = e / "zz-odd.amlog"
    list_segments(e)[0].rename(odd)
    summary = _maintenance.compact(e)
    assert Path(summary["output"]).name.startswith("zz-odd~compacted-")


def test_compact_crash_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ck"
    old, before = _two_segment_dir(d)

    def crash(tmp: Path, final: Path) -> None:
        raise KeyboardInterrupt  # the process dies after writing and fsyncing the temp file

    monkeypatch.setattr(_maintenance, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        _maintenance.compact(d)
    monkeypatch.undo()
    assert list_segments(d) == old
    assert table(d) == before
    assert [p for p in d.iterdir() if p.name.startswith(".compact-")]  # left behind
    _maintenance.compact(d)  # the next compaction sweeps it
    assert table(d) == before
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []


def test_compact_crash_after_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ck"
    old, before = _two_segment_dir(d)

    def crash(segments: list[Path], directory: Path) -> None:
        segments[0].unlink()  # dies half-way through deleting the old segments
        raise KeyboardInterrupt

    monkeypatch.setattr(_maintenance, "_remove_old", crash)
    with pytest.raises(KeyboardInterrupt):
        _maintenance.compact(d)
    monkeypatch.undo()
    segs = list_segments(d)
    assert old[1] in segs and len(segs) == 2  # new + the old one not yet deleted
    assert table(d) == before  # every key, newest value
    _maintenance.compact(d)
    assert len(list_segments(d)) == 1 and table(d) == before


@pytest.mark.parametrize("pid", ["0", "9"])  # the new segment sorts before / after the oldest
@pytest.mark.parametrize("deleted", [0, 1, 2])
def test_compact_crash_at_every_deletion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pid: str, deleted: int
) -> None:
    d = tmp_path / "ck"
    write_seg(d, [make_record(("a", i), i) for i in range(30)])
    write_seg(d, [make_record(("b", i), i) for i in range(0, 30, 2)])
    write_seg(d, [make_record(("c", i), i) for i in range(0, 30, 3)])
    before = table(d)
    real_name, real_fsync = _maintenance.segment_name, _maintenance.fsync_dir
    calls = []

    def name(stamp: str | None = None) -> str:
        return real_name(stamp).replace(f"-{os.getpid()}-", f"-{pid}-")

    def fsync_then_die(path: Path) -> None:
        # fsync 1 follows the rename, fsync 1 + k the k-th deletion: die there
        real_fsync(path)
        calls.append(path)
        if len(calls) == 1 + deleted:
            raise KeyboardInterrupt

    monkeypatch.setattr(_maintenance, "segment_name", name)
    monkeypatch.setattr(_maintenance, "fsync_dir", fsync_then_die)
    with pytest.raises(KeyboardInterrupt):
        _maintenance.compact(d)
    assert len(list_segments(d)) == 4 - deleted
    assert table(d) == before


@pytest.mark.parametrize("step", ["_publish", "_fsync_dir"])
def test_compact_killed_process(tmp_path: Path, step: str) -> None:
    """A process that dies hard (no finally blocks, no cleanup) mid-compaction loses nothing."""
    d = tmp_path / "ck"
    _, before = _two_segment_dir(d)
    hook = {
        # dies once the temp segment is written and fsynced, before its rename
        "_publish": "def _publish(*a):\n    os._exit(9)\n_maintenance._publish = _publish\n",
        # dies once the rename and the first (oldest) deletion are durable
        "_fsync_dir": (
            "real = _maintenance.fsync_dir\n"
            "def _fsync_dir(d):\n"
            "    real(d)\n"
            "    if len(list(d.glob('*.amlog'))) == 2:\n"
            "        os._exit(9)\n"
            "_maintenance.fsync_dir = _fsync_dir\n"
        ),
    }[step]
    script = f"import os, sys\nfrom aiomemo import _maintenance\n{hook}_maintenance.compact(sys.argv[1])\n"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", script, str(d)], env=env, timeout=60, check=False)
    assert p.returncode == 9
    assert table(d) == before
    assert _cli.main(["compact", str(d)]) == 0
    assert table(d) == before and len(list_segments(d)) == 1
    assert [x.name for x in d.iterdir() if x.name.startswith(".")] == []


async def test_compact_refuses_while_a_writer_holds_a_segment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = tmp_path / "ck"
    write_seg(d, [make_record(i, i) for i in range(5)])
    w = await SegmentWriter.create(d)
    await w.write_batch([make_record(9, 9)], fsync=False)
    try:
        before = sorted(p.name for p in d.iterdir())
        code, _, err = run(capsys, "compact", d)
        assert code == 2
        assert "a writer holds this segment open" in one_line_error(err)
        assert sorted(p.name for p in d.iterdir()) == before
        # a copy elsewhere is fine while the run goes on
        with open(w.path or "", "ab") as f:  # a batch half written
            f.write(encode_batch([make_record(10, 10)])[:30])
        code, r = run_json(capsys, "compact", d, "-o", tmp_path / "copy")
        assert code == 0 and r["records_out"] == 6
        assert r["segments_in_use"] == 1 and r["tails_in_flight"] == 1
        assert sorted(p.name for p in d.iterdir()) == before
    finally:
        await w.close()
    assert run(capsys, "compact", d)[0] == 1  # the writer died mid-batch: a torn tail
    assert run(capsys, "compact", d, "--drop-damaged")[0] == 0
    assert len(table(d)) == 6


def test_compact_to_output_leaves_input(capsys: pytest.CaptureFixture[str], runinfo: Path) -> None:
    files = sorted(p for p in runinfo.rglob("*") if p.is_file())
    before = table(runinfo / "000", runinfo / "001")
    out = runinfo.parent / "merged"
    code, r = run_json(capsys, "compact", runinfo, "-o", out)
    assert code == 0 and not r["in_place"] and r["removed"] == []
    assert sorted(p for p in runinfo.rglob("*") if p.is_file()) == files
    assert table(out) == before
    # in place over a runinfo root with two runs: refused, one line
    code, _, err = run(capsys, "compact", runinfo)
    assert code == 2 and "-o OUT" in one_line_error(err)
    code, _, err = run(capsys, "compact", list_segments(out)[0])
    assert code == 2 and "segment file" in one_line_error(err)
    code, _, err = run(capsys, "compact", runinfo / "001", "-o", runinfo / "001" / "checkpoint")
    assert code == 2 and "leave out -o" in one_line_error(err)


def test_compact_damaged(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "ck"
    seg = write_seg(d, [make_record(i, i) for i in range(20)])
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size - 10)
    loads = table_with_errors(d)
    code, _, err = run(capsys, "compact", d)
    assert code == 1 and "--drop-damaged" in one_line_error(err)
    assert list_segments(d) == [seg]
    code, r = run_json(capsys, "compact", d, "--drop-damaged")
    assert code == 0 and r["damaged_spans_dropped"] == 1
    assert table(d) == loads
    assert run(capsys, "verify", d)[0] == 0


def table_with_errors(*paths: Path) -> dict[bytes, bytes]:
    return load_paths(list(paths)).table


# ---------------------------------------------------------------- explain


def test_explain_names_the_differing_argument(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = tmp_path / "ck"
    write_seg(d, [make_record(1, 1, [2, "x"], n=3, t=1.7e9), make_record(2, 5, 6, n=7, t=1.8e9)])
    code, r = run_json(
        capsys, "explain", d, "--func", FUNC, "--args", '[1, [2, "x"]]', "--kwargs", '{"n": 4}'
    )
    assert code == 0
    assert r["hit"] is False
    assert r["message"] == (
        f"kwargs['n'] differs from the nearest recorded call of {FUNC} (2 of 3 inputs match)"
    )
    assert r["inputs"] == [
        {"name": "args[0]", "status": "match"},
        {"name": "args[1]", "status": "match"},
        {"name": "kwargs['n']", "status": "differs"},
    ]
    assert r["nearest_time"] == 1.7e9
    code, r = run_json(
        capsys, "explain", d, "--func", FUNC, "--args", '[1, [2, "x"]]', "--kwargs", '{"n": 3}'
    )
    assert code == 0 and r["hit"] is True and r["key"] == make_record(1, 1, [2, "x"], n=3).key.hex()
    code, out, _ = run(
        capsys, "explain", d, "--func", FUNC, "--args", "[5]", "--kwargs", '{"n": 7}'
    )
    assert code == 0
    assert out.splitlines()[0] == (
        f"args[1] is not given (the recorded call had it) compared with the nearest recorded "
        f"call of {FUNC} (2 of 3 inputs match)"
    )
    key = make_record(2, 5, 6, n=7).key.hex()
    code, r = run_json(capsys, "explain", d, "--func", FUNC, "--key", key)
    assert r["hit"] is True


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--args", "[1,"], "--args: not valid JSON"),
        (["--args", '{"a": 1}'], "--args: must be a JSON array"),
        (["--kwargs", "[1]"], "--kwargs: must be a JSON object"),
        (["--key", "zz"], "--key: not a hex string"),
        (["--key", "abcd"], "--key: a key is 64 hex digits"),
    ],
)
def test_explain_bad_arguments(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], msg: str
) -> None:
    write_seg(tmp_path / "ck", [make_record(1, 1)])
    code, _, err = run(capsys, "explain", tmp_path / "ck", "--func", FUNC, *argv)
    assert code == 2
    assert msg in one_line_error(err)


# ---------------------------------------------------------------- import-parsl


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def parsl_checkpoint(run_dir: Path, entries: list[tuple[str, Any]]) -> Path:
    """tasks.pkl written the way Parsl's _checkpoint_these_tasks writes it (appending dicts)."""
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    path = ckpt / "tasks.pkl"
    with open(path, "ab") as f:
        for hashsum, result in entries:
            pickle.dump({"hash": hashsum, "exception": None, "result": result}, f)
    return path


def h(i: int) -> str:
    return f"{i:032x}"


def test_import_parsl_refuses_without_trust(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    root = tmp_path / "runinfo"
    parsl_checkpoint(root / "000", [(h(1), _Marker(str(marker)))])
    code, _, err = run(capsys, "import-parsl", root)
    assert code == 2
    line = one_line_error(err)
    assert "--trust" in line and "runs code" in line
    assert not marker.exists()
    assert sorted(p.name for p in root.iterdir()) == ["000"]  # nothing written

    code, r = run_json(capsys, "import-parsl", root, "--trust")
    assert marker.exists()  # with --trust the pickle is loaded (and its code ran)
    assert code == 0
    assert r["skipped_unencodable"] == 1 and r["imported"] == 0


def test_import_parsl(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "runinfo"
    parsl_checkpoint(root / "000", [(h(1), 1), (h(2), (2, "two")), (h(3), {"a": [1.5]})])
    parsl_checkpoint(root / "001", [(h(2), "newer"), (h(4), io.BytesIO())])
    code, r = run_json(capsys, "import-parsl", root, "--trust")
    assert code == 0
    assert r["entries"] == 5 and r["imported"] == 3 + 0  # keys 1, 2, 3 (4 is refused)
    assert r["skipped_unencodable"] == 1 and r["unencodable_types"] == {"_io.BytesIO": 1}
    assert r["output_dir"] == str(root / "002" / "checkpoint")
    t = table(root / "002")
    assert {k: _codec.decode(v) for k, v in t.items()} == {
        bytes.fromhex(h(1)): 1,
        bytes.fromhex(h(2)): "newer",
        bytes.fromhex(h(3)): {"a": [1.5]},
    }
    recs = [i.record for i in iter_segment(r["segment"]) if isinstance(i, ck.RecordInfo)]
    assert {x.func for x in recs} == {"parsl:?"} and {len(x.key) for x in recs} == {16}
    # -o OUT, and a torn pickle stream: what was readable is imported, exit 1
    with open(root / "001" / "checkpoint" / "tasks.pkl", "ab") as f:
        f.write(pickle.dumps({"hash": h(9), "exception": None, "result": 9})[:-3])
    code, r = run_json(capsys, "import-parsl", root / "001", "--trust", "-o", tmp_path / "out")
    assert code == 1
    assert r["imported"] == 1 and len(r["unreadable"]) == 1
    assert "offset" in r["unreadable"][0]
    code, _, err = run(capsys, "import-parsl", root / "001", "--trust")
    assert code == 2 and "-o OUT" in one_line_error(err)
    code, _, err = run(capsys, "import-parsl", tmp_path / "nope", "--trust")
    assert code == 2 and "no such file" in one_line_error(err)


def test_import_parsl_skips_an_entry_it_cannot_unpickle(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result whose class is not importable here costs that entry only."""
    import types

    gone = types.ModuleType("aiomemo_test_gone_module")

    class Thing:
        pass

    Thing.__module__ = gone.__name__
    Thing.__qualname__ = "Thing"
    gone.Thing = Thing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, gone.__name__, gone)
    root = tmp_path / "runinfo"
    parsl_checkpoint(root / "000", [(h(1), 1), (h(2), Thing()), (h(3), 3)])
    monkeypatch.delitem(sys.modules, gone.__name__)
    code, r = run_json(capsys, "import-parsl", root, "--trust")
    assert code == 1
    assert r["entries"] == 2 and r["imported"] == 2
    (line,) = r["unreadable"]
    assert "ModuleNotFoundError" in line and "skipped" in line
    t = table(root / "001")
    assert sorted(_codec.decode(v) for v in t.values()) == [1, 3]


def parsl_task(x: int) -> int:
    """A task function as Parsl would key it."""
    return x


@pytest.mark.filterwarnings("ignore:aiomemo.*Parsl pickle checkpoint skipped")
async def test_imported_parsl_records_hit_with_parsl_keys(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pm = pytest.importorskip("parsl.dataflow.memoization")
    from aiomemo import Memoizer, get_all_checkpoints

    task = {"func": parsl_task, "args": (21,), "kwargs": {}, "ignore_for_cache": []}
    root = tmp_path / "runinfo"
    parsl_checkpoint(root / "000", [(pm.make_hash(task), 42)])
    assert _cli.main(["import-parsl", str(root), "--trust"]) == 0
    capsys.readouterr()
    async with Memoizer(checkpoint_mode="manual", config_run_dir=root, parsl_keys=True) as memo:
        fut = await memo.check_memo(dict(task))
        assert fut is not None and fut.result() == 42
    # the same records loaded later (load_checkpoints), into a memo that had none
    async with Memoizer(run_dir=tmp_path / "later", parsl_keys=True) as memo:
        assert not memo._table.has_parsl_keys
        await memo.load_checkpoints(get_all_checkpoints(str(root)))
        assert memo._table.has_parsl_keys
        fut = await memo.check_memo(dict(task))
        assert fut is not None and fut.result() == 42
    # without parsl_keys the imported records are never looked up under Parsl's key
    async with Memoizer(checkpoint_mode="manual", config_run_dir=root) as memo:
        assert await memo.check_memo(dict(task)) is None


@pytest.mark.parametrize("n", [0, 1, 16_383, 16_384, 40_000])
@pytest.mark.parametrize("where", [None, "first", "last"])
def test_a_parsl_key_is_found_anywhere_in_a_load(n: int, where: str | None) -> None:
    """The scan for Parsl's 16-byte keys (a slice at a time) finds one wherever it is."""
    from aiomemo._records import LoadReport, note_parsl_keys

    keys = [i.to_bytes(32, "big") for i in range(n)]
    if where == "first":
        keys.insert(0, b"p" * 16)
    elif where == "last":
        keys.append(b"p" * 16)
    rep = LoadReport(table=dict.fromkeys(keys, b""))
    assert rep.parsl_keyed is None
    assert note_parsl_keys(rep).parsl_keyed is (where is not None)


# ---------------------------------------------------------------- progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(_cli.time, "monotonic", lambda: now[0])
    quiet = io.StringIO()
    p = _cli.Progress("x", stream=quiet)
    now[0] += 5
    p.update(1, 2)
    p.close()
    assert quiet.getvalue() == ""
    tty = _Tty()
    p = _cli.Progress("scan", stream=tty)
    p.update(1, 2)
    assert tty.getvalue() == ""  # nothing in the first 0.3 s
    now[0] += 1
    p.update(1_500_000, 3_000_000)
    assert "scan [" in tty.getvalue() and "50%" in tty.getvalue()
    p.close()
    assert tty.getvalue().endswith("\r\x1b[K")


# ---------------------------------------------------------------- real subprocesses


def _python_m(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "aiomemo", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_subprocess(runinfo: Path) -> None:
    p = _python_m("verify", str(runinfo), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["records"] == 36
    assert p.stderr == ""  # not a terminal: no progress bar
    p = _python_m("inspect", str(runinfo / "nope"))
    assert p.returncode == 2
    assert p.stdout == ""
    one_line_error(p.stderr)
    seg = list_segments(runinfo / "001" / "checkpoint")[0]
    data = bytearray(seg.read_bytes())
    data[-5] ^= 1
    seg.write_bytes(bytes(data))
    p = _python_m("verify", str(runinfo))
    assert p.returncode == 1
    assert f"{seg}: offset" in p.stdout
