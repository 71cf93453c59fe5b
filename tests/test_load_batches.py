"""Loading many-record batches: the fast path's shortcuts and what sends a batch past them."""

from __future__ import annotations

import gc
import math
import os
import threading
from pathlib import Path

import msgpack
import pytest
from blake3 import blake3

from aiomemo import _checkpoint as ck
from aiomemo._checkpoint import encode_batch, file_header, load_paths
from aiomemo._records import NEVER, LoadReport, Record

NOW = 2_000_000_000.0


def key(i: int) -> bytes:
    return blake3(b"k%d" % i).digest()


def seg(d: Path, *batches: list[Record]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "seg-1.amlog"
    p.write_bytes(file_header() + b"".join(encode_batch(b) for b in batches))
    return p


@pytest.mark.parametrize(
    "exps",
    [
        [NEVER] * 300,  # nothing expires: one pass, no list
        [NOW + 5] * 300,
        [NEVER] * 299 + [NOW + 5],
        [NOW + i for i in range(1, 301)],
    ],
    ids=["never", "all-later", "one-later", "each-its-own"],
)
def test_batch_expiries_whatever_their_mix(tmp_path: Path, exps: list[float]) -> None:
    """A batch in which nothing expires and batches with expiries load the same table and expiries."""
    recs = [Record(key(i), b"v%d" % i, "m.f", 1.9e9, b"", e) for i, e in enumerate(exps)]
    r = load_paths([seg(tmp_path, recs)], now=NOW)
    assert r.records == 300 and not r.errors
    assert r.table == {key(i): b"v%d" % i for i in range(300)}
    assert r.expires == {key(i): e for i, e in enumerate(exps) if e < NEVER}


def test_never_expiring_batch_replaces_earlier_expiries(tmp_path: Path) -> None:
    """A later batch in which nothing expires drops the expiries its keys had."""
    first = [Record(key(i), b"a", "m.f", 1.9e9, b"", NOW + 9) for i in range(200)]
    later = [Record(key(i), b"b", "m.f", 1.9e9, b"", NEVER) for i in range(0, 200, 2)]
    r = load_paths([seg(tmp_path, first, later)], now=NOW)
    assert r.table == {key(i): b"b" if i % 2 == 0 else b"a" for i in range(200)}
    assert r.expires == {key(i): NOW + 9 for i in range(1, 200, 2)}


@pytest.mark.parametrize("bad", [float("nan"), "soon", b"x", [1.0]])
def test_foreign_expiries_go_record_by_record(bad: object) -> None:
    """Expiries that are not numbers (or unhashable) leave the fast path; NaN never expires."""
    recs: list[tuple[object, ...]] = [
        (key(i), b"v", b"m.f", 1.9e9, b"", NEVER, b"\0" * 16) for i in range(50)
    ]
    recs[7] = (*recs[7][:5], bad, *recs[7][6:])
    payload = msgpack.packb(recs, use_bin_type=True)
    report = LoadReport()
    sink = ck._Sink(report, NOW)
    if ck._load_sound_batch(sink, 50, payload):
        # only NaN may stay: it never expires, as the careful reader takes it too
        assert bad != bad
        assert sink.table == {key(i): b"v" for i in range(50)} and sink.expires == {}
    else:
        assert sink.table == {}


def test_nan_is_not_never() -> None:
    assert {math.nan} != ck._NEVER and {NEVER} == ck._NEVER


def _bad_field(kind: str) -> object:
    return {
        "int": 7,
        "none": None,
        "float": 1.5,
        "tuple": (b"a", b"b"),
        "map": {0: b"a"},
        "ext": msgpack.ExtType(5, b"payload"),
        "timestamp": msgpack.Timestamp(1, 2),
    }[kind]


_BAD_KINDS = ["int", "none", "float", "tuple", "map", "ext", "timestamp"]


@pytest.mark.parametrize("field", [0, 1])
@pytest.mark.parametrize("kind", _BAD_KINDS)
@pytest.mark.parametrize("width", [6, 7])
def test_fast_path_refuses_a_key_or_value_that_is_not_bytes(
    field: int, kind: str, width: int
) -> None:
    """A sound batch with one key or value of another type leaves the fast path, table untouched."""
    recs: list[list[object]] = [
        [key(i), b"v%d" % i, b"m.f", 1.9e9, b"", NEVER, b"\0" * 16][:width] for i in range(64)
    ]
    recs[41][field] = _bad_field(kind)
    payload = msgpack.packb(recs, use_bin_type=True)
    sink = ck._Sink(LoadReport(), NOW)
    assert not ck._load_sound_batch(sink, 64, payload)
    assert sink.table == {} and sink.expires == {}


@pytest.mark.parametrize(
    "odd",
    [7, b"bytes", {0: b"k", 1: b"v", 2: b"f", 3: 1.0, 4: b"", 5: NEVER}, (b"k", b"v")],
    ids=["int", "bytes", "map", "short"],
)
def test_fast_path_refuses_a_record_of_another_shape(odd: object) -> None:
    """A record that is not a 6- or 7-tuple sends the whole batch to the careful reader."""
    recs: list[object] = [(key(i), b"v", b"m.f", 1.9e9, b"", NEVER) for i in range(64)]
    recs[13] = odd
    payload = msgpack.packb(recs, use_bin_type=True)
    sink = ck._Sink(LoadReport(), NOW)
    assert not ck._load_sound_batch(sink, 64, payload)
    assert sink.table == {}


@pytest.mark.parametrize("field", [2, 3, 4, 5, 6])
def test_fast_path_refuses_a_map_in_any_field(field: int) -> None:
    """No writer puts a map in a record: one anywhere sends the batch to the careful reader."""
    recs: list[list[object]] = [
        [key(i), b"v%d" % i, b"m.f", 1.9e9, b"", NEVER, b"\0" * 16] for i in range(64)
    ]
    recs[63][field] = {b"nested": [1, {b"deeper": 2}]}
    payload = msgpack.packb(recs, use_bin_type=True)
    sink = ck._Sink(LoadReport(), NOW)
    assert not ck._load_sound_batch(sink, 64, payload)
    assert sink.table == {} and sink.expires == {}


def test_a_load_pauses_the_collector_and_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collector is off while a load runs and on again after it, also after a failure."""
    seen: list[bool] = []
    real = ck._load_paths_now

    def spy(paths: object, now: float | None) -> LoadReport:
        seen.append(gc.isenabled())
        if len(seen) == 2:
            raise RuntimeError("boom")
        return real(paths, now)  # type: ignore[arg-type]

    monkeypatch.setattr(ck, "_load_paths_now", spy)
    assert gc.isenabled()
    p = seg(tmp_path, [Record(key(1), b"v", "m.f", 1.9e9)])
    assert load_paths([p]).table == {key(1): b"v"}
    with pytest.raises(RuntimeError):
        load_paths([p])
    assert seen == [False, False] and gc.isenabled()


def test_a_collector_disabled_before_a_load_stays_disabled(tmp_path: Path) -> None:
    gc.disable()
    try:
        load_paths([seg(tmp_path, [Record(key(1), b"v", "m.f", 1.9e9)])])
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_loads_in_threads_resume_the_collector_once_all_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load to end leaves the collector off while another still runs."""
    inside = threading.Barrier(2)
    first_done = threading.Event()
    during: list[bool] = []
    real = ck._load_paths_now

    def slow(paths: object, now: float | None) -> LoadReport:
        inside.wait(timeout=10)
        if threading.current_thread().name == "second":
            assert first_done.wait(timeout=10)
            during.append(gc.isenabled())
        return real(paths, now)  # type: ignore[arg-type]

    monkeypatch.setattr(ck, "_load_paths_now", slow)
    p = seg(tmp_path, [Record(key(1), b"v", "m.f", 1.9e9)])

    def first() -> None:
        load_paths([p])
        first_done.set()

    threads = [
        threading.Thread(target=first),
        threading.Thread(target=load_paths, args=([p],), name="second"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert during == [False] and gc.isenabled()


def _one_batch_segment(d: Path, parts: list[bytes], stride: int | None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "seg-1.amlog"
    p.write_bytes(file_header() + ck._frame(msgpack.Packer(use_bin_type=True), parts, stride))
    return p


_N = 3000
_TAIL = msgpack.packb(("m.f", 1.9e9, b"", b"\0" * 16), use_bin_type=True)
#: an irregular record of each layout: format 3 (one array per record) and
#: format 4 (key, value, expires, tail: four items per record)
_ODD = {
    3: {
        "int-key": (7, b"v", "m.f", 1.9e9, b"", NEVER, b"\0" * 16),
        "map": ("key", {b"m": 1}, "m.f", 1.9e9, b"", NEVER, b"\0" * 16),
        "short": ("key", b"v"),
        "scalar": ("scalar",),  # stands for 12345 alone
    },
    4: {
        "int-key": (7, b"v", NEVER, _TAIL),
        "map": ("key", {b"m": 1}, NEVER, _TAIL),
        "short": ("key", 5, NEVER, _TAIL),  # an int for the value
        "scalar": ("key", b"v", 12345, _TAIL),  # an int for the expiry
    },
}


@pytest.mark.parametrize("at", [0, 1023, 1024, _N // 2, _N - 1])
@pytest.mark.parametrize("kind", ["int-key", "map", "short", "scalar"])
@pytest.mark.parametrize("version", [3, 4])
def test_a_large_batch_loads_every_sound_record_around_an_odd_one(
    tmp_path: Path, at: int, kind: str, version: int
) -> None:
    """A sound batch of thousands with one irregular record loses that record only.

    Expired and expiring records around it count as they would in a batch
    of their own.
    """
    packer = msgpack.Packer(use_bin_type=True)
    parts = []
    want: dict[bytes, bytes] = {}
    expires: dict[bytes, float] = {}
    for i in range(_N):
        exp = NEVER if i % 7 else (NOW + i if i % 14 else NOW - 1)
        rec = Record(key(i), b"v%d" % i, "m.f", 1.9e9, b"", exp)
        parts.append(ck._record_bytes(packer, rec, None, version, True))
        if i != at and exp > NOW:
            want[key(i)] = rec.value
            if exp < NEVER:
                expires[key(i)] = exp
    odd = tuple(key(at) if f == "key" else f for f in _ODD[version][kind])  # type: ignore[union-attr]
    if version == 3:
        parts[at] = msgpack.packb(12345 if kind == "scalar" else odd, use_bin_type=True)
    else:
        parts[at] = b"".join(msgpack.packb(f, use_bin_type=True) for f in odd)
    p = _one_batch_segment(tmp_path, parts, None if version == 3 else 4)
    r = load_paths([p], now=NOW)
    assert r.table == want and r.expires == expires
    assert r.records == _N - 1 and r.skipped == 1 and len(r.errors) == 1
    assert r.expired == sum(1 for i in range(14, _N, 14) if i != at) + (at != 0)


def _advised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == ck._WILLNEED
        calls.append((offset, length))

    monkeypatch.setattr(ck, "_FADVISE", fadvise)
    return calls


def test_a_run_of_batches_is_read_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a segment of big batches asks the kernel for the next span before it needs it."""
    calls = _advised(monkeypatch)
    big = b"x" * 8000  # inline values (below LARGE_VALUE_MIN)
    batches = [[Record(key(b * 1000 + i), big, "m.f", 1.9e9) for i in range(600)] for b in range(4)]
    p = seg(tmp_path, *batches)
    r = load_paths([p], now=NOW)
    assert r.records == 2400 and not r.errors
    size = p.stat().st_size
    assert calls and all(0 < off < size and 0 < n <= size - off for off, n in calls)


def test_large_values_are_not_read_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What is read ahead around value frames stays a small part of their bytes."""
    calls = _advised(monkeypatch)
    value = b"v" * (1024 * 1024)
    batches = [[Record(key(b * 10 + i), value, "m.f", 1.9e9) for i in range(3)] for b in range(20)]
    p = seg(tmp_path, *batches)
    r = load_paths([p], now=NOW)
    assert r.records == 60 and not r.errors
    assert sum(n for _, n in calls) < p.stat().st_size // 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_load_has_its_collector_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load's thread does not exist in the child, so the child must not wait for it to end."""
    inside, leave = threading.Event(), threading.Event()
    real = ck._load_paths_now

    def held(paths: object, now: float | None) -> LoadReport:
        inside.set()
        assert leave.wait(timeout=30)
        return real(paths, now)  # type: ignore[arg-type]

    monkeypatch.setattr(ck, "_load_paths_now", held)
    p = seg(tmp_path, [Record(key(1), b"v", "m.f", 1.9e9)])
    t = threading.Thread(target=load_paths, args=([p],))
    t.start()
    try:
        assert inside.wait(timeout=30) and not gc.isenabled()
        pid = os.fork()
        if pid == 0:  # the child: collector back, and a load of its own still works
            ok = gc.isenabled()
            monkeypatch.setattr(ck, "_load_paths_now", real)
            ok = ok and load_paths([p]).table == {key(1): b"v"} and gc.isenabled()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        leave.set()
        t.join(timeout=30)
    assert gc.isenabled()
