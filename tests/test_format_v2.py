"""Segment format 2: large values in value frames, an index that loads without them."""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomemo import CorruptCheckpointError, Memoizer, _cli, _codec
from aiomemo import _checkpoint as ck
from aiomemo._checkpoint import (
    LARGE_VALUE_MIN,
    VALUE_HEADER_SIZE,
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
from aiomemo._hashing import hash_task
from aiomemo.stores import Record
from helpers import mk

BIG = 100 * 1024


def big(i: int, n: int = BIG) -> bytes:
    """A distinct value of ``n`` bytes for ``i``."""
    return (i.to_bytes(4, "big") * (n // 4 + 1))[:n]


def rec(i: int, value: bytes) -> Record:
    return Record(i.to_bytes(4, "big") * 8, value, f"m.f{i % 3}", 1.7e9 + i, b"")


def seg(tmp: Path, records: list[Record], *, name: str = "seg-1.amlog", batch: int = 3) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / name
    parts = [encode_batch(records[i : i + batch]) for i in range(0, len(records), batch)]
    p.write_bytes(file_header() + b"".join(parts))
    return p


def mixed(n: int = 12) -> list[Record]:
    return [rec(i, big(i) if i % 2 else b"small%d" % i) for i in range(n)]


def refs_of(path: Path) -> dict[bytes, ValueRef]:
    t = load_paths([path]).table
    return {k: v for k, v in t.items() if isinstance(v, ValueRef)}


class TestEncodeAndLoad:
    def test_large_values_leave_the_index(self, tmp_path: Path) -> None:
        """Large values load as ValueRefs that read back exactly; small ones stay inline."""
        records = mixed()
        p = seg(tmp_path, records)
        r = load_paths([p])
        assert r.errors == [] and r.records == len(records)
        for x in records:
            got = r.table[x.key]
            if len(x.value) >= LARGE_VALUE_MIN:
                assert isinstance(got, ValueRef) and got.length == len(x.value)
                assert read_value(got) == x.value
            else:
                assert got == x.value

    def test_threshold_edge(self, tmp_path: Path) -> None:
        """A value of LARGE_VALUE_MIN - 1 bytes is inline, one of LARGE_VALUE_MIN is framed."""
        p = seg(tmp_path, [rec(1, big(1, LARGE_VALUE_MIN - 1)), rec(2, big(2, LARGE_VALUE_MIN))])
        t = load_paths([p]).table
        assert type(t[rec(1, b"").key]) is bytes
        assert isinstance(t[rec(2, b"").key], ValueRef)

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        sizes=st.lists(
            st.sampled_from([0, 1, 100, LARGE_VALUE_MIN - 1, LARGE_VALUE_MIN, 70_000]),
            min_size=1,
            max_size=12,
        ),
        batch=st.integers(1, 5),
    )
    def test_round_trip_any_mix(self, tmp_path: Path, sizes: list[int], batch: int) -> None:
        """Any mix of sizes and batchings loads back every value, later records winning."""
        records = [rec(i % 7, big(i, n)) for i, n in enumerate(sizes)]
        p = seg(tmp_path / os.urandom(4).hex(), records, batch=batch)
        r = load_paths([p])
        want = {x.key: x.value for x in records}
        assert r.errors == [] and set(r.table) == set(want)
        for k, v in r.table.items():
            assert (read_value(v) if isinstance(v, ValueRef) else v) == want[k]
        items = list(iter_segment(p))
        assert all(isinstance(i, RecordInfo) for i in items)
        assert [i.record.value for i in items if isinstance(i, RecordInfo)] == [
            x.value for x in records
        ]

    def test_loading_never_reads_value_bytes(self, tmp_path: Path) -> None:
        """Values zeroed on disk still load as refs (the loader never touched them); reading one then fails."""
        records = mixed()
        p = seg(tmp_path, records)
        refs = refs_of(p)
        data = bytearray(p.read_bytes())
        for ref in refs.values():
            data[ref.offset : ref.offset + ref.length] = bytes(ref.length)
        p.write_bytes(bytes(data))
        r = load_paths([p])
        assert r.errors == [] and r.records == len(records)
        for ref in refs.values():
            with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
                read_value(ref)

    def test_v1_segments_still_load(self, tmp_path: Path) -> None:
        """A version-1 file (every value inline) loads with plain bytes, large values included."""
        records = mixed()
        p = tmp_path / "seg-1.amlog"
        p.write_bytes(file_header(1) + encode_batch(records, large_values=False, version=1))
        assert ck.read_segment_header(p).version == 1
        r = load_paths([p])
        assert r.errors == []
        assert r.table == {x.key: x.value for x in records}

    def test_v1_value_looking_like_a_ref_stays_bytes(self, tmp_path: Path) -> None:
        """In a version-1 file a 33-byte value starting 0xc1 is a value, never a reference."""
        fake = b"\xc1" + bytes(32)
        p = tmp_path / "seg-1.amlog"
        p.write_bytes(file_header(1) + encode_batch([rec(1, fake)], large_values=False, version=1))
        assert load_paths([p]).table == {rec(1, b"").key: fake}

    async def test_writer_writes_v2(self, tmp_path: Path) -> None:
        """SegmentWriter writes format 2 with value frames, across several write_batch calls."""
        w = await SegmentWriter.create(tmp_path)
        records = mixed(8)
        await w.write_batch(records[:3], fsync=True)
        await w.write_batch(records[3:], fsync=True)
        await w.close()
        path = w.path
        assert path is not None and ck.read_segment_header(path).version == ck.FORMAT_VERSION
        t = load_paths([tmp_path]).table
        assert sum(isinstance(v, ValueRef) for v in t.values()) == 4
        assert {k: read_value(v) if isinstance(v, ValueRef) else v for k, v in t.items()} == {
            x.key: x.value for x in records
        }


class TestDamage:
    def _flip(self, p: Path, at: int, value: int | None = None) -> None:
        data = bytearray(p.read_bytes())
        data[at] = data[at] ^ 0xFF if value is None else value
        p.write_bytes(bytes(data))

    def test_bit_flip_in_a_value_loses_only_that_value(self, tmp_path: Path) -> None:
        """A flipped byte inside one value: its read fails, every other record is intact."""
        records = mixed()
        p = seg(tmp_path, records)
        refs = refs_of(p)
        victim = next(iter(refs))
        self._flip(p, refs[victim].offset + 1000)
        r = load_paths([p])
        assert r.errors == [] and r.records == len(records)
        bad = [i for i in iter_segment(p) if isinstance(i, BadSpan)]
        assert len(bad) == 1 and "checksum mismatch" in bad[0].reason and bad[0].lost == 1
        for x in records:
            v = r.table[x.key]
            if x.key == victim:
                with pytest.raises(CorruptCheckpointError):
                    read_value(v)  # type: ignore[arg-type]
            else:
                assert (read_value(v) if isinstance(v, ValueRef) else v) == x.value

    @pytest.mark.parametrize("zeroed", ["header", "header+value"])
    def test_zeroed_value_frame(self, tmp_path: Path, zeroed: str) -> None:
        """A zeroed value frame header costs nothing else: the index around it loads whole."""
        records = mixed()
        p = seg(tmp_path, records, batch=1)
        refs = refs_of(p)
        victim = sorted(refs, key=lambda k: refs[k].offset)[2]
        ref = refs[victim]
        data = bytearray(p.read_bytes())
        start = ref.offset - VALUE_HEADER_SIZE
        end = ref.offset if zeroed == "header" else ref.offset + ref.length
        data[start:end] = bytes(end - start)
        p.write_bytes(bytes(data))
        r = load_paths([p])
        assert set(r.table) == {x.key for x in records}
        for x in records:
            v = r.table[x.key]
            if x.key == victim and zeroed != "header":
                with pytest.raises(CorruptCheckpointError):
                    read_value(v)  # type: ignore[arg-type]
            else:
                assert (read_value(v) if isinstance(v, ValueRef) else v) == x.value

    def test_truncated_in_a_value(self, tmp_path: Path) -> None:
        """A file cut inside a value frame (a torn write) keeps every record before it."""
        records = mixed()
        p = seg(tmp_path, records, batch=1)
        refs = refs_of(p)
        last = max(refs.values(), key=lambda v: v.offset)
        data = p.read_bytes()
        p.write_bytes(data[: last.offset + 500])
        r = load_paths([p])
        kept = [x for x in records if x.key in r.table]
        assert len(kept) == len(records) - 1 and r.errors and "torn tail" in r.errors[0]
        for x in kept:
            v = r.table[x.key]
            assert (read_value(v) if isinstance(v, ValueRef) else v) == x.value

    @pytest.mark.parametrize("seed", range(8))
    def test_random_damage_never_yields_a_wrong_value(self, tmp_path: Path, seed: int) -> None:
        """Random flips anywhere: whatever loads and reads back is exactly what was written."""
        import random

        rnd = random.Random(seed)
        records = mixed(16)
        p = seg(tmp_path, records, batch=rnd.randint(1, 4))
        data = bytearray(p.read_bytes())
        for _ in range(rnd.randint(1, 6)):
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        p.write_bytes(bytes(data))
        want = {x.key: x.value for x in records}
        r = load_paths([p])
        for k, v in r.table.items():
            try:
                got = read_value(v) if isinstance(v, ValueRef) else v
            except CorruptCheckpointError:
                continue
            assert got == want[k]

    def test_vanished_segment_is_an_error_not_a_crash(self, tmp_path: Path) -> None:
        """read_value of a deleted segment raises CorruptCheckpointError naming the file."""
        p = seg(tmp_path, mixed(4))
        ref = next(iter(refs_of(p).values()))
        p.unlink()
        with pytest.raises(CorruptCheckpointError, match="cannot open"):
            read_value(ref)


# ---------------------------------------------------------------- the Memoizer


def value_task(i: int) -> dict[str, Any]:
    return mk(i, func=value_task)


def write_results(d: Path, n: int, size: int) -> dict[int, bytes]:
    """A checkpoint dir holding results of value_task(i) for i < n, each ``size`` bytes."""
    vals = {i: big(i, size) for i in range(n)}
    records = [
        Record(hash_task(value_task(i)), _codec.encode(v), "m.value_task", 1.7e9)
        for i, v in vals.items()
    ]
    seg(d, records, batch=4)
    return vals


class TestMemoizer:
    async def test_hits_read_from_disk_within_the_limit(self, tmp_path: Path) -> None:
        """Every hit is correct; held bytes never pass memory_limit; reads are counted."""
        vals = write_results(tmp_path / "ck", 20, BIG)
        limit = 3 * BIG + 1000
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run", memory_limit=limit
        ) as memo:
            s = memo.stats()
            assert s.entries == 20 and s.bytes_held == 0 and s.bytes_on_disk > 20 * BIG
            for _ in range(2):
                for i, v in vals.items():
                    fut = await memo.check_memo(value_task(i))
                    assert fut is not None and fut.result() == v
                    assert memo.stats().bytes_held <= limit
            s = memo.stats()
            assert s.hits == 40 and s.disk_reads == 40 and s.load_errors == 0
            # the most recent ones are held: hitting them again reads nothing
            fut = await memo.check_memo(value_task(19))
            assert fut is not None and fut.result() == vals[19]
            assert memo.stats().disk_reads == 40

    @pytest.mark.parametrize("limit", [None, 3 * BIG + 1000])
    async def test_bytes_on_disk_is_kept_not_scanned(self, tmp_path: Path, limit: int | None) -> None:
        """stats().bytes_on_disk equals a scan of the index after every kind of change."""
        write_results(tmp_path / "ck", 12, BIG)

        def scan(memo: Memoizer) -> int:
            return sum(v.length for v in memo._table.loaded.values() if type(v) is ValueRef)

        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")],
            run_dir=tmp_path / "run",
            config_run_dir=tmp_path,
            checkpoint_mode="task_exit",
            memory_limit=limit,
        ) as memo:
            assert memo.stats().bytes_on_disk == scan(memo) > 12 * BIG
            for i in range(4):  # hits: read back (held, or moved to done without a limit)
                fut = await memo.check_memo(value_task(i))
                assert fut is not None
                assert memo.stats().bytes_on_disk == scan(memo)
            await memo.forget(value_task(5))  # forgotten: out of the index
            assert memo.stats().bytes_on_disk == scan(memo)
            for i in range(100, 104):  # this run's results, durable: spilled to disk (a limit)
                t = value_task(i)
                assert await memo.check_memo(t) is None
                await memo.update_memo_result(t, big(i))
            assert memo.stats().bytes_on_disk == scan(memo)
            # a value gone bad under the index: a miss, out of the index
            victim = memo._table.loaded[hash_task(value_task(7))]
            assert type(victim) is ValueRef
            with open(victim.path, "r+b") as f:
                f.seek(victim.offset + 10)
                f.write(b"\xff" * 8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                assert await memo.check_memo(value_task(7)) is None
            assert memo.stats().bytes_on_disk == scan(memo)
            # a second load over the first: replaced references are not counted twice
            write_results(tmp_path / "ck2", 12, BIG)
            await memo.load_checkpoints([str(tmp_path / "ck2")])
            assert memo.stats().bytes_on_disk == scan(memo) > 0

    async def test_same_object_while_held(self, tmp_path: Path) -> None:
        """Concurrent hits share one read and one object; so do hits while it is held."""
        write_results(tmp_path / "ck", 2, BIG)
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run"
        ) as memo:
            futs = await asyncio.gather(*(memo.check_memo(value_task(0)) for _ in range(5)))
            objs = {id(f.result()) for f in futs if f is not None}
            assert len(objs) == 1 and memo.stats().disk_reads == 1
            again = await memo.check_memo(value_task(0))
            assert again is not None and id(again.result()) in objs

    async def test_reads_run_in_one_reader_thread(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every read for the event loop runs in the table's one reader thread; close ends it."""
        import threading

        from aiomemo import _table

        vals = write_results(tmp_path / "ck", 8, BIG)
        threads: set[str] = set()
        real = _table._read_decode

        def spy(ref: ValueRef) -> Any:
            threads.add(threading.current_thread().name)
            return real(ref)

        monkeypatch.setattr(_table, "_read_decode", spy)
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run", memory_limit=BIG
        ) as memo:
            futs = await asyncio.gather(*(memo.check_memo(value_task(i)) for i in vals))
            assert [f.result() if f else None for f in futs] == list(vals.values())
            assert memo.stats().disk_reads == 8
            reader = memo._table._reader
            assert reader is not None
        assert len(threads) == 1 and next(iter(threads)).startswith("aiomemo-read")
        assert memo._table._reader is None
        reader._thread.join(timeout=5)
        assert not reader._thread.is_alive()

    async def test_heap_trimmed_after_large_spills(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Once TRIM_AFTER bytes of spilled or evicted values were let go of, the heap is trimmed."""
        from aiomemo import _table

        calls: list[int] = []
        monkeypatch.setattr(_table, "_trim", lambda: calls.append(1))
        monkeypatch.setattr(_table, "TRIM_AFTER", 3 * BIG)
        async with Memoizer(
            run_dir=tmp_path / "run",
            config_run_dir=tmp_path,
            checkpoint_mode="task_exit",
            memory_limit=2 * BIG,
        ) as memo:
            for i in range(9):
                t = value_task(i)
                assert await memo.check_memo(t) is None
                await memo.update_memo_result(t, big(i))
            n = len(calls)
            # 9 spills of BIG (plus evictions): at least one trim per 3 * BIG let go of
            assert 3 <= n <= 9
            for i in range(9):
                fut = await memo.check_memo(value_task(i))
                assert fut is not None and fut.result() == big(i)

    def test_trim_is_harmless(self) -> None:
        """The real trim (glibc's malloc_trim, or nothing elsewhere) can be called at any time."""
        from aiomemo import _table

        _table._trim()

    async def test_unbounded_keeps_everything(self, tmp_path: Path) -> None:
        """memory_limit=None: a value read once moves into the memo for good."""
        write_results(tmp_path / "ck", 3, BIG)
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run", memory_limit=None
        ) as memo:
            a = await memo.check_memo(value_task(1))
            b = await memo.check_memo(value_task(1))
            assert a is not None and b is not None and a.result() is b.result()
            assert memo.stats().disk_reads == 1

    async def test_damaged_or_vanished_value_is_a_miss(self, tmp_path: Path) -> None:
        """A value failing its checksum is a miss, counted, warned once; the others still hit."""
        vals = write_results(tmp_path / "ck", 6, BIG)
        (p,) = (tmp_path / "ck").iterdir()
        refs = sorted(refs_of(p).values(), key=lambda v: v.offset)
        data = bytearray(p.read_bytes())
        for ref in refs[:2]:
            data[ref.offset + 10] ^= 0xFF
        p.write_bytes(bytes(data))
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run"
        ) as memo:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcomes = [await memo.check_memo(value_task(i)) for i in vals]
            assert sum(f is None for f in outcomes) == 2
            for i, f in zip(vals, outcomes, strict=True):
                assert f is None or f.result() == vals[i]
            assert len([w for w in caught if "could not be read back" in str(w.message)]) == 1
            s = memo.stats()
            assert s.load_errors == 2 and s.misses == 2
            p.unlink()  # gone (e.g. compacted away): a miss, no exception
            held = {i for i, f in zip(vals, outcomes, strict=True) if f is not None}
            memo._table.bodies.clear()  # forget what is held: the next hits read again
            memo._table.held = 0
            for i in held:
                assert await memo.check_memo(value_task(i)) is None

    @pytest.mark.parametrize("mode", ["task_exit", "periodic", "manual"])
    async def test_results_of_this_run_leave_memory_once_durable(
        self, tmp_path: Path, mode: str
    ) -> None:
        """Produced results stay in memory until checkpointed, then only the limit's worth does."""
        limit = 2 * BIG + 1000
        kw: dict[str, Any] = {"checkpoint_period": 3600} if mode == "periodic" else {}
        async with Memoizer(
            run_dir=tmp_path / "run",
            config_run_dir=tmp_path,
            checkpoint_mode=mode,  # type: ignore[arg-type]
            memory_limit=limit,
            **kw,
        ) as memo:
            vals = {i: big(i) for i in range(10)}
            for i, v in vals.items():
                t = value_task(i)
                assert await memo.check_memo(t) is None
                await memo.update_memo_result(t, v)
            if mode != "task_exit":
                assert len(memo._table.done) == 10  # not durable yet: all held
                await memo.checkpoint()
            assert len(memo._table.done) == 0
            assert memo.stats().bytes_held <= limit and memo.stats().bytes_on_disk >= 10 * BIG
            last = await memo.check_memo(value_task(9))
            assert last is not None and last.result() is vals[9]  # still held: same object
            for i, v in vals.items():
                fut = await memo.check_memo(value_task(i))
                assert fut is not None and fut.result() == v
            assert memo.stats().disk_reads >= 7

    async def test_unbounded_run_keeps_its_results(self, tmp_path: Path) -> None:
        """memory_limit=None: results this run produced stay in memory (the same objects)."""
        async with Memoizer(
            run_dir=tmp_path / "run",
            config_run_dir=tmp_path,
            checkpoint_mode="task_exit",
            memory_limit=None,
        ) as memo:
            v = big(1)
            t = value_task(1)
            assert await memo.check_memo(t) is None
            await memo.update_memo_result(t, v)
            fut = await memo.check_memo(value_task(1))
            assert fut is not None and fut.result() is v and memo.stats().disk_reads == 0

    @pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB"])
    def test_memory_limit_is_checked(self, bad: Any) -> None:
        """memory_limit must be a non-negative int or None."""
        with pytest.raises(ValueError, match="memory_limit"):
            Memoizer(memory_limit=bad)


# ---------------------------------------------------------------- tools


def test_verify_reports_a_damaged_value(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """aiomemo verify reads every value back: a damaged one is a finding (exit 1)."""
    write_results(tmp_path / "ck", 4, BIG)
    assert _cli.main(["verify", str(tmp_path / "ck"), "--json"]) == 0
    capsys.readouterr()
    (p,) = (tmp_path / "ck").iterdir()
    ref = next(iter(refs_of(p).values()))
    data = bytearray(p.read_bytes())
    data[ref.offset + 5] ^= 0xFF
    p.write_bytes(bytes(data))
    code = _cli.main(["verify", str(tmp_path / "ck"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["lost_records"] == 1


def test_compact_keeps_large_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """compact rewrites a v2 directory into one v2 segment whose values all read back."""
    d = tmp_path / "ck"
    vals = write_results(d, 6, BIG)
    write_results_second = {i: big(i + 100, BIG) for i in range(3)}
    seg(
        d,
        [
            Record(hash_task(value_task(i)), _codec.encode(v), "m.value_task", 1.8e9)
            for i, v in write_results_second.items()
        ],
        name="seg-2.amlog",
    )
    vals.update(write_results_second)
    assert _cli.main(["compact", str(d), "--json"]) == 0
    capsys.readouterr()
    segs = list(ck.list_segments(d))
    assert len(segs) == 1 and ck.read_segment_header(segs[0]).version == ck.FORMAT_VERSION
    t = load_paths([d]).table
    assert len(t) == 6
    for i, v in vals.items():
        enc = t[hash_task(value_task(i))]
        assert isinstance(enc, ValueRef)
        assert _codec.decode(read_value(enc)) == v


def test_compact_streams_and_refuses_a_damaged_value(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A damaged value stops compact (nothing replaced) unless --drop-damaged leaves it out."""
    d = tmp_path / "ck"
    vals = write_results(d, 5, BIG)
    (p,) = d.iterdir()
    victim = min(refs_of(p).values(), key=lambda v: v.offset)
    data = bytearray(p.read_bytes())
    data[victim.offset + 7] ^= 0xFF
    p.write_bytes(bytes(data))
    before = p.read_bytes()
    assert _cli.main(["compact", str(d)]) == 1
    capsys.readouterr()
    assert list(d.iterdir()) == [p] and p.read_bytes() == before
    assert _cli.main(["compact", str(d), "--drop-damaged"]) == 0
    capsys.readouterr()
    t = load_paths([d]).table
    assert len(t) == 4
    for i, v in vals.items():
        enc = t.get(hash_task(value_task(i)))
        if enc is not None:
            assert isinstance(enc, ValueRef) and _codec.decode(read_value(enc)) == v


def test_inspect_does_not_read_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """inspect reports value bytes from the index: zeroed values do not change it."""
    d = tmp_path / "ck"
    write_results(d, 3, BIG)
    assert _cli.main(["inspect", str(d), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    (p,) = d.iterdir()
    data = bytearray(p.read_bytes())
    for ref in refs_of(p).values():
        data[ref.offset : ref.offset + ref.length] = bytes(ref.length)
    p.write_bytes(bytes(data))
    assert _cli.main(["inspect", str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first
