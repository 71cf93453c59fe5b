"""Loading many-record batches: the fast path's shortcuts and the paused garbage collector."""

from __future__ import annotations

import math
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
