"""Segment format 3: every record carries its expiry; tombstones forget records.

Also pins that segments written by versions 1 and 2 (golden files made by the
code of those versions, ``tests/golden/segments/``) load forever.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomemo import _checkpoint as ck
from aiomemo import _maintenance
from aiomemo._checkpoint import (
    BadSpan,
    RecordInfo,
    SegmentWriter,
    ValueRef,
    encode_batch,
    file_header,
    iter_segment,
    load_paths,
    read_value,
)
from aiomemo._records import (
    FORGET_FUNC,
    FORGET_KEY,
    NEVER,
    Record,
    Tombstones,
    func_tombstone,
    func_tombstone_key,
    key_tombstone,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "segments"
NOW = 2_000_000_000.0


def key(i: int) -> bytes:
    return blake3(b"k%d" % i).digest()


def rec(i: int, value: bytes = b"\x01", *, t: float = 1.9e9, exp: float = NEVER, func: str = "m.f") -> Record:
    return Record(key(i), value, func, t, b"", exp)


def seg(d: Path, name: str, *batches: list[Record], version: int = 3) -> Path:
    """A segment of format ``version`` (3 here: format 4 has tests of its own)."""
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_bytes(file_header(version) + b"".join(encode_batch(b, version=version) for b in batches))
    return p


def plain(table: dict[bytes, bytes | ValueRef]) -> dict[bytes, bytes]:
    return {k: read_value(v) if isinstance(v, ValueRef) else v for k, v in table.items()}


# ------------------------------------------------------------------ old formats


@pytest.mark.parametrize("version", [1, 2])
def test_golden_old_segments_load(version: int) -> None:
    """Segments written by the version-1 and version-2 writers load with every record."""
    path = GOLDEN / f"v{version}.amlog"
    want = json.loads((GOLDEN / f"v{version}.json").read_text())
    assert blake3(path.read_bytes()).hexdigest() == want["sha"]  # the file itself never changes
    assert ck.read_segment_header(path).version == version
    r = load_paths([path], now=NOW)
    assert r.errors == [] and r.records == want["records"]
    assert r.expires == {} and r.expired == 0 and not r.tombstones
    got = {k.hex(): blake3(v).hexdigest() for k, v in plain(r.table).items()}
    assert got == {k: v["value_blake3"] for k, v in want["table"].items()}
    if version == 2:
        assert any(isinstance(v, ValueRef) for v in r.table.values())
    infos = [i for i in iter_segment(path) if isinstance(i, RecordInfo)]
    assert len(infos) == want["records"]
    for info in infos:
        assert info.record.expires == NEVER and info.record.tombstone is None
        w = want["table"][info.record.key.hex()]
        assert info.record.func == w["func"]
    # the same bytes copied into a directory next to a v3 segment: both load
    assert all(isinstance(i, RecordInfo) for i in iter_segment(path))


def test_golden_old_segment_next_to_v3(tmp_path: Path) -> None:
    """A v2 golden segment and a v3 segment in one directory: a v3 tombstone forgets a v2 record."""
    d = tmp_path / "ck"
    d.mkdir()
    (d / "seg-1.amlog").write_bytes((GOLDEN / "v2.amlog").read_bytes())
    want = json.loads((GOLDEN / "v2.json").read_text())
    first = bytes.fromhex(next(iter(want["table"])))
    seg(d, "seg-2.amlog", [key_tombstone(first, "golden.produce", 1_800_000_000.0)])
    r = load_paths([d], now=NOW)
    assert r.errors == [] and first not in r.table and r.forgotten == 1
    assert len(r.table) == len(want["table"]) - 1


def test_old_reader_refuses_v3_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that knows versions 1-2 only skips a v3 segment with one line, loading nothing."""
    p = seg(tmp_path, "seg-1.amlog", [rec(1)])
    monkeypatch.setattr(ck, "READ_VERSIONS", frozenset({1, 2}))
    r = load_paths([p])
    assert r.table == {} and len(r.errors) == 1
    assert "unsupported checkpoint format version 3" in r.errors[0]


def test_old_versions_cannot_hold_expiry_or_tombstones() -> None:
    """Writing a 6-field (format 1-2) record that expires, or a tombstone, is refused."""
    with pytest.raises(ValueError, match="format 2 has no expiry"):
        encode_batch([rec(1, exp=5.0)], version=2)
    with pytest.raises(ValueError, match="format 1 has no expiry"):
        encode_batch([func_tombstone("m.f", 1.0)], version=1)
    with pytest.raises(ValueError, match="expires"):
        encode_batch([rec(1, exp=math.nan)])
    assert encode_batch([rec(1)], version=2)[40:42] == b"\x91\x96"  # a 6-array record


# ------------------------------------------------------------------ expiry


def test_expiry_round_trips_and_expired_records_are_left_out(tmp_path: Path) -> None:
    """Each record keeps its expiry; at load an expired one is left out and counted."""
    recs = [rec(0), rec(1, exp=NOW + 10), rec(2, exp=NOW - 1), rec(3, exp=NOW)]
    p = seg(tmp_path, "seg-1.amlog", recs[:2], recs[2:])
    assert [i.record for i in iter_segment(p) if isinstance(i, RecordInfo)] == recs
    assert encode_batch(recs, version=3)[40:42] == b"\x94\x97"  # four 7-array records
    r = load_paths([p], now=NOW)
    assert set(r.table) == {key(0), key(1)} and r.expired == 2
    assert r.expires == {key(1): NOW + 10}
    later = load_paths([p], now=NOW + 10)
    assert set(later.table) == {key(0)} and later.expired == 3


def test_expiry_follows_the_newest_record(tmp_path: Path) -> None:
    """A later record without expiry clears an earlier one's; a later expired one removes the key."""
    a = seg(tmp_path, "seg-1.amlog", [rec(0, exp=NOW + 5), rec(1), rec(2, exp=NOW + 5)])
    b = seg(tmp_path, "seg-2.amlog", [rec(0, b"\x02")], [rec(1, exp=NOW - 5)], [rec(2, b"\x03", exp=NOW + 9)])
    r = load_paths([a, b], now=NOW)
    assert r.table == {key(0): b"\x02", key(2): b"\x03"}
    assert r.expires == {key(2): NOW + 9}


def test_large_value_with_expiry(tmp_path: Path) -> None:
    """A value in a value frame keeps its expiry (the reference and the expiry travel together)."""
    big = bytes(range(256)) * 100
    p = seg(tmp_path, "seg-1.amlog", [rec(0, big, exp=NOW + 1), rec(1, big, exp=NOW - 1)])
    r = load_paths([p], now=NOW)
    assert set(r.table) == {key(0)} and isinstance(r.table[key(0)], ValueRef)
    assert read_value(r.table[key(0)]) == big and r.expires == {key(0): NOW + 1}


async def test_writer_writes_current_format_with_expiry(tmp_path: Path) -> None:
    """SegmentWriter writes the current format; single-record batches (the task_exit path) keep the expiry."""
    w = await SegmentWriter.create(tmp_path)
    await w.write_batch([rec(0, exp=NOW + 3)], fsync=False)
    await w.write_batch([rec(1, exp=NOW - 3)], fsync=False)
    await w.write_batch([func_tombstone("m.g", NOW)], fsync=False)
    await w.write_batch([rec(2, func="m.g", t=NOW - 1)], fsync=False)
    await w.close()
    assert w.path is not None and ck.read_segment_header(w.path).version == ck.FORMAT_VERSION
    r = load_paths([tmp_path], now=NOW)
    assert set(r.table) == {key(0)} and r.expires == {key(0): NOW + 3}
    assert r.expired == 1 and r.forgotten == 1 and r.tombstones.funcs == {"m.g": NOW}


def test_damaged_v3_batch_recovers_records_with_expiry(tmp_path: Path) -> None:
    """The record walk resynchronises on 0x97 0xc4 and keeps each record's expiry."""
    recs = [rec(i, b"\xa3abc", exp=NOW + i + 1) for i in range(6)]
    p = seg(tmp_path, "seg-1.amlog", recs)
    data = bytearray(p.read_bytes())
    first = data.index(b"\x97\xc4", 16 + 40)
    data[first + 10] ^= 0xFF  # inside the first record's key
    p.write_bytes(bytes(data))
    r = load_paths([p], now=NOW)
    assert set(r.table) == {key(i) for i in range(1, 6)} and r.skipped >= 1
    assert r.expires == {key(i): NOW + i + 1 for i in range(1, 6)}
    infos = [i for i in iter_segment(p) if isinstance(i, RecordInfo)]
    assert all(i.recovered for i in infos) and [i.record for i in infos] == recs[1:]
    assert any(isinstance(i, BadSpan) for i in iter_segment(p))


# ------------------------------------------------------------------ tombstones


def test_tombstone_values_are_recognised_only_with_their_expiry() -> None:
    """A tombstone is the marker value and expires 0.0; the same bytes otherwise are a value."""
    t = key_tombstone(key(1), "m.f", 5.0)
    assert t.tombstone == "key" and t.value == FORGET_KEY and not t.expired(10.0)
    f = func_tombstone("m.f", 5.0)
    assert f.tombstone == "func" and f.value == FORGET_FUNC and f.key == func_tombstone_key("m.f")
    assert Record(key(1), FORGET_KEY, "m.f", 5.0).tombstone is None
    assert func_tombstone_key("m.f") != func_tombstone_key("m.g")


def test_key_tombstone_forgets_regardless_of_segment_order(tmp_path: Path) -> None:
    """A tombstone forgets records written at or before its time, in any segment; later ones live."""
    d = tmp_path / "ck"
    seg(d, "seg-1.amlog", [rec(0, t=100.0), rec(1, t=300.0), rec(2, t=100.0)])
    seg(d, "seg-2.amlog", [key_tombstone(key(0), "m.f", 200.0), key_tombstone(key(1), "m.f", 200.0)])
    seg(d, "seg-3.amlog", [rec(2, b"\x02", t=300.0), key_tombstone(key(2), "m.f", 200.0)])
    r = load_paths([d], now=NOW)
    assert r.table == {key(1): b"\x01", key(2): b"\x02"}
    assert r.forgotten == 2 and len(r.tombstones) == 3


def test_live_record_earlier_in_load_order_stands(tmp_path: Path) -> None:
    """The last record in load order is forgotten, an earlier one written after the tombstone stands."""
    d = tmp_path / "ck"
    seg(d, "seg-1.amlog", [rec(0, b"\x0a", t=300.0, exp=NOW + 7)])
    seg(d, "seg-2.amlog", [rec(0, b"\x0b", t=100.0)])
    seg(d, "seg-3.amlog", [key_tombstone(key(0), "m.f", 200.0)])
    r = load_paths([d], now=NOW)
    assert r.table == {key(0): b"\x0a"} and r.expires == {key(0): NOW + 7} and r.forgotten == 1


def test_func_tombstone(tmp_path: Path) -> None:
    """A function tombstone forgets that function's records up to its time, no other function's."""
    d = tmp_path / "ck"
    seg(d, "seg-1.amlog", [rec(0, func="m.f", t=1.0), rec(1, func="m.g", t=1.0), rec(2, func="m.f", t=9.0)])
    seg(d, "seg-2.amlog", [func_tombstone("m.f", 5.0)], [func_tombstone("m.f", 3.0)])
    r = load_paths([d], now=NOW)
    assert set(r.table) == {key(1), key(2)} and r.tombstones.funcs == {"m.f": 5.0}


def test_compact_drops_what_loading_drops_and_keeps_tombstones(tmp_path: Path) -> None:
    """compact leaves out expired and forgotten records, keeps the newest tombstones, loads the same."""
    d = tmp_path / "ck"
    seg(d, "seg-1.amlog", [rec(0, t=100.0), rec(1, exp=NOW - 1), rec(2, exp=NOW + 50), rec(3, t=300.0)])
    seg(d, "seg-2.amlog", [key_tombstone(key(0), "m.f", 200.0), key_tombstone(key(3), "m.f", 200.0)])
    seg(d, "seg-3.amlog", [key_tombstone(key(0), "m.f", 150.0), func_tombstone("m.zz", 1.0)])
    before = load_paths([d], now=NOW)
    summary = _maintenance.compact(d, now=NOW)
    assert summary["expired_dropped"] == 1 and summary["forgotten_dropped"] == 1
    assert summary["tombstones_kept"] == 3 and summary["records_out"] == 5
    after = load_paths([d], now=NOW)
    assert (after.table, after.expires) == (before.table, before.expires)
    assert after.tombstones == before.tombstones == Tombstones(
        {key(0): 200.0, key(3): 200.0}, {"m.zz": 1.0}
    )
    assert after.forgotten == 0  # the forgotten record is gone from disk


# ------------------------------------------------------------------ against a model

_event = st.tuples(
    st.sampled_from(["put", "put", "put", "ktomb", "ftomb"]),
    st.integers(0, 4),  # key; its function is key % 2 (a key is derived from its function)
    st.integers(0, 20),  # time
    st.sampled_from([NEVER, NEVER, 5.0, 15.0]),  # expiry
    st.integers(0, 3),  # segment
)


def _model(events: list[tuple[Any, ...]], now: float) -> dict[bytes, bytes]:
    """What loading must give: per key the last put (load order) no tombstone covers, if unexpired."""
    tk: dict[int, float] = {}
    tf: dict[int, float] = {}
    for kind, k, t, _e, _s in events:
        f = k % 2
        if kind == "ktomb":
            tk[k] = max(tk.get(k, -1.0), float(t))
        elif kind == "ftomb":
            tf[f] = max(tf.get(f, -1.0), float(t))
    out: dict[bytes, bytes] = {}
    for i, (kind, k, t, e, _s) in sorted(enumerate(events), key=lambda p: (p[1][4], p[0])):
        f = k % 2
        if kind != "put" or t <= tk.get(k, -1.0) or t <= tf.get(f, -1.0):
            continue
        if e <= now:
            out.pop(key(k), None)
        else:
            out[key(k)] = b"\xcd" + i.to_bytes(2, "big")
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(_event, max_size=25), now=st.sampled_from([0.0, 10.0, 20.0]))
def test_load_and_compact_match_a_model(tmp_path_factory: pytest.TempPathFactory, events: list[Any], now: float) -> None:
    """Random writes, key and function tombstones over four segments: load == model == compacted load."""
    d = tmp_path_factory.mktemp("ck")
    by_seg: dict[int, list[Record]] = {}
    for i, (kind, k, t, e, s) in enumerate(events):
        f = k % 2
        func = f"m.f{f}"
        if kind == "put":
            r = Record(key(k), b"\xcd" + i.to_bytes(2, "big"), func, float(t), b"", e)
        elif kind == "ktomb":
            r = key_tombstone(key(k), func, float(t))
        else:
            r = func_tombstone(f"m.f{f}", float(t))
        by_seg.setdefault(s, []).append(r)
    for s, recs in by_seg.items():
        # batches of one and of several, so both loader paths run
        seg(d, f"seg-{s}.amlog", *([r] for r in recs[:2]), recs[2:])
    want = _model(events, now)
    got = load_paths([d], now=now)
    assert got.errors == [] and got.table == want
    if by_seg:
        _maintenance.compact(d, now=now)
        assert load_paths([d], now=now).table == want


def test_tombstones_in_a_many_record_batch(tmp_path: Path) -> None:
    """A large batch mixing results, tombstones and expiring records takes the per-record path."""
    recs = [rec(i, t=float(i)) for i in range(500)]
    recs += [key_tombstone(key(i), "m.f", 1000.0) for i in range(0, 500, 2)]
    recs += [rec(i, b"\x02", t=2000.0, exp=NOW + 1) for i in range(0, 100, 4)]
    p = seg(tmp_path, "seg-1.amlog", recs)
    r = load_paths([p], now=NOW)
    want = {key(i): b"\x01" for i in range(1, 500, 2)} | {key(i): b"\x02" for i in range(0, 100, 4)}
    assert r.table == want and len(r.expires) == 25
    assert os.path.getsize(p) > 0
