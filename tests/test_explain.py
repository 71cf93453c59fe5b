"""explain(task, paths): which inputs differ from the nearest recorded call."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from aiomemo import Memoizer, _codec
from aiomemo._explain import (
    CheckpointPathError,
    Explanation,
    InputMatch,
    explain,
    find_segments,
    func_name,
)
from aiomemo._hashing import arg_digests, hash_task
from aiomemo.stores import Record
from helpers import write_segment_file as write


async def fn(a: Any, b: Any = None, *, n: Any = 0, cfg: Any = None) -> Any:
    """A task function."""
    return a


FN = f"{fn.__module__}.{fn.__qualname__}"


def task(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"func": fn, "args": args, "kwargs": kwargs}


def record(t: dict[str, Any], when: float = 1.7e9, *, digests: bool = True) -> Record:
    return Record(
        hash_task(t),
        _codec.encode(1),
        func_name(t["func"]),
        when,
        arg_digests(t) if digests else b"",
    )


def test_names_the_differing_kwarg(tmp_path: Path) -> None:
    write(tmp_path, [record(task(1, "x", n=3)), record(task(9, 9, n=9), 1.9e9)])
    ex = explain(task(1, "x", n=4), [tmp_path])
    assert isinstance(ex, Explanation)
    assert not ex.hit
    assert ex.func == FN
    assert ex.inputs == (
        InputMatch("args[0]", "match"),
        InputMatch("args[1]", "match"),
        InputMatch("kwargs['n']", "differs"),
    )
    assert ex.matched == 2 and ex.differing == ("kwargs['n']",)
    assert ex.nearest_time == 1.7e9
    assert ex.nearest_key == hash_task(task(1, "x", n=3)).hex()
    assert ex.key == hash_task(task(1, "x", n=4)).hex()
    assert (
        str(ex)
        == f"kwargs['n'] differs from the nearest recorded call of {FN} (2 of 3 inputs match)"
    )
    assert ex.records_of_func == 2 and ex.records_with_digests == 2
    json.dumps(ex.to_dict())


def test_hit(tmp_path: Path) -> None:
    write(tmp_path, [record(task(1, n=3), 1.75e9)])
    ex = explain(task(1, n=3), [tmp_path])
    assert ex.hit and ex.nearest_time == 1.75e9
    assert str(ex).startswith(f"hit: {FN} has a recorded result")
    assert all(i.status == "match" for i in ex.inputs)


def test_nearest_is_the_most_matching_then_newest(tmp_path: Path) -> None:
    write(
        tmp_path,
        [
            record(task(1, 2, n=3), 1.0e9),  # 2 of 3 match
            record(task(1, 2, n=5), 1.1e9),  # 2 of 3 match, newer
            record(task(7, 8, n=4), 1.9e9),  # 1 of 3
        ],
    )
    ex = explain(task(1, 2, n=4), [tmp_path])
    assert ex.nearest_time == 1.1e9 and ex.differing == ("kwargs['n']",)


def test_several_differences_extra_and_missing(tmp_path: Path) -> None:
    write(tmp_path, [record(task(1, 2, n=3))])
    ex = explain(task(5, 6, n=3), [tmp_path])
    assert str(ex) == (
        f"args[0] and args[1] differ from the nearest recorded call of {FN} (1 of 3 inputs match)"
    )
    ex = explain(task(1, 2, n=3, cfg={"a": 1}), [tmp_path])
    assert [(i.name, i.status) for i in ex.inputs if i.status != "match"] == [
        ("kwargs['cfg']", "extra")
    ]
    assert "kwargs['cfg'] is new compared with the nearest recorded call" in str(ex)
    ex = explain(task(1, n=3), [tmp_path])
    assert [(i.name, i.status) for i in ex.inputs if i.status != "match"] == [
        ("args[1]", "missing")
    ]
    assert "args[1] is not given (the recorded call had it)" in str(ex)


def test_all_inputs_match_but_the_key_differs(tmp_path: Path) -> None:
    write(tmp_path, [record({**task(1), "version": 1})])
    ex = explain({**task(1), "version": 2}, [tmp_path])
    assert not ex.hit and ex.matched == 1 and ex.differing == ()
    assert "all 1 inputs match" in str(ex) and "version" in str(ex)


def test_records_without_digests(tmp_path: Path) -> None:
    write(tmp_path, [record(task(1), digests=False)])
    ex = explain(task(2), [tmp_path])
    assert ex.records_of_func == 1 and ex.records_with_digests == 0 and ex.inputs == ()
    assert "none keeps per-argument digests" in str(ex) and "explain=False" in str(ex)


def test_no_record_of_the_function(tmp_path: Path) -> None:
    write(tmp_path, [record(task(1))])
    ex = explain({"func": FN + "x", "args": [1]}, [tmp_path])
    assert ex.records_of_func == 0 and ex.similar_funcs == (FN,)
    assert str(ex).startswith(f"no recorded call of {FN}x")
    ex = explain(task(1), [tmp_path / "nowhere"])  # missing paths are skipped
    assert ex.records_scanned == 0 and not ex.hit


def test_func_as_recorded_name_finds_the_key(tmp_path: Path) -> None:
    """The CLI's way: func as "module.qualname" and JSON values give the same key and digests."""
    args = [1, "x", [1, 2, {"a": None}], 2.5, True, None]
    kwargs = {"n": 3, "cfg": {"z": [1], "y": False}}
    write(tmp_path, [record({"func": fn, "args": tuple(args), "kwargs": kwargs})])
    as_json = {
        "func": FN,
        "args": json.loads(json.dumps(args)),
        "kwargs": json.loads(json.dumps(kwargs)),
    }
    assert arg_digests(as_json) == arg_digests({"func": fn, "args": tuple(args), "kwargs": kwargs})
    ex = explain(as_json, [tmp_path])
    assert ex.hit

    # a nested function's qualname has dots of its own
    def inner(x: int) -> int:
        return x

    write(tmp_path, [record({"func": inner, "args": (1,)})], "seg-2.amlog")
    assert explain({"func": func_name(inner), "args": [1]}, [tmp_path]).hit
    assert "<locals>" in func_name(inner)


def test_explicit_key(tmp_path: Path) -> None:
    t = task(1)
    write(tmp_path, [record(t)])
    assert explain(task(2), [tmp_path], key=hash_task(t)).hit
    assert explain(task(2), [tmp_path], key=hash_task(t).hex()).hit
    assert not explain(task(1), [tmp_path], key=b"\0" * 32).hit


def test_unhashable_input_still_compares(tmp_path: Path) -> None:
    write(tmp_path, [record(task(1, 2))])
    ex = explain(task(1, object()), [tmp_path])
    assert ex.key is None and "cannot be computed" in ex.note
    assert ex.inputs[1] == InputMatch("args[1]", "unknown")


async def test_with_the_memoizer_from_a_thread(tmp_path: Path) -> None:
    async with Memoizer(checkpoint_mode="task_exit", config_run_dir=tmp_path) as memo:
        cached = memo.cached(fn)
        await cached(1, 2, n=3)
        await cached(1, 2, n=4)
    paths = [tmp_path]
    ex = await asyncio.to_thread(explain, task(1, 2, n=5), paths)
    assert ex.differing == ("kwargs['n']",) and ex.matched == 2
    assert (await asyncio.to_thread(explain, task(1, 2, n=4), paths)).hit

    async with Memoizer(
        checkpoint_mode="task_exit", config_run_dir=tmp_path / "off", explain=False
    ) as memo:
        await memo.cached(fn)(1)
    ex = await asyncio.to_thread(explain, task(2), [tmp_path / "off"])
    assert ex.records_of_func == 1 and ex.records_with_digests == 0


def test_progress_callback(tmp_path: Path) -> None:
    write(tmp_path, [record(task(i)) for i in range(5)])
    seen: list[tuple[int, int]] = []
    explain(task(1), [tmp_path], progress=lambda a, b: seen.append((a, b)))
    assert seen and seen[-1][0] == seen[-1][1] > 0


def test_task_without_func() -> None:
    with pytest.raises(TypeError):
        explain({"args": []}, [])


# ---------------------------------------------------------------- find_segments


def test_find_segments_kinds(tmp_path: Path) -> None:
    root = tmp_path / "runinfo"
    s0 = write(root / "000" / "checkpoint", [record(task(1))])
    s2 = write(root / "002" / "checkpoint", [record(task(2))])
    (root / "001" / "checkpoint").mkdir(parents=True)  # a run that wrote nothing
    r = find_segments(root)
    assert r is not None and r.kind == "runinfo root" and r.segments == (s0, s2)
    assert r.checkpoint_dirs == (s0.parent, s2.parent)
    for p, kind in [(root / "000", "run dir"), (s0.parent, "checkpoint dir"), (s0, "segment")]:
        r = find_segments(p)
        assert r is not None and r.kind == kind and r.segments == (s0,)
    other = tmp_path / "renamed.bin"
    other.write_bytes(s0.read_bytes())
    r = find_segments(other)  # the aiomemo header says what it is
    assert r is not None and r.kind == "segment"


def test_find_segments_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").write_bytes(b"junk")
    for p, msg in [
        (tmp_path / "nope", "no such file or directory"),
        (tmp_path / "empty", "holds no aiomemo checkpoints"),
        (tmp_path / "junk", "not an aiomemo checkpoint segment"),
    ]:
        with pytest.raises(CheckpointPathError, match=msg):
            find_segments(p)
        assert find_segments(p, strict=False) is None
