"""Reading large values back: straight into the result, verified, and safe under abuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomemo import CorruptCheckpointError, _codec
from aiomemo._checkpoint import (
    LARGE_VALUE_MIN,
    ValueRef,
    encode_batch,
    file_header,
    load_paths,
    read_value_with,
)
from aiomemo._table import _read_decode
from aiomemo.stores import Record


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
        with open(ref.path, "r+b") as f:
            f.seek(ref.offset + at)
            b = f.read(1)
            f.seek(ref.offset + at)
            f.write(bytes([b[0] ^ 0x40]))
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            _read_decode(ref)

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
