"""Segment format 4: a batch's payload is one flat array of record items.

Format 4 holds what format 3 holds (the same records, value frames and
tombstones) laid out for loading speed: ``[stride, key, value, (expires,)
tail, ...]``, ``stride`` 3 when nothing in the batch expires, 4 otherwise,
and ``tail`` the packed ``(func, time, digests, checksum)``. These tests pin
that format-3 files (golden, made by the format-3 writer) load forever, that
both formats read back the same for any records, and that damage to a
format-4 batch costs only the records it touches.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import msgpack
import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomemo import CorruptCheckpointError
from aiomemo import _checkpoint as ck
from aiomemo._checkpoint import (
    BadSpan,
    RecordInfo,
    SegmentWriter,
    ValueRef,
    encode_batch,
    file_header,
    iter_segment,
    keys_of_funcs,
    load_paths,
    read_value,
)
from aiomemo._records import NEVER, LoadReport, Record, func_tombstone, key_tombstone

GOLDEN = Path(__file__).resolve().parent / "golden" / "segments"
NOW = 2_000_000_000.0


def key(i: int) -> bytes:
    return blake3(b"k%d" % i).digest()


def rec(i: int, value: bytes = b"\x01", *, exp: float = NEVER, func: str = "m.f") -> Record:
    return Record(key(i), value, func, 1.9e9 + i, b"\x92\x90\x80", exp)


def seg(p: Path, batches: list[list[Record]], version: int = ck.FORMAT_VERSION) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(file_header(version) + b"".join(encode_batch(b, version=version) for b in batches))
    return p


def plain(table: dict[bytes, bytes | ValueRef]) -> dict[bytes, bytes]:
    return {k: read_value(v) if isinstance(v, ValueRef) else v for k, v in table.items()}


def readable(table: dict[bytes, bytes | ValueRef]) -> dict[bytes, bytes]:
    """:func:`plain` where a damaged value frame is a miss (left out), as the memo has it."""
    out = {}
    for k, v in table.items():
        with contextlib.suppress(CorruptCheckpointError):
            out[k] = read_value(v) if isinstance(v, ValueRef) else v
    return out


def records(p: Path) -> list[Record]:
    return [i.record for i in iter_segment(p) if isinstance(i, RecordInfo)]


def summary(r: LoadReport) -> tuple[object, ...]:
    return (plain(r.table), r.expires, r.records, r.expired, r.forgotten, r.tombstones, r.skipped)


# ------------------------------------------------------------------ layout


def test_current_format_is_4_and_lays_records_out_flat() -> None:
    """Never-expiring batches use stride 3, a batch with any expiry stride 4."""
    assert ck.FORMAT_VERSION == 4
    assert frozenset({1, 2, 3, 4}) == ck.READ_VERSIONS
    flat = encode_batch([rec(1), rec(2)])
    assert flat[40:43] == b"\x97\x03\xc4"  # 7 items: the stride, then 3 per record
    some = encode_batch([rec(1), rec(2, exp=NOW + 1)])
    assert some[40:43] == b"\x99\x04\xc4"
    tomb = encode_batch([key_tombstone(key(1), "m.f", 5.0)])
    assert tomb[40:42] == b"\x95\x04"
    items = msgpack.unpackb(some[40:], raw=False)
    assert items[1:4] == [key(1), b"\x01", NEVER] and items[7] == NOW + 1
    func, when, digests, checksum = msgpack.unpackb(items[4], raw=False)
    assert (func, when, digests, len(checksum)) == ("m.f", 1.9e9 + 1, b"\x92\x90\x80", 16)


def test_checksum_covers_every_record_byte() -> None:
    """The checksum is blake3 of the record's items up to the checksum itself."""
    packer = msgpack.Packer(use_bin_type=True)
    for expiry in (False, True):
        raw = ck._record_bytes(packer, rec(3), None, 4, expiry)
        assert raw[-18:-16] == b"\xc4\x10"
        assert blake3(raw[:-16]).digest(16) == raw[-16:]


# ------------------------------------------------------------------ format 3 forever


def test_golden_v3_segment_loads() -> None:
    """A segment the format-3 writer wrote (expiry, tombstones, a value frame) loads forever."""
    path = GOLDEN / "v3.amlog"
    want = json.loads((GOLDEN / "v3.json").read_text())
    assert blake3(path.read_bytes()).hexdigest() == want["sha"]
    assert ck.read_segment_header(path).version == 3
    r = load_paths([path], now=want["now"])
    assert r.errors == [] and r.skipped == 0
    got = {k.hex(): {"value_blake3": blake3(v).hexdigest()} for k, v in plain(r.table).items()}
    assert got == want["table"]
    assert {k.hex(): e for k, e in r.expires.items()} == want["expires"]
    assert (r.expired, r.forgotten) == (want["expired"], want["forgotten"])
    assert any(isinstance(v, ValueRef) for v in r.table.values())
    seen = [
        {
            "key": x.key.hex(),
            "func": x.func,
            "time": x.time,
            "expires": None if x.expires == NEVER else x.expires,
            "digests": x.digests.hex(),
        }
        for x in records(path)
    ]
    assert seen == want["records_in_order"]


async def test_v3_segment_compacts_to_v4_with_the_same_table(tmp_path: Path) -> None:
    """Compaction rewrites a format-3 segment in format 4; what loads is unchanged."""
    from aiomemo import _maintenance

    d = tmp_path / "ck"
    d.mkdir()
    (d / "seg-1.amlog").write_bytes((GOLDEN / "v3.amlog").read_bytes())
    before = load_paths([d], now=NOW)
    table, expires = plain(before.table), before.expires  # read before compaction replaces the file
    _maintenance.compact(d)
    segs = sorted(d.glob("seg-*.amlog"))
    assert len(segs) == 1 and ck.read_segment_header(segs[0]).version == 4
    after = load_paths([d], now=NOW)
    assert plain(after.table) == table and after.expires == expires
    assert after.errors == []


# ------------------------------------------------------------------ same as format 3

_keys = st.integers(0, 40)
_values = st.one_of(
    st.binary(min_size=1, max_size=40),
    # large (a value frame), built rather than drawn byte by byte
    st.binary(min_size=1, max_size=8).map(lambda b: b * (ck.LARGE_VALUE_MIN // len(b) + 1)),
)
_exps = st.one_of(st.just(NEVER), st.floats(NOW - 100, NOW + 100))


@st.composite
def _record(draw: st.DrawFn) -> Record:
    kind = draw(st.sampled_from(["rec"] * 8 + ["key-tomb", "func-tomb"]))
    i = draw(_keys)
    func = draw(st.sampled_from(["m.f", "m.g", "m.é"]))
    when = draw(st.floats(1.9e9 - 50, 1.9e9 + 50))
    if kind == "key-tomb":
        return key_tombstone(key(i), func, when)
    if kind == "func-tomb":
        return func_tombstone(func, when)
    digests = draw(st.sampled_from([b"", b"\x92\x90\x80", bytes(40)]))
    return Record(key(i), draw(_values), func, when, digests, draw(_exps))


_batches = st.lists(st.lists(_record(), min_size=1, max_size=12), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=_batches)
def test_format_4_reads_back_what_format_3_does(tmp_path: Path, batches: list[list[Record]]) -> None:
    """For any records: the same table, expiries, counts and tombstones, and the records themselves."""
    v3 = seg(tmp_path / "a" / "seg-1.amlog", batches, 3)
    v4 = seg(tmp_path / "b" / "seg-1.amlog", batches, 4)
    assert summary(load_paths([v4], now=NOW)) == summary(load_paths([v3], now=NOW))
    flat = [r for b in batches for r in b]
    assert records(v4) == records(v3) == flat
    funcs = {"m.f", "m.g", "m.é"}
    assert keys_of_funcs([v4], funcs) == keys_of_funcs([v3], funcs)


@pytest.mark.parametrize("exp", [NEVER, NOW + 7, NOW - 7])
async def test_single_record_batches_as_task_exit_writes_them(tmp_path: Path, exp: float) -> None:
    """The writer's batches of one (task_exit) load through the short path with their expiry."""
    w = await SegmentWriter.create(tmp_path)
    for i in range(50):
        await w.write_batch([rec(i, b"v%d" % i, exp=exp if i % 2 else NEVER)], fsync=False)
    await w.write_batch([func_tombstone("m.gone", NOW)], fsync=False)
    await w.write_batch([rec(99, func="m.gone")], fsync=False)
    await w.close()
    r = load_paths([tmp_path], now=NOW)
    live = {key(i): b"v%d" % i for i in range(50) if i % 2 == 0 or exp > NOW}
    assert r.table == live and r.errors == [] and r.forgotten == 1
    assert r.expires == ({key(i): exp for i in range(1, 50, 2)} if NOW < exp < NEVER else {})
    assert r.expired == (25 if exp < NOW else 0)


# ------------------------------------------------------------------ damage


def _batch_starts(data: bytes) -> list[int]:
    out, at = [], data.find(ck.BATCH_MAGIC)
    while at >= 0:
        out.append(at)
        at = data.find(ck.BATCH_MAGIC, at + 1)
    return out


def test_a_damaged_record_costs_only_itself(tmp_path: Path) -> None:
    """A bit flipped inside one record of a stride-4 batch: the walk keeps every other record."""
    recs = [rec(i, b"\xa3abc", exp=NOW + i + 1) for i in range(8)]
    p = seg(tmp_path / "seg-1.amlog", [recs])
    data = bytearray(p.read_bytes())
    third = ck.FILE_HEADER_SIZE + ck.BATCH_HEADER_SIZE + 2 + 2 * len(
        ck._record_bytes(msgpack.Packer(use_bin_type=True), recs[0], None, 4, True)
    )
    data[third + 10] ^= 0x20  # inside the third record's key
    p.write_bytes(bytes(data))
    r = load_paths([p], now=NOW)
    assert set(r.table) == {key(i) for i in range(8) if i != 2} and r.skipped == 1
    assert r.expires == {key(i): NOW + i + 1 for i in range(8) if i != 2}
    infos = [i for i in iter_segment(p) if isinstance(i, RecordInfo)]
    assert all(i.recovered for i in infos) and [i.record for i in infos] == recs[:2] + recs[3:]
    assert sum(isinstance(i, BadSpan) for i in iter_segment(p)) >= 1


def test_a_damaged_stride_loses_nothing(tmp_path: Path) -> None:
    """The stride byte itself damaged: every record still verifies on its own."""
    recs = [rec(i) for i in range(4)]  # 13 items: a fixarray, then the stride
    p = seg(tmp_path / "seg-1.amlog", [recs])
    data = bytearray(p.read_bytes())
    at = ck.FILE_HEADER_SIZE + ck.BATCH_HEADER_SIZE + 1
    assert data[at] == 3
    data[at] = 9
    p.write_bytes(bytes(data))
    r = load_paths([p], now=NOW)
    assert r.table == {x.key: x.value for x in recs}


def test_tombstones_in_a_damaged_batch_still_forget(tmp_path: Path) -> None:
    """A recovered tombstone (stride 4, tail parsed by hand) forgets what it names."""
    p = seg(
        tmp_path / "seg-1.amlog",
        [[rec(1), rec(2, func="m.g")], [key_tombstone(key(1), "m.f", 2e9), func_tombstone("m.g", 2e9)]],
    )
    data = bytearray(p.read_bytes())
    second = _batch_starts(bytes(data))[1]
    data[second + 20] ^= 0xFF  # the batch's payload digest: the batch must be walked
    p.write_bytes(bytes(data))
    r = load_paths([p], now=NOW)
    assert r.table == {} and r.forgotten == 2
    assert r.tombstones.keys == {key(1): 2e9} and r.tombstones.funcs == {"m.g": 2e9}


_damage = st.tuples(st.sampled_from(["flip", "zero", "cut"]), st.floats(0, 1), st.integers(1, 300))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=_batches, damage=_damage)
def test_damage_never_gives_a_wrong_value(
    tmp_path: Path, batches: list[list[Record]], damage: tuple[str, float, int]
) -> None:
    """Whatever is flipped, zeroed or cut off, every value loaded is one that was written for its key.

    And every batch untouched by the damage (before it, or wholly after a
    zeroed stretch) still loads, whatever its records' order.
    """
    p = seg(tmp_path / "x" / "seg-1.amlog", batches)
    data = bytearray(p.read_bytes())
    how, where, n = damage
    at = ck.FILE_HEADER_SIZE + int(where * (len(data) - ck.FILE_HEADER_SIZE - 1))
    if how == "flip":
        data[at] ^= 1 << (n % 8)
    elif how == "zero":
        data[at : at + n] = bytes(len(data[at : at + n]))
    else:
        del data[at:]
    p.write_bytes(bytes(data))
    written: dict[bytes, set[bytes]] = {}
    for b in batches:
        for x in b:
            if x.tombstone is None:
                written.setdefault(x.key, set()).add(x.value)
    r = load_paths([p], now=NOW)
    got = readable(r.table)
    for k, v in got.items():
        assert v in written[k]
    for info in iter_segment(p):
        if isinstance(info, RecordInfo):
            assert any(info.record == x for b in batches for x in b)
    ends = [ck.FILE_HEADER_SIZE]
    for b in batches:
        ends.append(ends[-1] + len(encode_batch(b)))
    n_intact = sum(1 for end in ends[1:] if end <= at)  # batches wholly before the damage
    later = [x for b in batches[n_intact:] for x in b]
    if not any(x.tombstone for x in later):
        want = plain(load_paths([seg(tmp_path / "y" / "seg-1.amlog", batches[:n_intact])], now=NOW).table)
        touched = {x.key for x in later}
        for k in {x.key for b in batches[:n_intact] for x in b} - touched:
            assert got.get(k) == want.get(k)


def test_garbage_full_of_bin_headers_is_walked_in_linear_time(tmp_path: Path) -> None:
    """A stretch of ``c4 20`` pairs (a key's start, repeated) costs linear time to walk."""
    import time

    garbage = b"\xc4\x20" * 200_000
    p = tmp_path / "seg-1.amlog"
    p.write_bytes(file_header() + encode_batch([rec(1)]) + garbage + encode_batch([rec(2)]))
    t0 = time.process_time()
    r = load_paths([p], now=NOW)
    assert time.process_time() - t0 < 20  # quadratic would be hours
    assert set(r.table) == {key(1), key(2)} and r.skipped >= 1


def test_a_sound_batch_with_malformed_tails_is_reported_by_verify(tmp_path: Path) -> None:
    """Only a foreign writer makes one: the loader serves key and value, verify names the record."""
    packer = msgpack.Packer(use_bin_type=True)
    good = ck._record_bytes(packer, rec(1), None, 4, False)
    bad = packer.pack(key(2)) + packer.pack(b"\x02") + packer.pack(b"\x93")  # a tail of 3 bytes
    p = tmp_path / "seg-1.amlog"
    p.write_bytes(file_header() + ck._frame(packer, [good, bad], 3))
    assert load_paths([p], now=NOW).table.get(key(1)) == b"\x01"
    items = list(iter_segment(p))
    assert [i.record for i in items if isinstance(i, RecordInfo)] == [rec(1)]
    assert any(isinstance(i, BadSpan) for i in items)


def test_nan_expiry_is_refused_by_the_writer() -> None:
    with pytest.raises(ValueError):
        encode_batch([rec(1, exp=math.nan)])
