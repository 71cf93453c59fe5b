"""Reading large values back: straight into the result, verified, and safe under abuse."""

from __future__ import annotations

import asyncio
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomemo import CorruptCheckpointError, Memoizer, MemoizerUsageError, _codec
from aiomemo._checkpoint import (
    LARGE_VALUE_MIN,
    ValueRef,
    encode_batch,
    file_header,
    load_paths,
    read_value_with,
)
from aiomemo._hashing import hash_task
from aiomemo._table import _read_decode
from aiomemo.stores import Record
from helpers import mk, run

MIB = 1 << 20


def _flip(ref: ValueRef, at: int) -> None:
    """Flip one bit of the byte ``at`` bytes into the value ``ref`` stands for, on disk."""
    with open(ref.path, "r+b") as f:
        f.seek(ref.offset + at)
        b = f.read(1)
        f.seek(ref.offset + at)
        f.write(bytes([b[0] ^ 0x40]))


def _segment(tmp: Path, values: list[Any], name: str = "seg-1.amlog") -> list[ValueRef]:
    """A format-2 segment holding ``values`` (encoded); the refs of the large ones, in order."""
    tmp.mkdir(parents=True, exist_ok=True)
    records = [
        Record(i.to_bytes(4, "big") * 8, _codec.encode(v), "m.f", 1.7e9, b"")
        for i, v in enumerate(values)
    ]
    path = tmp / name
    path.write_bytes(file_header() + encode_batch(records))
    table = load_paths([path]).table
    return [ref for r in records if isinstance(ref := table[r.key], ValueRef)]


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return bool(
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
            and a.flags.writeable
            and a.flags.c_contiguous
        )
    return bool(a == b)


def _flat_values(n: int) -> list[Any]:
    raw = bytes(range(256)) * (n // 256 + 1)
    return [
        raw[:n],
        bytearray(raw[:n]),
        np.frombuffer(raw[: n // 32 * 32], dtype="<f8").reshape(-1, 4),
        np.arange(n // 4, dtype=">i4"),
        np.frombuffer(raw[: n // 4 * 4], dtype="<u2").reshape(2, -1),
        np.array([b"ab", b"\x00c"] * (n // 4), dtype="|S2"),
        np.array(["xyz"] * (n // 12 + 1), dtype="<U3"),
        np.frombuffer(bytes([0, 1]) * (n // 2), dtype="|b1"),
        np.zeros((3, n // 24 + 1), dtype="<c16").T,  # Fortran order: decoded C order
    ]


class TestDirectRead:
    """Flat results (bytes, bytearray, numpy arrays) read straight into the result object."""

    @pytest.mark.parametrize("n", [LARGE_VALUE_MIN - 6, LARGE_VALUE_MIN, 70_000, 1 << 20])
    def test_equal_to_decode(self, tmp_path: Path, n: int) -> None:
        """Every flat type at sizes around the frame threshold reads back as decode() makes it."""
        values = _flat_values(n)
        refs = _segment(tmp_path, values)
        enc = {len(_codec.encode(v)) for v in values}
        assert refs, enc
        large = [v for v in values if len(_codec.encode(v)) >= LARGE_VALUE_MIN]
        assert len(refs) == len(large)
        for v, ref in zip(large, refs, strict=True):
            got = _read_decode(ref)
            want = _codec.decode(read_value_with(ref, bytes))  # type: ignore[arg-type]
            assert _same(got, want), (type(v), n)
            if isinstance(v, np.ndarray):
                assert _same(got, np.ascontiguousarray(v))

    def test_direct_path_taken_without_decode(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """bytes/bytearray/ndarray never go through decode(); a tuple does."""
        values: list[Any] = [b"x" * 50_000, bytearray(50_000), np.ones(10_000), (b"y" * 50_000,)]
        refs = _segment(tmp_path, values)
        calls: list[int] = []
        real = _codec.decode

        def counting(data: Any) -> object:
            calls.append(len(data))
            return real(data)

        monkeypatch.setattr(_codec, "decode", counting)
        got = [_read_decode(r) for r in refs]
        assert len(calls) == 1  # the tuple only
        assert got[0] == values[0] and type(got[0]) is bytes
        assert got[1] == values[1] and type(got[1]) is bytearray
        assert _same(got[2], values[2])
        assert got[3] == values[3]

    def test_bytearray_result_is_resizable(self, tmp_path: Path) -> None:
        """No view of a bytearray result is left behind (it can grow like any other)."""
        (ref,) = _segment(tmp_path, [bytearray(b"z" * 40_000)])
        got = _read_decode(ref)
        got.extend(b"more")
        assert len(got) == 40_004

    @pytest.mark.parametrize("where", ["head", "middle", "last"])
    @pytest.mark.parametrize("kind", [0, 1, 2])
    def test_damage_is_an_error_never_a_value(self, tmp_path: Path, where: str, kind: int) -> None:
        """A flipped byte anywhere in a flat value (its header included) fails the checksum."""
        value = _flat_values(60_000)[kind]
        (ref,) = _segment(tmp_path, [value])
        at = {"head": 0, "middle": ref.length // 2, "last": ref.length - 1}[where]
        _flip(ref, at)
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            _read_decode(ref)

    @pytest.mark.parametrize("where", ["head", "past the head", "middle", "last"])
    @pytest.mark.parametrize("kind", ["bytes", "bytearray", "ndarray", "decoded"])
    def test_damage_anywhere_in_a_big_value(
        self, tmp_path: Path, where: str, kind: str
    ) -> None:
        """A multi-megabyte value, flat or decoded: a flipped byte anywhere fails the checksum."""
        n = 3 * MIB // 2 + 12_345
        value: Any = {
            "bytes": _flat_values(n)[0],
            "bytearray": _flat_values(n)[1],
            "ndarray": _flat_values(n)[3],
            "decoded": (b"q" * n,),
        }[kind]
        (ref,) = _segment(tmp_path, [value])
        assert _same(_read_decode(ref), value)
        at = {
            "head": 1,
            "past the head": 1500,
            "middle": ref.length // 2,
            "last": ref.length - 1,
        }[where]
        _flip(ref, at)
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            _read_decode(ref)

    def test_big_bytes_result_is_an_ordinary_bytes(self, tmp_path: Path) -> None:
        """A large bytes result is a bytes like any other (hash, slices, equality)."""
        n = 2 * MIB + 7
        want = _flat_values(n)[0]
        (ref,) = _segment(tmp_path, [want])
        got = _read_decode(ref)
        assert type(got) is bytes and got == want and got is not want
        assert hash(got) == hash(want) and got[-7:] == want[-7:]
        assert {got: 1}[want] == 1

    def test_short_reads_are_resumed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A read that returns less than asked for (a signal, a pipe-like file) goes on where it stopped."""
        import os

        n = MIB + 1001
        values: list[Any] = [_flat_values(n)[0], _flat_values(n)[1], (b"s" * n,)]
        refs = _segment(tmp_path, values)
        real_preadv, real_pread = os.preadv, os.pread

        def short_v(fd: int, buffers: list[Any], offset: int) -> int:
            return real_preadv(fd, [memoryview(buffers[0])[:4093]], offset)

        def short(fd: int, n: int, offset: int) -> bytes:
            return real_pread(fd, min(n, 4093), offset)

        monkeypatch.setattr(os, "preadv", short_v)
        monkeypatch.setattr(os, "pread", short)
        for v, ref in zip(values, refs, strict=True):
            assert _same(_read_decode(ref), v)

    def test_truncated_and_vanished(self, tmp_path: Path) -> None:
        """Cut short or deleted: a CorruptCheckpointError naming the segment, no buffer made for it."""
        refs = _segment(tmp_path, [b"a" * 50_000, np.ones(9_000)])
        with open(refs[1].path, "r+b") as f:
            f.truncate(refs[1].offset + 100)
        with pytest.raises(CorruptCheckpointError, match="cut short"):
            _read_decode(refs[1])
        assert _read_decode(refs[0]) == b"a" * 50_000
        Path(refs[0].path).unlink()
        with pytest.raises(CorruptCheckpointError, match="cannot open"):
            _read_decode(refs[0])

    def test_header_that_does_not_add_up_goes_to_decode(self) -> None:
        """A bin/ext header whose length disagrees with the value's: no direct plan (decode judges)."""
        enc = _codec.encode(b"q" * 70_000)
        assert _codec.direct_target(enc[:1024], len(enc)) is not None
        assert _codec.direct_target(enc[:1024], len(enc) + 1) is None
        assert _codec.direct_target(enc[:1024], len(enc) - 1) is None
        arr = _codec.encode(np.ones(10_000))
        assert _codec.direct_target(arr[:1024], len(arr)) is not None
        assert _codec.direct_target(arr[:1024], len(arr) - 8) is None
        assert _codec.direct_target(arr[:5], len(arr)) is None  # header not all there
        assert _codec.direct_target(b"", 0) is None
        # a numpy header decode() refuses (object dtype): decode says why
        bad = bytearray(arr)
        i = bad.index(b"<f8")
        bad[i : i + 3] = b"|O8"
        assert _codec.direct_target(bytes(bad[:1024]), len(bad)) is None
        with pytest.raises(_codec.CodecError):
            _codec.decode(bytes(bad))

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        kind=st.sampled_from(["bytes", "bytearray", "f8", "i2", "S3", "U2", "b1"]),
        n=st.integers(min_value=LARGE_VALUE_MIN - 64, max_value=200_000),
        dims=st.integers(min_value=1, max_value=3),
    )
    def test_property_direct_equals_decode(
        self, tmp_path_factory: pytest.TempPathFactory, kind: str, n: int, dims: int
    ) -> None:
        """For any flat value around and above the threshold: the direct read equals decode()."""
        raw = bytes((i * 7 + n) & 0xFF for i in range(n))
        v: Any
        if kind == "bytes":
            v = raw
        elif kind == "bytearray":
            v = bytearray(raw)
        else:
            dt = np.dtype(kind)
            count = n // dt.itemsize
            if kind == "U2":
                v = np.array([chr(65 + i % 26) * 2 for i in range(count)], dtype=dt)
            else:
                v = np.frombuffer(raw[: count * dt.itemsize], dtype=dt)
            if dims > 1 and count % 2 == 0:
                v = v.reshape(2, -1) if dims == 2 else v.reshape(2, 1, -1)
        refs = _segment(tmp_path_factory.mktemp("p"), [v])
        if len(_codec.encode(v)) < LARGE_VALUE_MIN:
            assert refs == []
            return
        (ref,) = refs
        assert _same(_read_decode(ref), _codec.decode(_codec.encode(v)))


# ---------------------------------------------------------------- load_checkpoints mapping

BIG = 100 * 1024


def value_task(i: int) -> dict[str, Any]:
    return mk(i, func=value_task)


def write_results(d: Path, n: int, size: int = BIG) -> dict[int, bytes]:
    """A checkpoint dir holding the results of value_task(i) for i < n, each ``size`` bytes."""
    vals = {i: (i.to_bytes(4, "big") * (size // 4 + 1))[:size] for i in range(n)}
    records = [
        Record(hash_task(value_task(i)), _codec.encode(v), "m.value_task", 1.7e9)
        for i, v in vals.items()
    ]
    d.mkdir(parents=True, exist_ok=True)
    (d / "seg-1.amlog").write_bytes(
        file_header() + b"".join(encode_batch(records[i : i + 4]) for i in range(0, n, 4))
    )
    return vals


def _key(i: int) -> str:
    return hash_task(value_task(i)).hex()


@pytest.fixture
def reads_in(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The thread names values are read in."""
    from aiomemo import _table

    names: list[str] = []
    real = _table._read_decode

    def spy(ref: ValueRef) -> Any:
        names.append(threading.current_thread().name)
        return real(ref)

    monkeypatch.setattr(_table, "_read_decode", spy)
    return names


class TestLoadCheckpointsMapping:
    async def test_on_the_loop_values_on_disk_come_pending(
        self, tmp_path: Path, reads_in: list[str]
    ) -> None:
        """On the loop a value on disk is a pending Future read in the reader thread, never here."""
        vals = write_results(tmp_path / "ck", 6)
        async with Memoizer(run_dir=tmp_path / "run", memory_limit=2 * BIG) as memo:
            table = await memo.load_checkpoints([tmp_path / "ck"])
            assert len(table) == 6 and reads_in == []
            assert _key(3) in table and "00" * 32 not in table and 7 not in table
            assert reads_in == []  # `in` reads nothing
            futs = {i: table[_key(i)] for i in vals}
            assert not any(f.done() for f in futs.values())
            got = {i: await f for i, f in futs.items()}
            assert got == vals
            assert reads_in and all(n.startswith("aiomemo-read") for n in reads_in)
            assert memo.stats().bytes_held <= 2 * BIG
            # the Memoizer's hits share the same table
            fut = await memo.check_memo(value_task(5))
            assert fut is not None and fut.result() == vals[5]

    async def test_damaged_value_ends_its_future_with_key_error(self, tmp_path: Path) -> None:
        """A value that fails its checksum: awaiting its Future raises KeyError; the others read."""
        vals = write_results(tmp_path / "ck", 3)
        (seg,) = (tmp_path / "ck").iterdir()
        refs = sorted(
            (v for v in load_paths([seg]).table.values() if isinstance(v, ValueRef)),
            key=lambda r: r.offset,
        )
        with open(seg, "r+b") as f:
            f.seek(refs[1].offset + 50)
            f.write(b"\xff\xfe")
        async with Memoizer(run_dir=tmp_path / "run") as memo:
            table = await memo.load_checkpoints([tmp_path / "ck"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outcomes = await asyncio.gather(
                    *(table[_key(i)] for i in vals), return_exceptions=True
                )
        assert sum(isinstance(o, KeyError) for o in outcomes) == 1
        for i, o in zip(vals, outcomes, strict=True):
            assert isinstance(o, KeyError) or o == vals[i]

    async def test_from_a_thread_values_are_read_there(
        self, tmp_path: Path, reads_in: list[str]
    ) -> None:
        """From a thread with no loop, a value on disk is read in that thread and comes done."""
        vals = write_results(tmp_path / "ck", 4)
        async with Memoizer(run_dir=tmp_path / "run", memoize=False) as memo:
            table = await memo.load_checkpoints([tmp_path / "ck"])

            def use() -> dict[int, Any]:
                out = {}
                for i in vals:
                    fut = table[_key(i)]
                    assert fut.done()
                    out[i] = fut.result()
                return out

            assert await asyncio.to_thread(use) == vals
        assert reads_in and not any(n.startswith("aiomemo-read") for n in reads_in)

    async def test_memoize_false_keeps_the_limit(self, tmp_path: Path) -> None:
        """With memoize=False the mapping's private table holds values within memory_limit too."""
        vals = write_results(tmp_path / "ck", 8)
        async with Memoizer(
            run_dir=tmp_path / "run", memoize=False, memory_limit=BIG + 100
        ) as memo:
            table = await memo.load_checkpoints([tmp_path / "ck"])
            for i in vals:
                assert await table[_key(i)] == vals[i]
            own = table._table  # type: ignore[attr-defined]
            assert own.held <= BIG + 100 and len(own.bodies) == 1

    async def test_a_read_makes_room_before_it_reads(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The values a read will displace are let go of before it reads: the limit holds throughout."""
        from aiomemo import _table

        vals = write_results(tmp_path / "ck", 6)
        limit = 2 * BIG + 100
        during: list[tuple[int, int]] = []
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run", memory_limit=limit
        ) as memo:
            table = memo._table
            real = _table._read_decode

            def spy(ref: ValueRef) -> Any:
                during.append((table.held, len(table.bodies)))
                return real(ref)

            monkeypatch.setattr(_table, "_read_decode", spy)
            for i in vals:
                fut = await memo.check_memo(value_task(i))
                assert fut is not None and fut.result() == vals[i]
                assert table.held <= limit
            # each read saw room for its value; from the third on, one value was let go first
            assert all(held + BIG <= limit for held, _ in during)
            assert [n for _, n in during] == [0, 1, 1, 1, 1, 1]
            assert len(table.bodies) == 2
            # the most recent two are the ones held, and hit without a read
            assert await memo.check_memo(value_task(5)) is not None
            assert memo.stats().disk_reads == 6

    async def test_after_close_no_reader_thread_is_left(
        self, tmp_path: Path, reads_in: list[str]
    ) -> None:
        """The mapping still reads after close(), in the loop's default executor: no thread left over."""
        vals = write_results(tmp_path / "ck", 2)
        async with Memoizer(run_dir=tmp_path / "run") as memo:
            table = await memo.load_checkpoints([tmp_path / "ck"])
            assert await table[_key(0)] == vals[0]
        assert memo._table._reader is None
        assert await table[_key(1)] == vals[1]
        assert memo._table._reader is None
        assert reads_in[0].startswith("aiomemo-read") and not reads_in[1].startswith("aiomemo-read")

    def test_from_another_loop_is_a_usage_error(self, tmp_path: Path) -> None:
        """Asked for a value on disk from a second event loop: MemoizerUsageError, not a blocked loop."""
        write_results(tmp_path / "ck", 2)
        memo = Memoizer(run_dir=tmp_path / "run")

        async def first() -> Any:
            await memo.start()
            return await memo.load_checkpoints([tmp_path / "ck"])

        table = asyncio.run(first())

        async def second() -> None:
            with pytest.raises(MemoizerUsageError, match="another event loop"):
                table[_key(0)]

        asyncio.run(second())
        assert table[_key(1)].result() is not None  # no loop here: read in place


# ---------------------------------------------------------------- hostile tries


def _sized(i: int, encoded: int) -> bytes:
    """A bytes result of task i whose encoding is exactly ``encoded`` bytes long."""
    n = encoded - (3 if encoded - 3 < 1 << 16 else 5)
    if encoded - 3 < 256:
        n = encoded - 2
    v = (i.to_bytes(4, "big") * (n // 4 + 1))[:n]
    assert len(_codec.encode(v)) == encoded
    return v


class TestHostile:
    @pytest.mark.parametrize("mode", ["task_exit", "dfk_exit"])
    async def test_values_around_the_frame_threshold_and_empty(
        self, tmp_path: Path, mode: str
    ) -> None:
        """0 bytes, threshold - 1, threshold, threshold + 1: each round-trips through a run and a resume."""
        sizes = [LARGE_VALUE_MIN - 1, LARGE_VALUE_MIN, LARGE_VALUE_MIN + 1, LARGE_VALUE_MIN + 5]
        vals: dict[int, Any] = {i: _sized(i, n) for i, n in enumerate(sizes)}
        vals[len(sizes)] = b""
        vals[len(sizes) + 1] = bytearray()
        vals[len(sizes) + 2] = np.zeros(0)
        vals[len(sizes) + 3] = np.arange(LARGE_VALUE_MIN // 8, dtype="<i8")  # just above
        async with Memoizer(run_dir=tmp_path / "a", checkpoint_mode=mode, memory_limit=0) as memo:
            for i, v in vals.items():
                task = value_task(i)
                assert await memo.check_memo(task) is None
                await memo.update_memo_result(task, v)
        refs = [v for v in load_paths([tmp_path / "a"]).table.values() if isinstance(v, ValueRef)]
        assert sorted(r.length for r in refs) == sorted(
            n for n in map(len, map(_codec.encode, vals.values())) if n >= LARGE_VALUE_MIN
        )
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "a")], run_dir=tmp_path / "b", memory_limit=0
        ) as memo:
            for _ in range(2):
                for i, v in vals.items():
                    fut = await memo.check_memo(value_task(i))
                    assert fut is not None
                    assert _same(fut.result(), v), i
            s = memo.stats()
            assert s.bytes_held == 0 and s.disk_reads == 2 * len(refs)

    async def test_memory_limit_smaller_than_one_value(self, tmp_path: Path) -> None:
        """A value bigger than memory_limit is served on every hit and never held."""
        vals = write_results(tmp_path / "ck", 3)
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run", memory_limit=1000
        ) as memo:
            for _ in range(3):
                for i, v in vals.items():
                    fut = await memo.check_memo(value_task(i))
                    assert fut is not None and fut.result() == v
            s = memo.stats()
            assert s.bytes_held == 0 and s.disk_reads == 9 and s.hits == 9

    async def test_this_run_with_memory_limit_zero(self, tmp_path: Path) -> None:
        """memory_limit=0: results leave memory once durable; later hits read them back."""
        async with Memoizer(
            run_dir=tmp_path / "run", checkpoint_mode="task_exit", memory_limit=0
        ) as memo:
            for i in range(4):
                task = value_task(i)
                assert await memo.check_memo(task) is None
                await memo.update_memo_result(task, b"%d" % i * 30_000)
            assert memo.stats().bytes_held == 0
            for i in range(4):
                fut = await memo.check_memo(value_task(i))
                assert fut is not None and fut.result() == b"%d" % i * 30_000
            assert memo.stats().disk_reads == 4

    async def test_huge_value_past_the_shared_buffer(self, tmp_path: Path) -> None:
        """A 70 MB result (past the 64 MiB reused buffer), flat and inside a tuple, reads back."""
        flat = bytes(range(256)) * (70_000_000 // 256)
        async with Memoizer(run_dir=tmp_path / "a", checkpoint_mode="task_exit") as memo:
            for i, v in enumerate([flat, (flat, 1)]):
                task = value_task(i)
                assert await memo.check_memo(task) is None
                await memo.update_memo_result(task, v)
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "a")], run_dir=tmp_path / "b", memory_limit=0
        ) as memo:
            f0 = await memo.check_memo(value_task(0))
            assert f0 is not None and f0.result() == flat
            del f0
            f1 = await memo.check_memo(value_task(1))
            assert f1 is not None and f1.result() == (flat, 1)

    @pytest.mark.parametrize("how", ["deleted", "compacted"])
    async def test_segment_gone_while_hits_read_it(self, tmp_path: Path, how: str) -> None:
        """Segments deleted or compacted while 40 hits are in flight: each a right value or a miss."""
        from aiomemo._maintenance import compact

        vals = write_results(tmp_path / "ck", 40, 300_000)
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run", memory_limit=0
        ) as memo:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tasks = [value_task(i) for i in vals]
                hits = [asyncio.ensure_future(memo.check_memo(t)) for t in tasks]
                await asyncio.sleep(0)
                if how == "deleted":
                    for p in (tmp_path / "ck").iterdir():
                        p.unlink()
                else:
                    await asyncio.to_thread(compact, tmp_path / "ck")
                outcomes = await asyncio.gather(*hits)
                for i, t, f in zip(vals, tasks, outcomes, strict=True):
                    if f is None:  # a miss: the engine runs it and reports
                        await memo.update_memo_result(t, vals[i])
                    else:
                        assert f.result() == vals[i]
                if how == "deleted":
                    assert any(f is None for f in outcomes)
                # and afterwards: every task answers with its right value
                for i in vals:
                    assert await run(memo, value_task(i), vals[i]) == vals[i]
            s = memo.stats()
            if how == "deleted":  # each value a miss once (held nothing: memory_limit=0)
                assert s.load_errors == len(vals) and s.entries == len(vals)

    async def test_concurrent_hits_from_the_loop_and_threads(self, tmp_path: Path) -> None:
        """One key hit at once by the loop (check_memo), by threads (lookup) and the mapping."""
        vals = write_results(tmp_path / "ck", 2, 500_000)
        async with Memoizer(run_dir=tmp_path / "run", memory_limit=2_000_000) as memo:
            table = await memo.load_checkpoints([tmp_path / "ck"])
            raw = hash_task(value_task(1))

            def from_thread() -> list[Any]:
                return [memo._table.lookup(raw.hex(), raw) for _ in range(5)] + [
                    table[raw.hex()].result() for _ in range(5)
                ]

            threads = [asyncio.to_thread(from_thread) for _ in range(4)]
            loop_hits = [memo.check_memo(value_task(1)) for _ in range(20)]
            mapped = [table[raw.hex()] for _ in range(5)]
            got = await asyncio.gather(*threads, *loop_hits, *mapped)
            flat: list[Any] = [x for part in got[:4] for x in part]
            flat += [f.result() for f in got[4:24]] + got[24:]
            assert len(flat) == 4 * 10 + 20 + 5
            assert all(x == vals[1] for x in flat)
            assert memo.stats().bytes_held <= 2_000_000
            # once held, every caller gets the one object
            held = memo._table.bodies[raw.hex()][0]
            fut = await memo.check_memo(value_task(1))
            assert fut is not None and fut.result() is held
            assert await asyncio.to_thread(lambda: memo._table.lookup(raw.hex(), raw)) is held
            loaded = memo._table.loaded.values()
            assert memo.stats().bytes_on_disk == sum(v.length for v in loaded if type(v) is ValueRef)

    async def test_bytes_on_disk_under_concurrent_hits_without_a_limit(self, tmp_path: Path) -> None:
        """Threads and the loop hitting 20 values at once (each leaves the index): the counter ends at 0."""
        vals = write_results(tmp_path / "ck", 20, 100_000)
        async with Memoizer(
            checkpoint_files=[str(tmp_path / "ck")], run_dir=tmp_path / "run", memory_limit=None
        ) as memo:
            assert memo.stats().bytes_on_disk >= 20 * 100_000
            raws = [hash_task(value_task(i)) for i in vals]

            def from_thread() -> list[Any]:
                return [memo._table.lookup(r.hex(), r) for r in raws]

            threads = [asyncio.to_thread(from_thread) for _ in range(8)]
            loop_hits = [memo.check_memo(value_task(i)) for i in vals for _ in range(2)]
            got = await asyncio.gather(*threads, *loop_hits)
            for part in got[:8]:
                assert part == [vals[i] for i in vals]
            assert all(f is not None and f.result() == vals[i // 2] for i, f in enumerate(got[8:]))
            assert memo.stats().bytes_on_disk == 0 and not memo._table.loaded


class TestShadowedCopies:
    """A later copy of a record whose value frame did not come along must not hide the original."""

    def _two_batches(self, tmp: Path) -> tuple[Path, bytes, bytes, bytes]:
        v1, v2 = _codec.encode(b"a" * 50_000), _codec.encode(b"b" * 60_000)
        r1 = Record(b"\x01" * 32, v1, "m.f", 1.7e9, b"")
        r2 = Record(b"\x02" * 32, v2, "m.f", 1.7e9, b"")
        b1, b2 = encode_batch([r1]), encode_batch([r2])
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / "seg-1.amlog", b1, b2, v1

    @staticmethod
    def _batch_only(framed: bytes) -> bytes:
        """The batch of ``framed`` (value frames + batch) without its value frames."""
        from aiomemo._checkpoint import BATCH_MAGIC

        return framed[framed.index(BATCH_MAGIC) :]

    def test_duplicated_batch_without_its_frames(self, tmp_path: Path) -> None:
        """Batch copied after another batch (frames left behind): the key still reads its value."""
        path, b1, b2, v1 = self._two_batches(tmp_path / "ck")
        path.write_bytes(file_header() + b1 + b2 + self._batch_only(b1))
        table = load_paths([path]).table
        ref = table[b"\x01" * 32]
        assert isinstance(ref, ValueRef) and ref.prev is not None
        alone = ValueRef(ref.path, ref.offset, ref.length, ref.digest)
        with pytest.raises(CorruptCheckpointError):  # the copy's own reference does not read
            _read_decode(alone)
        assert read_value_with(ref, bytes) == v1  # the original does
        assert _read_decode(ref) == b"a" * 50_000
        from aiomemo._checkpoint import read_value

        assert read_value(ref) == v1

    def test_a_different_newer_value_does_not_fall_back(self, tmp_path: Path) -> None:
        """A newer record with other bytes whose frame is damaged is a miss, not the older value."""
        path = tmp_path / "seg-1.amlog"
        old = Record(b"\x01" * 32, _codec.encode(b"o" * 50_000), "m.f", 1.7e9, b"")
        new = Record(b"\x01" * 32, _codec.encode(b"n" * 50_000), "m.f", 1.8e9, b"")
        path.write_bytes(file_header() + encode_batch([old]) + encode_batch([new]))
        ref = load_paths([path]).table[old.key]
        assert isinstance(ref, ValueRef) and ref.prev is None
        with open(path, "r+b") as f:
            f.seek(ref.offset + 100)
            f.write(b"\x00\xff")
        with pytest.raises(CorruptCheckpointError):
            _read_decode(ref)

    def test_damaged_earlier_copy_is_never_needed(self, tmp_path: Path) -> None:
        """A sound later copy (frames and all) reads from itself; the earlier one may be damaged."""
        path, b1, b2, _ = self._two_batches(tmp_path / "ck")
        path.write_bytes(file_header() + b1 + b2 + b1)
        ref = load_paths([path]).table[b"\x01" * 32]
        assert isinstance(ref, ValueRef) and ref.prev is not None
        with open(path, "r+b") as f:
            f.seek(ref.prev.offset + 10)
            f.write(b"\xff\xfe\xfd")
        assert _read_decode(ref) == b"a" * 50_000
