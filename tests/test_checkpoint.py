"""The checkpoint log: framing, recovery from damage, write failures, many writers."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import pickle
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomemo import CheckpointError, CorruptCheckpointError
from aiomemo import _checkpoint as ck
from aiomemo._checkpoint import (
    BATCH_HEADER_SIZE,
    FILE_HEADER_SIZE,
    BadSpan,
    RecordInfo,
    SegmentWriter,
    encode_batch,
    is_segment_in_use,
    iter_segment,
    list_segments,
    load_paths,
    read_segment_header,
)
from aiomemo.stores import Record


def rec(i: int, value: bytes | None = None, *, klen: int = 32) -> Record:
    """A record with a distinct key per ``i``."""
    return Record(
        key=i.to_bytes(4, "big") * (klen // 4),
        value=value if value is not None else b"v%d" % i,
        func=f"tests.mod.f{i % 3}",
        time=1.7e9 + i,
        digests=b"d" * (i % 3),
    )


async def write_segment(directory: Path, batches: list[list[Record]]) -> Path:
    """Write ``batches`` to a new segment in ``directory``; return its path."""
    w = await SegmentWriter.create(directory)
    for b in batches:
        await w.write_batch(b, fsync=False)
    await w.close()
    assert w.path is not None
    return w.path


def batch_offsets(path: Path) -> list[int]:
    """File offsets of the batch headers of a sound segment."""
    return sorted({i.batch_offset for i in iter_segment(path) if isinstance(i, RecordInfo)})


def assert_no_wrong_value(table: dict[bytes, bytes], expected: dict[bytes, bytes]) -> None:
    """Every key loaded is one that was written, with the value written for it."""
    for k, v in table.items():
        assert k in expected, f"unknown key {k!r}"
        assert v == expected[k], f"wrong value for {k!r}"


# ---------------------------------------------------------------- round trips


async def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    """Records written in batches come back whole from iter_segment and into the table from load."""
    records = [rec(i) for i in range(50)] + [rec(1000 + i, klen=16) for i in range(5)]
    seg = await write_segment(tmp_path / "ck", [records[:20], records[20:], [rec(7, b"")]])
    items = list(iter_segment(seg))
    assert all(isinstance(i, RecordInfo) and not i.recovered for i in items)
    got = [i.record for i in items if isinstance(i, RecordInfo)]
    assert got == [*records, rec(7, b"")]
    offsets = [i.offset for i in items if isinstance(i, RecordInfo)]
    assert offsets == sorted(offsets)
    report = load_paths([seg])
    assert report.errors == [] and report.skipped == 0
    assert report.records == 56 and report.files == 1
    assert report.table == {r.key: r.value for r in [*records, rec(7, b"")]}


async def test_file_header_and_segment_name(tmp_path: Path) -> None:
    """A segment starts with the v1 header and is named seg-<time>-<pid>-<random>.amlog."""
    seg = await write_segment(tmp_path, [[rec(1)]])
    assert seg.name.startswith("seg-") and seg.name.endswith(".amlog")
    assert f"-{os.getpid()}-" in seg.name
    head = read_segment_header(seg)
    assert (head.version, head.header_size) == (ck.FORMAT_VERSION, FILE_HEADER_SIZE)
    assert seg.read_bytes()[:8] == ck.FILE_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))


async def test_later_records_override_in_order(tmp_path: Path) -> None:
    """Within a file, across segments (by name) and across paths (as given), the later record wins."""
    a, b = tmp_path / "a", tmp_path / "b"
    await write_segment(a, [[rec(1, b"one"), rec(1, b"two")], [rec(2, b"x")]])
    await write_segment(a, [[rec(2, b"y"), rec(3, b"a3")]])  # a later segment of the same dir
    await write_segment(b, [[rec(3, b"b3")]])
    assert load_paths([a]).table == {rec(1).key: b"two", rec(2).key: b"y", rec(3).key: b"a3"}
    assert load_paths([a, b]).table[rec(3).key] == b"b3"
    assert load_paths([b, a]).table[rec(3).key] == b"a3"


async def test_run_dir_checkpoint_dir_and_file_paths(tmp_path: Path) -> None:
    """A run dir, its checkpoint dir and a segment file all load; a missing path is an error line."""
    seg = await write_segment(tmp_path / "run" / "checkpoint", [[rec(1)]])
    (seg.parent / "notes.txt").write_text("ignored")
    for p in (tmp_path / "run", seg.parent, seg, str(seg)):
        r = load_paths([p])
        assert r.table == {rec(1).key: rec(1).value} and r.errors == []
    r = load_paths([tmp_path / "nope"])
    assert r.table == {} and len(r.errors) == 1 and "nope" in r.errors[0]


def test_runinfo_root_is_explained(tmp_path: Path) -> None:
    """Passing a runinfo root (not a run dir) loads nothing and says why."""
    (tmp_path / "000" / "checkpoint").mkdir(parents=True)
    r = load_paths([tmp_path])
    assert r.table == {} and len(r.errors) == 1 and "runinfo root" in r.errors[0]


def test_encode_batch_validates_and_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong field types raise TypeError, oversized keys ValueError, and big batches split."""
    with pytest.raises(TypeError):
        encode_batch([Record(b"k", "text", "f", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_batch([Record(bytearray(b"k"), b"v", "f", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_batch([Record(b"k" * 256, b"v", "f", 1.0)])
    assert encode_batch([]) == b""
    monkeypatch.setattr(ck, "MAX_BATCH_PAYLOAD", 200)
    data = encode_batch([rec(i, b"x" * 60) for i in range(10)])
    assert data.count(ck.BATCH_MAGIC) >= 4


async def test_split_batches_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that encode_batch split into several batches loads whole."""
    monkeypatch.setattr(ck, "MAX_BATCH_PAYLOAD", 300)
    records = [rec(i, b"y" * 100) for i in range(20)]
    seg = await write_segment(tmp_path, [records])
    assert len(batch_offsets(seg)) > 5
    assert load_paths([seg]).table == {r.key: r.value for r in records}


# ---------------------------------------------------------------- damage


async def test_torn_tail_at_every_offset(tmp_path: Path) -> None:
    """Cutting the file at every byte of its last batch never raises, never gives a wrong value, keeps all earlier records."""
    early = [rec(i) for i in range(6)]
    last = [rec(100 + i, b"L" * (i + 1)) for i in range(4)]
    seg = await write_segment(tmp_path / "src", [early[:3], early[3:], last])
    data = seg.read_bytes()
    offs = batch_offsets(seg)
    start = offs[-1]
    expected = {r.key: r.value for r in early + last}
    cut = tmp_path / "cut.amlog"
    for n in range(0, len(data)):
        cut.write_bytes(data[:n])
        r = load_paths([cut])
        assert_no_wrong_value(r.table, expected)
        if n >= start:
            assert all(r.table.get(x.key) == x.value for x in early), n
            if n > start:
                assert len(r.errors) == 1 and "torn tail" in r.errors[0], (n, r.errors)
                assert r.skipped >= 1
            else:
                assert r.errors == []
        elif n not in (0, FILE_HEADER_SIZE, *offs):  # a cut between batches is a clean file
            assert r.errors, n
    cut.write_bytes(data)
    assert load_paths([cut]).table == expected


async def test_torn_tail_keeps_complete_records_of_the_torn_batch(tmp_path: Path) -> None:
    """Records fully written before the cut in a torn batch are recovered by their own checksums."""
    records = [rec(i, b"z" * 50) for i in range(10)]
    seg = await write_segment(tmp_path, [records])
    infos = [i for i in iter_segment(seg) if isinstance(i, RecordInfo)]
    data = seg.read_bytes()
    seg.write_bytes(data[: infos[7].offset + infos[7].length + 3])  # records 0..7 complete
    r = load_paths([seg])
    assert r.table == {x.key: x.value for x in records[:8]}
    assert r.skipped == 2 and "recovered 8 of 10" in r.errors[0]
    spans = [i for i in iter_segment(seg) if isinstance(i, BadSpan)]
    assert len(spans) == 1 and spans[0].torn and spans[0].lost == 2


async def test_every_single_byte_flip(tmp_path: Path) -> None:
    """Flipping any one byte of a small file never raises, never gives a wrong value, loses at most the record hit."""
    b1 = [rec(i) for i in range(3)]
    b2 = [rec(10 + i, b"w" * 5) for i in range(3)]
    seg = await write_segment(tmp_path / "src", [b1, b2])
    data = seg.read_bytes()
    expected = {r.key: r.value for r in b1 + b2}
    infos = [i for i in iter_segment(seg) if isinstance(i, RecordInfo)]
    bad = tmp_path / "bad.amlog"
    for pos in range(len(data)):
        for mask in (0x01, 0xFF):
            mutated = bytearray(data)
            mutated[pos] ^= mask
            bad.write_bytes(bytes(mutated))
            r = load_paths([bad])
            assert_no_wrong_value(r.table, expected)
            assert r.errors, (pos, mask)
            hit = [x for x in infos if x.offset <= pos < x.offset + x.length]
            # only the record the flip landed in may be lost
            assert len(r.table) >= len(expected) - len(hit), (pos, mask, r.errors)
            items = list(iter_segment(bad))
            assert any(isinstance(i, BadSpan) for i in items)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), max_size=5
    ),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    tail=st.binary(max_size=64),
)
def test_random_damage_never_gives_a_wrong_value(
    tmp_path: Path, edits: list[tuple[int, bytes]], cut: int | None, tail: bytes
) -> None:
    """Overwrites, truncation and appended garbage in any mix never raise and never give a wrong value."""
    src = tmp_path / "hyp-src"
    if not src.exists():
        batches = [[rec(i + 20 * j, b"q" * (i % 7)) for i in range(8)] for j in range(4)]
        asyncio.run(write_segment(src, batches))
    seg = list_segments(src)[0]
    expected = {
        r.key: r.value
        for j in range(4)
        for r in [rec(i + 20 * j, b"q" * (i % 7)) for i in range(8)]
    }
    data = bytearray(seg.read_bytes())
    for pos, chunk in edits:
        p = pos % len(data)
        data[p : p + len(chunk)] = chunk
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    data += tail
    bad = tmp_path / "hyp.amlog"
    bad.write_bytes(bytes(data))
    r = load_paths([bad])
    assert_no_wrong_value(r.table, expected)
    for item in iter_segment(bad):
        if isinstance(item, RecordInfo):
            assert expected[item.record.key] == item.record.value


async def test_garbage_between_batches_resyncs(tmp_path: Path) -> None:
    """Junk spliced between two batches costs nothing: both batches load, one error line."""
    seg = await write_segment(tmp_path / "src", [[rec(1)], [rec(2)]])
    data = seg.read_bytes()
    second = batch_offsets(seg)[1]
    junk = b"\x96\xc4" + ck.BATCH_MAGIC + os.urandom(100) + ck.BATCH_MAGIC[:5]
    seg.write_bytes(data[:second] + junk + data[second:])
    r = load_paths([seg])
    assert r.table == {rec(1).key: rec(1).value, rec(2).key: rec(2).value}
    assert len(r.errors) == 1 and "damaged data" in r.errors[0]


async def test_zero_filled_block_in_the_middle(tmp_path: Path) -> None:
    """A zeroed stretch (as after a crash on some file systems) loses only the batches it covers."""
    batches = [[rec(10 * j + i) for i in range(4)] for j in range(5)]
    seg = await write_segment(tmp_path / "src", batches)
    offs = batch_offsets(seg)
    data = bytearray(seg.read_bytes())
    data[offs[1] : offs[3]] = bytes(offs[3] - offs[1])
    seg.write_bytes(bytes(data))
    r = load_paths([seg])
    kept = [x for j in (0, 3, 4) for x in batches[j]]
    assert r.table == {x.key: x.value for x in kept}
    assert len(r.errors) == 1 and r.skipped >= 1


async def test_unsupported_version_and_foreign_files(tmp_path: Path) -> None:
    """A sound header of another version skips the file; a non-segment file loads nothing; an empty one is fine."""
    seg = await write_segment(tmp_path / "d", [[rec(1)]])
    data = seg.read_bytes()
    later = ck.FORMAT_VERSION + 1
    fixed = struct.pack("<8sHH", ck.FILE_MAGIC, later, 16)
    from blake3 import blake3

    newer = tmp_path / "newer.amlog"
    newer.write_bytes(fixed + blake3(fixed).digest(4) + data[16:])
    r = load_paths([newer])
    assert r.table == {} and f"version {later}" in r.errors[0]
    with pytest.raises(CorruptCheckpointError):
        read_segment_header(newer)
    other = tmp_path / "other.amlog"
    other.write_bytes(b"hello world, not a segment at all" * 10)
    r = load_paths([other])
    assert r.table == {} and r.errors
    empty = tmp_path / "empty.amlog"
    empty.write_bytes(b"")
    assert load_paths([empty]).errors == []


def test_parsl_pickle_is_never_loaded(tmp_path: Path) -> None:
    """A malicious tasks.pkl in a checkpoint dir is not unpickled: nothing runs, one error line."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "runinfo" / "000" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "tasks.pkl").write_bytes(
        pickle.dumps({"hash": "x", "exception": None, "result": Evil()})
    )
    for p in (ckpt, ckpt.parent, ckpt / "tasks.pkl"):
        r = load_paths([p])
        assert r.table == {}
        assert len(r.errors) == 1 and "import-parsl --trust" in r.errors[0]
    assert not marker.exists()


# ---------------------------------------------------------------- write failures


class FailingWrites:
    """Stands in for the writer's os.write: a short write first, then ENOSPC once."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def __call__(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.calls == 1:
            n: int = self.real(fd, bytes(data)[: len(data) // 2])  # a partial write first
            return n
        if self.calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.real(fd, data)
        return n


async def test_write_failure_then_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC mid-batch raises CheckpointError with the count; a retry lands each record exactly once."""
    w = await SegmentWriter.create(tmp_path)
    await w.write_batch([rec(0)], fsync=True)
    batch = [rec(i, b"r" * 40) for i in range(1, 9)]
    monkeypatch.setattr(ck, "_os_write", FailingWrites(os.write))
    with pytest.raises(CheckpointError) as info:
        await w.write_batch(batch, fsync=True)
    assert info.value.unsaved == len(batch)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    await w.write_batch(batch, fsync=True)
    await w.close()
    segs = list_segments(tmp_path)
    assert len(segs) == 1  # truncated back and reused, no torn bytes left behind
    r = load_paths([tmp_path])
    assert r.errors == [] and r.records == 9
    assert r.table == {x.key: x.value for x in [rec(0), *batch]}


async def test_failed_truncate_abandons_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the roll-back itself fails, the next write goes to a fresh segment and values stay right."""
    w = await SegmentWriter.create(tmp_path)
    await w.write_batch([rec(0)], fsync=False)
    first = w.path
    batch = [rec(i) for i in range(1, 5)]
    monkeypatch.setattr(ck, "_os_write", FailingWrites(os.write))

    def no_truncate(fd: int, n: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ck.os, "ftruncate", no_truncate)
    with pytest.raises(CheckpointError):
        await w.write_batch(batch, fsync=False)
    monkeypatch.undo()
    await w.write_batch(batch, fsync=False)
    assert w.path != first
    await w.close()
    r = load_paths([tmp_path])
    assert r.table == {x.key: x.value for x in [rec(0), *batch]}
    assert len(list_segments(tmp_path)) == 2
    assert all("torn tail" in e for e in r.errors) and len(r.errors) == 1


async def test_fsync_failure_abandons_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync raises CheckpointError, and the retry goes to a new segment."""
    w = await SegmentWriter.create(tmp_path)
    await w.write_batch([rec(0)], fsync=True)
    first = w.path
    real_fsync = os.fsync
    calls = {"n": 0}

    def flaky_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(ck.os, "fsync", flaky_fsync)
    with pytest.raises(CheckpointError) as info:
        await w.write_batch([rec(1), rec(2)], fsync=True)
    assert info.value.unsaved == 2
    await w.write_batch([rec(1), rec(2)], fsync=True)
    assert w.path != first
    await w.close()
    r = load_paths([tmp_path])
    assert r.errors == [] and r.table == {x.key: x.value for x in [rec(0), rec(1), rec(2)]}


async def test_create_failure_is_a_checkpoint_error(tmp_path: Path) -> None:
    """A directory that cannot be created gives CheckpointError with the count."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    w = await SegmentWriter.create(blocker / "checkpoint")
    with pytest.raises(CheckpointError) as info:
        await w.write_batch([rec(1), rec(2), rec(3)], fsync=False)
    assert info.value.unsaved == 3


async def test_cancelled_write_leaves_a_sound_file(tmp_path: Path) -> None:
    """Cancelling write_batch mid-flight still leaves whole batches, and later writes work."""
    w = await SegmentWriter.create(tmp_path)
    await w.write_batch([rec(0)], fsync=False)
    t = asyncio.ensure_future(w.write_batch([rec(1, b"c" * 1000)], fsync=True))
    await asyncio.sleep(0)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await w.write_batch([rec(2)], fsync=True)
    await w.close()
    r = load_paths([tmp_path])
    assert r.errors == []
    assert r.table[rec(0).key] == rec(0).value and r.table[rec(2).key] == rec(2).value
    assert r.table.get(rec(1).key, b"c" * 1000) == b"c" * 1000  # written in full, or not at all


async def test_lazy_create_lock_and_close(tmp_path: Path) -> None:
    """Nothing is created before the first write; the segment is locked while open; closed writers refuse."""
    d = tmp_path / "a" / "b" / "checkpoint"
    w = await SegmentWriter.create(d)
    assert not (tmp_path / "a").exists() and w.path is None
    assert await w.write_batch([], fsync=True) == 0
    assert not (tmp_path / "a").exists()
    n = await w.write_batch([rec(1)], fsync=True)
    assert w.path is not None and n == w.offset - FILE_HEADER_SIZE
    assert n > BATCH_HEADER_SIZE
    assert is_segment_in_use(w.path)
    await w.close()
    await w.close()
    assert not is_segment_in_use(w.path)
    with pytest.raises(CheckpointError):
        await w.write_batch([rec(2)], fsync=False)


async def test_concurrent_writes_in_one_writer(tmp_path: Path) -> None:
    """Many coroutines sharing one writer never interleave their batches."""
    w = await SegmentWriter.create(tmp_path)
    await asyncio.gather(
        *(w.write_batch([rec(10 * j + i) for i in range(5)], fsync=j % 2 == 0) for j in range(20))
    )
    await w.close()
    r = load_paths([tmp_path])
    assert r.errors == [] and len(r.table) == 100


# ---------------------------------------------------------------- many processes


def _child_writer(directory: str, proc: int, n: int, go: Any) -> None:
    async def run() -> None:
        w = await SegmentWriter.create(directory, lazy=False)
        go.wait(30)  # all writers hold their segments open before anyone writes
        for lo in range(0, n, 10):
            await w.write_batch(
                [rec(proc * 100_000 + i) for i in range(lo, min(n, lo + 10))], fsync=lo % 50 == 0
            )
        await w.close()

    asyncio.run(run())


def test_several_processes_one_directory(tmp_path: Path) -> None:
    """Processes writing one checkpoint dir at once each get a segment, and every record is there."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_child_writer, args=(str(tmp_path), p, 300, go)) for p in range(3)]
    for p in procs:
        p.start()
    deadline = 30.0
    while deadline > 0 and sum(map(is_segment_in_use, list_segments(tmp_path))) < 3:
        time.sleep(0.02)
        deadline -= 0.02
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    r = load_paths([tmp_path])
    assert r.errors == [] and len(list_segments(tmp_path)) == 3
    assert r.table == {
        rec(p * 100_000 + i).key: rec(p * 100_000 + i).value for p in range(3) for i in range(300)
    }


def test_garbage_costs_linear_time(tmp_path: Path) -> None:
    """Megabytes of record-like garbage (huge declared lengths) load in well under a second each."""
    header = ck.file_header()
    cases = {
        "random": os.urandom(2_000_000),
        "starts": (b"\x96\xc4\x20" + os.urandom(29)) * 60_000,
        "bin32": (b"\x96\xc4\x01a\xc6\x7f\xff\xff\xff" + os.urandom(20)) * 60_000,
        "magics": (ck.BATCH_MAGIC + os.urandom(32)) * 50_000,
    }
    for name, body in cases.items():
        p = tmp_path / f"{name}.amlog"
        p.write_bytes(header + body)
        t0 = time.perf_counter()
        r = load_paths([p])
        assert time.perf_counter() - t0 < 2.0, name
        assert r.table == {} and len(r.errors) == 1


async def test_verify_records_flags_a_bad_record_in_a_sound_batch(tmp_path: Path) -> None:
    """iter_segment(verify_records=True) reports a record whose own checksum fails inside a batch whose digest matches."""
    from blake3 import blake3

    batch = bytearray(encode_batch([rec(1), rec(2)]))
    batch[-1] ^= 0xFF  # the last record's checksum: a writer bug, not disk damage
    payload = bytes(batch[BATCH_HEADER_SIZE:])
    fixed = struct.pack("<8sII16s", ck.BATCH_MAGIC, len(payload), 2, blake3(payload).digest(16))
    seg = tmp_path / "w.amlog"
    seg.write_bytes(ck.file_header() + fixed + blake3(fixed).digest(8) + payload)
    items = list(iter_segment(seg))
    assert [type(i) for i in items] == [RecordInfo, BadSpan]
    assert [type(i) for i in iter_segment(seg, verify_records=False)] == [RecordInfo, RecordInfo]
    assert load_paths([seg]).table == {rec(1).key: rec(1).value, rec(2).key: rec(2).value}


async def test_eager_create(tmp_path: Path) -> None:
    """create(lazy=False) makes the locked segment at once, or raises CheckpointError."""
    w = await SegmentWriter.create(tmp_path / "ck", lazy=False)
    assert w.path is not None and w.path.exists() and is_segment_in_use(w.path)
    await w.close()
    assert load_paths([tmp_path / "ck"]).errors == []
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError):
        await SegmentWriter.create(tmp_path / "file" / "ck", lazy=False)


async def test_stamp_places_a_segment_in_load_order(tmp_path: Path) -> None:
    """A writer given an older segment's stamp sorts before newer segments (for compaction)."""
    old = await write_segment(tmp_path, [[rec(1, b"old")]])
    await write_segment(tmp_path, [[rec(1, b"new")]])
    stamp = ck.segment_stamp(old)
    assert stamp is not None and ck.segment_stamp(tmp_path / "x.txt") is None
    w = await SegmentWriter.create(tmp_path, stamp=stamp)
    await w.write_batch([rec(1, b"compacted")], fsync=False)
    await w.close()
    old.unlink()
    assert load_paths([tmp_path]).table[rec(1).key] == b"new"
    with pytest.raises(ValueError):
        await SegmentWriter.create(tmp_path, stamp="a-b")


# ---------------------------------------------------------------- sliced encoding


def _mixed(n: int, size: int = 40) -> list[Record]:
    """``n`` records of small values of varied sizes (a drain chunk's worth)."""
    return [rec(i, bytes([i % 251]) * (i * 7 % size), klen=4 + 4 * (i % 8)) for i in range(n)]


async def test_many_small_records_encode_on_the_loop_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain chunk (4,096 small records) is packed on the loop, which runs between
    slices, into the very bytes encode_batch makes; no worker thread encodes it."""
    records = _mixed(4096)
    in_thread: list[int] = []
    real_encode = ck._encode

    def spy(*args: Any, **kwargs: Any) -> Any:
        in_thread.append(1)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(ck, "_encode", spy)
    w = await SegmentWriter.create(tmp_path)
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    await w.write_batch(records, fsync=True)
    done = True
    await t
    await w.close()
    assert in_thread == []
    # one turn of the loop per slice at least (the write's thread hop adds more)
    assert ticks - before >= 4096 // ck._ENCODE_SLICE_RECORDS
    assert w.path is not None
    assert w.path.read_bytes() == ck.file_header() + encode_batch(records)
    assert load_paths([w.path]).table == {r.key: r.value for r in records}


async def test_slices_also_end_at_a_byte_budget(tmp_path: Path) -> None:
    """Values just under the large-value size: a slice ends after ~64 KiB, not 64 records."""
    records = [rec(i, b"m" * (ck.LARGE_VALUE_MIN - 100)) for i in range(200)]  # ~3 MiB
    w = await SegmentWriter.create(tmp_path)
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    await w.write_batch(records, fsync=False)
    done = True
    await t
    await w.close()
    per_slice = ck._ENCODE_SLICE_BYTES // (ck.LARGE_VALUE_MIN - 100) + 1
    assert ticks - before >= 200 // per_slice
    assert w.path is not None
    assert w.path.read_bytes() == ck.file_header() + encode_batch(records)


async def test_a_bad_record_deep_in_a_sliced_batch_writes_nothing(tmp_path: Path) -> None:
    """The 3,000th of 4,096 records has a str value: TypeError, the segment stays empty,
    and the good records written next load whole."""
    records = _mixed(4096)
    bad = list(records)
    bad[3000] = Record(b"bad-key", "text", "f", 1.0)  # type: ignore[arg-type]
    w = await SegmentWriter.create(tmp_path)
    with pytest.raises(TypeError, match=r"Record\.value must be bytes"):
        await w.write_batch(bad, fsync=False)
    assert w.records_written == 0
    await w.write_batch(records, fsync=False)
    await w.close()
    assert w.path is not None
    assert w.path.read_bytes() == ck.file_header() + encode_batch(records)


async def test_big_batches_of_small_values_still_go_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the sliced limit (in all value bytes), or with a large value, a worker thread encodes."""
    calls: list[int] = []
    real_encode = ck._encode

    def spy(records: Any, **kwargs: Any) -> Any:
        calls.append(len(records))
        return real_encode(records, **kwargs)

    monkeypatch.setattr(ck, "_encode", spy)
    many = [rec(10**6 + i, b"s" * 8000) for i in range(ck._SLICED_ENCODE_LIMIT // 8000 + 2)]
    one_large = [*_mixed(1000), rec(5000, b"L" * ck.LARGE_VALUE_MIN)]
    w = await SegmentWriter.create(tmp_path)
    await w.write_batch(many, fsync=False)
    await w.write_batch(one_large, fsync=False)
    await w.close()
    assert calls == [len(many), len(one_large)]
    assert w.path is not None
    table = load_paths([w.path]).table
    assert table.keys() == {r.key for r in [*many, *one_large]}  # the large value: a reference
    assert all(table[r.key] == r.value for r in many)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 2000), min_size=513, max_size=1500),
    payload_limit=st.sampled_from([None, 4096, 100_000]),
)
def test_sliced_encoding_is_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int], payload_limit: int | None
) -> None:
    """Whatever the record sizes (and batch splits), the sliced path writes encode_batch's bytes."""
    records = [rec(i, bytes([i % 256]) * n) for i, n in enumerate(sizes)]
    assert sum(sizes) <= ck._SLICED_ENCODE_LIMIT  # the sliced path, not the thread
    with monkeypatch.context() as m:
        if payload_limit is not None:
            m.setattr(ck, "MAX_BATCH_PAYLOAD", payload_limit)

        async def write() -> Path:
            w = await SegmentWriter.create(tmp_path / f"s{len(list(tmp_path.iterdir()))}")
            await w.write_batch(records, fsync=False)
            await w.close()
            assert w.path is not None
            return w.path

        path = asyncio.run(write())
        assert path.read_bytes() == ck.file_header() + encode_batch(records)


def test_common_records_encode_as_every_other() -> None:
    """The common record's short path gives the bytes of the general one (format unchanged)."""
    import msgpack

    packer = msgpack.Packer(use_bin_type=True)
    key = bytes(range(32))
    for version, expiry in ((3, False), (4, False), (4, True)):
        for expires in (1_900_000_000, 12.0, float("inf")):
            if version == 4 and not expiry and expires != float("inf"):
                continue  # format 4 lays such a record out with expiries only
            common = Record(key, b"\x01", "m.f", 1.5, b"\x92\x90\x80", float(expires))
            # an int (or an inf given as such): checked field by field
            general = Record(key, b"\x01", "m.f", 1.5, b"\x92\x90\x80", expires)
            want = ck._record_bytes(packer, general, None, version, expiry)
            assert ck._record_bytes(packer, common, None, version, expiry) == want
            assert ck._record_bytes(packer, common, b"\xc1" + bytes(35), version, expiry) != want
    with pytest.raises(ValueError, match="without expiries"):
        ck._record_bytes(packer, Record(key, b"x", "m.f", 1.5, b"", 12.0), None, 4, False)
    batch = [rec(i) for i in range(5)]
    assert ck._encode(batch, large_values=False) == ck._encode(batch)
    with pytest.raises(TypeError):
        ck._record_bytes(packer, Record(key, bytearray(b"x"), "m.f", 1.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ck._record_bytes(packer, Record(key, b"x", "m.f", 1.5, b"", float("nan")))


def test_record_is_a_frozen_dataclass_with_its_own_fast_init() -> None:
    """Record's hand-written __init__ gives what the generated one gave."""
    import dataclasses
    import math

    r = Record(b"k" * 32, b"v", "m.f", 1.5)
    assert (r.digests, r.expires) == (b"", math.inf)
    assert r == Record(key=b"k" * 32, value=b"v", func="m.f", time=1.5, digests=b"", expires=math.inf)
    assert hash(r) == hash(Record(b"k" * 32, b"v", "m.f", 1.5))
    assert r != Record(b"k" * 32, b"v", "m.f", 1.5, expires=9.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.value = b"w"  # type: ignore[misc]
    assert dataclasses.replace(r, value=b"w").value == b"w"
    assert [f.name for f in dataclasses.fields(r)] == [
        "key", "value", "func", "time", "digests", "expires"
    ]
    assert pickle.loads(pickle.dumps(r)) == r
    assert repr(r).startswith("Record(key=b'kkkk")
    with pytest.raises(TypeError):
        Record(b"k", b"v")  # type: ignore[call-arg]
