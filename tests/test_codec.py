"""Tests for the result codec (aiomemo._codec): round trips, refusals, hostile input."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import decimal
import enum
import math
import pathlib
import pickle
import struct
import subprocess
import sys
import threading
import uuid
import zoneinfo
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aiomemo._codec import MAX_DEPTH, CodecError, UnencodableResultError, decode, encode

# ---------------------------------------------------------------------------
# exact comparison: equal values of exactly the same types, all the way down


def _float_bits(x: float) -> bytes:
    return struct.pack(">d", x)


def _same_tz(a: datetime.tzinfo | None, b: datetime.tzinfo | None) -> bool:
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, zoneinfo.ZoneInfo):
        return bool(a.key == b.key)  # type: ignore[attr-defined]
    return a.utcoffset(None) == b.utcoffset(None) and a.tzname(None) == b.tzname(None)


def same(a: Any, b: Any) -> bool:
    """Recursive identity of types and values (NaN-aware, bitwise for floats)."""
    if type(a) is not type(b):
        return False
    t = type(a)
    if t is float:
        return _float_bits(a) == _float_bits(b)
    if t is complex:
        return same(a.real, b.real) and same(a.imag, b.imag)
    if t is decimal.Decimal:
        return str(a) == str(b)
    if t in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if t is dict:
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if t in (set, frozenset):
        if len(a) != len(b):
            return False
        rest = list(b)
        for x in a:
            for i, y in enumerate(rest):
                if same(x, y):
                    del rest[i]
                    break
            else:
                return False
        return True
    if t in (datetime.datetime, datetime.time):
        return a == b and a.fold == b.fold and _same_tz(a.tzinfo, b.tzinfo)
    if t is np.ndarray or isinstance(a, np.generic):
        if a.dtype.str != b.dtype.str or a.shape != b.shape:
            return False
        if t is np.ndarray and not b.flags.writeable:
            return False
        if a.dtype.char in "gG":  # long double: the padding bytes are not data
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(a.tobytes() == b.tobytes())
    if t in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath):
        return str(a) == str(b)
    return bool(a == b)


def roundtrip(value: Any) -> Any:
    data = encode(value)
    assert type(data) is bytes
    back = decode(data)
    assert same(value, back), (value, back)
    assert same(value, decode(memoryview(data)))
    return back


# ---------------------------------------------------------------------------
# strategies

texts = st.text(st.characters(codec=None), max_size=20)  # lone surrogates included
decimals = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.sampled_from(["NaN", "-NaN", "sNaN", "NaN123", "-Infinity", "-0", "1E+999999", "0E-7"]).map(
        decimal.Decimal
    ),
)
fixed_offsets = st.builds(
    lambda us, name: datetime.timezone(datetime.timedelta(microseconds=us), *name),
    st.integers(-86_399_999_999, 86_399_999_999),
    st.one_of(st.just(()), st.tuples(st.text(max_size=8))),
)
zones = st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]).map(
    zoneinfo.ZoneInfo
)
tzs = st.one_of(st.none(), fixed_offsets, zones, st.just(datetime.UTC))
path_text = st.text(st.characters(codec=None, exclude_characters="\x00"), max_size=12)

numpy_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.byte_string_dtypes(min_len=1, max_len=4),
    hnp.unicode_string_dtypes(min_len=1, max_len=4),
)
numpy_arrays = hnp.arrays(numpy_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
numpy_scalars = st.one_of(
    hnp.from_dtype(np.dtype("float64")),
    hnp.from_dtype(np.dtype(">i4")),
    hnp.from_dtype(np.dtype("uint8")),
    hnp.from_dtype(np.dtype("bool")),
    hnp.from_dtype(np.dtype("complex64")),
    hnp.from_dtype(np.dtype("float16")),
).map(lambda x: np.asarray(x)[()])

hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=-(2**63)),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=True, allow_infinity=True),
    decimals.filter(lambda d: not d.is_snan()),  # a signalling NaN is unhashable
    st.dates(),
    st.times(timezones=tzs),
    st.datetimes(timezones=tzs),
    st.timedeltas(),
    st.uuids(),
    st.builds(pathlib.PurePosixPath, path_text),
    st.builds(pathlib.PureWindowsPath, path_text),
    st.builds(pathlib.Path, path_text),
    numpy_scalars,
)
leaves = st.one_of(
    hashable_leaves,
    decimals,
    st.binary(max_size=20).map(bytearray),
    numpy_arrays,
)
hashables = st.recursive(
    hashable_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.frozensets(inner, max_size=3),
    ),
    max_leaves=6,
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashables, inner, max_size=4),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
    ),
    max_leaves=12,
)
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts, st.binary(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(texts | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# round trips


@FAST
@given(values)
def test_roundtrip_any_supported_value(value: Any) -> None:
    roundtrip(value)


@FAST
@given(json_like)
def test_roundtrip_json_like(value: Any) -> None:
    roundtrip(value)


@settings(FAST, max_examples=60)
@given(st.dictionaries(hashables, values, max_size=5))
def test_dict_keys_of_any_hashable_type_keep_order(value: dict[Any, Any]) -> None:
    back = roundtrip(value)
    assert [type(k) for k in back] == [type(k) for k in value]


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**63,
        2**64 - 1,
        2**64,
        -(2**63) - 1,
        2**1000,
        -(2**1000),
        -(2**64),
        -(2**64) - 1,
        -(2**64) + 1,
    ],
)
def test_int_boundaries(value: int) -> None:
    roundtrip(value)
    roundtrip([value, (value,)])


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        -float("nan"),
        struct.unpack(">d", b"\x7f\xf8\x00\x00\x00\x00\x12\x34")[0],  # NaN with a payload
        -0.0,
        float("inf"),
        complex(-0.0, float("nan")),
        (float("nan"), -0.0),
        {float("nan"): 1},
    ],
)
def test_floats_kept_bitwise(value: Any) -> None:
    roundtrip(value)


def test_exact_container_and_scalar_types() -> None:
    value = {
        "t": (1, [2, (3,)]),
        "s": {1, "a", (2, 3), frozenset({4})},
        "f": frozenset({(1, 2)}),
        "ba": bytearray(b"\x00\xff"),
        "b": b"",
        "tuple key": {(1, (2, "x")): "v", frozenset({1}): "w", 3: "i", b"k": 1, None: 2},
        "bool": [True, False, 1, 0],
    }
    back = roundtrip(value)
    assert type(back["t"][1][1]) is tuple
    assert type(next(iter(back["f"]))) is tuple
    assert {type(k) for k in back["tuple key"]} == {tuple, frozenset, int, bytes, type(None)}


def test_datetime_family() -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    named = datetime.timezone(datetime.timedelta(hours=5, microseconds=1), "X")
    value: Any
    for value in [
        datetime.date(1, 1, 1),
        datetime.date(9999, 12, 31),
        datetime.time(23, 59, 59, 999999),
        datetime.time(1, tzinfo=named),
        datetime.datetime(2021, 10, 31, 2, 30, tzinfo=paris, fold=1),
        datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        datetime.datetime.max,
        datetime.datetime.min.replace(tzinfo=named),
        datetime.timedelta.max,
        datetime.timedelta.min,
        datetime.timedelta(microseconds=-1),
    ]:
        back = roundtrip(value)
        if getattr(value, "tzinfo", None) is not None:
            assert back.tzname() == value.tzname()
    back = roundtrip(datetime.datetime(2024, 1, 1, tzinfo=paris))
    assert back.tzinfo is paris
    back = roundtrip(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
    assert back.tzinfo is datetime.UTC


def test_paths_and_uuid_and_decimal() -> None:
    for value in [
        pathlib.PurePosixPath("//a/b"),
        pathlib.PurePosixPath("."),
        pathlib.PureWindowsPath(r"\\server\share\x"),
        pathlib.PureWindowsPath("c:rel"),
        pathlib.Path("/tmp/\udcff-undecodable"),
        uuid.UUID(int=2**128 - 1),
        decimal.Decimal("-0E+3"),
        decimal.Decimal("1." + "0" * 500),
    ]:
        roundtrip(value)


def test_numpy_values() -> None:
    a = np.arange(24, dtype=">f8").reshape(2, 3, 4)
    for value in [
        a,
        a[:, ::2, 1],  # not contiguous: stored in C order
        np.asfortranarray(a),
        np.array(5, dtype=np.int8),
        np.zeros((0, 4), dtype=np.uint16),
        np.array([b"ab", b""], dtype="S2"),
        np.array(["é", "\U0001f600x"]),
        np.array([True, False]),
        np.array([np.nan, -0.0], dtype=np.float32),
        np.float32("nan"),
        np.int64(-5),
        np.uint64(2**64 - 1),
        np.bool_(False),
        np.str_("abc"),
        np.bytes_(b"ab"),
        np.clongdouble(1 + 2j),
        [np.float64(1.5), 1.5],
        {np.int32(3): np.array([1])},
    ]:
        back = roundtrip(value)
        if type(back) is np.ndarray:
            back[...] = back  # writable
            assert back.flags.c_contiguous


# ---------------------------------------------------------------------------
# refusals


class Color(enum.IntEnum):
    RED = 1


class Flavour(enum.Enum):
    SWEET = "s"


Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass(frozen=True)
class Box:
    x: int


class Thing:
    pass


class MyStr(str):
    pass


class MyDict(dict[str, int]):
    pass


class MyArray(np.ndarray):
    pass


class OtherTz(datetime.tzinfo):
    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)

    def tzname(self, dt: datetime.datetime | None) -> str:
        return "other"


@pytest.mark.parametrize(
    ("value", "where", "type_name", "words"),
    [
        (Color.RED, "result", "Color", "enum"),
        ([1, {"x": Flavour.SWEET}], "result[1]['x']", "Flavour", "enum"),
        ({"a": (1, Point(1, 2))}, "result['a'][1]", "Point", "namedtuple"),
        ([None, Box(1)], "result[1]", "Box", "dataclass"),
        ({"k": {"j": [0, 1, Thing()]}}, "result['k']['j'][2]", "Thing", "unsupported type"),
        ((MyStr("s"),), "result[0]", "MyStr", "subclass of str"),
        ([MyDict()], "result[0]", "MyDict", "subclass of dict"),
        ({Color.RED: 1}, "result<key #0>", "Color", "enum"),
        ({2: 0, Box(1): 1}, "result<key #1>", "Box", "dataclass"),
        ({frozenset({Point(1, 2)})}, "result<member #0><member #0>", "Point", "namedtuple"),
        ([memoryview(b"x")], "result[0]", "memoryview", "bytes"),
        ([msgpack.ExtType(2, b"")], "result[0]", "msgpack.ext.ExtType", "namedtuple"),
        ([msgpack.Timestamp(0)], "result[0]", "msgpack.ext.Timestamp", "unsupported"),
        ([lambda: 1], "result[0]", "function", "unsupported"),
        (datetime.datetime(2024, 1, 1, tzinfo=OtherTz()), "result", "datetime", "tzinfo"),
        ({"d": datetime.time(tzinfo=OtherTz())}, "result['d']", "datetime.time", "tzinfo"),
        (np.array([1, "a"], dtype=object), "result", "numpy.ndarray", "dtype"),
        (np.zeros(2, dtype="datetime64[s]"), "result", "numpy.ndarray", "dtype"),
        (np.zeros(2, dtype=[("a", "i4")]), "result", "numpy.ndarray", "dtype"),
        (np.zeros(2).view(MyArray), "result", "MyArray", "subclass of numpy.ndarray"),
        ([np.str_("a\x00")], "result[0]", "numpy.str_", "NUL"),
    ],
)
def test_refuses_what_cannot_be_rebuilt(value: Any, where: str, type_name: str, words: str) -> None:
    with pytest.raises(UnencodableResultError) as info:
        encode(value)
    err = info.value
    assert isinstance(err, TypeError)
    assert err.where == where
    assert err.type_name.endswith(type_name)
    message = str(err)
    assert where in message and err.type_name in message
    assert words in message


def test_refuses_cycles() -> None:
    a: list[Any] = [1]
    a.append(a)
    with pytest.raises(UnencodableResultError, match="cycle") as info:
        encode(a)
    assert "result[1] refers back to result" in str(info.value)

    d: dict[str, Any] = {"x": []}
    d["x"].append((1, d))
    with pytest.raises(UnencodableResultError, match=r"result\['x'\]\[0\]\[1\] refers back"):
        encode(d)


@pytest.mark.parametrize("kind", [list, tuple, "dict", "mixed"])
def test_refuses_absurd_depth(kind: Any) -> None:
    value: Any = 0
    for i in range(MAX_DEPTH + 5):
        if kind == "dict":
            value = {"k": value}
        elif kind == "mixed":
            value = [value] if i % 2 else (value,)
        else:
            value = kind([value])
    with pytest.raises(UnencodableResultError, match="deeper than") as info:
        encode(value)
    assert info.value.where.startswith("result[")
    assert len(str(info.value)) < 400


def test_max_depth_itself_is_fine() -> None:
    for kind in (list, tuple):
        value: Any = 0
        for _ in range(MAX_DEPTH):
            value = kind([value])
        roundtrip(value)


def test_shared_references_are_fine() -> None:
    shared = [1, 2]
    back = roundtrip([shared, shared, (shared,)])
    assert back[0] == back[1] == back[2][0]


# ---------------------------------------------------------------------------
# hostile input


def _assert_data_or_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_decode_random_bytes(data: bytes) -> None:
    _assert_data_or_codec_error(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.data())
def test_decode_mutated_encodings(value: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(value))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif raw:
            raw[pos] = data.draw(st.integers(0, 255))
    _assert_data_or_codec_error(bytes(raw))


def _ext(code: int, payload: bytes) -> bytes:
    """An ext32 record by hand (msgpack.ExtType refuses negative codes)."""
    return b"\xc9" + struct.pack(">Ib", len(payload), code) + payload


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used
        b"\x01\x02",  # extra data
        b"\x92\x01",  # truncated
        b"\xdd\xff\xff\xff\xff",  # huge array header
        b"\xd6\xff\x00\x00\x00\x00",  # msgpack timestamp: not ours
        b"\x91\xc7\x0c\xff" + bytes(12),
        _ext(2, b"\x92\x01\xd6\xff\x00\x00\x00\x00"),
        b"\x81\xd7\xff" + bytes(8) + b"\x01",
        _ext(99, b""),
        _ext(-5, b"x"),
        _ext(1, b""),  # empty big int
        _ext(2, b"\x01"),  # tuple payload not an array
        _ext(2, b"\x92\x01"),  # truncated payload
        _ext(2, b"\x90\x90"),  # extra bytes in payload
        _ext(3, b"\x91\x90"),  # unhashable set member
        b"\x81\x90\x01",  # unhashable dict key
        _ext(7, b"\x00" * 15),
        _ext(8, b" 1 "),
        _ext(8, b"1_0"),
        _ext(8, "١".encode()),
        _ext(8, b"\xff"),
        _ext(9, b"\x00\x00\x01\x01"),
        _ext(9, b"\x07\xe8\x02\x1e"),
        _ext(11, msgpack.packb([2024, 1, 1, 0, 0, 0, 0, 0, "../../etc/passwd"])),
        _ext(11, msgpack.packb([2024, 1, 1, 0, 0, 0, 0, 0, "os"])),
        _ext(11, msgpack.packb([2024, 1, 1, 0, 0, 0, 0, 0, [0, 1]])),
        _ext(11, msgpack.packb([2024, 1, 1, 0, 0, 0, 0, 2, None])),
        _ext(11, msgpack.packb([2024, 1, 1, 0, 0, 0, 0, 0, 86_400_000_000])),
        _ext(11, msgpack.packb([2024, 1.0, 1, 0, 0, 0, 0, 0, None])),
        _ext(10, msgpack.packb([1, 2, 3])),
        _ext(12, b"\x00"),
        _ext(13, b"\x00" * 15),
        _ext(14, b"\xff"),
        _ext(17, b"C:\\x"),  # a WindowsPath cannot be built on this system
        _ext(18, msgpack.packb(["|O8", [1]]) + bytes(8)),  # object dtype: pointers
        _ext(18, msgpack.packb(["O", [1]]) + bytes(8)),
        _ext(18, msgpack.packb(["<f8", [2]]) + bytes(8)),  # size mismatch
        _ext(18, msgpack.packb(["<f8", [-1]])),
        _ext(18, msgpack.packb(["<f8", [2**40, 2**40]]) + bytes(8)),
        _ext(18, msgpack.packb(["[('a','O')]", [1]]) + bytes(8)),
        _ext(18, msgpack.packb(["<V8", [1]]) + bytes(8)),
        _ext(18, msgpack.packb(["<f8"]) + bytes(8)),
        _ext(18, b""),
        _ext(19, msgpack.packb("<f8") + bytes(7)),
        _ext(19, msgpack.packb("|O8") + bytes(8)),
    ],
)
def test_decode_rejects_malformed(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


RAN: list[str] = []


def _mark_ran(tag: str) -> str:
    RAN.append(tag)
    return tag


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_mark_ran, ("pwned",))


def test_pickle_payload_never_runs() -> None:
    payload = pickle.dumps(_Evil(), protocol=pickle.HIGHEST_PROTOCOL)
    assert pickle.loads(payload) == "pwned" and RAN == ["pwned"]  # it would run...
    RAN.clear()
    candidates = [payload, pickle.dumps(_Evil(), protocol=0)]
    candidates += [_ext(code, payload) for code in range(-128, 128)]
    candidates.append(bytes(msgpack.packb([payload, {"p": payload}])))
    for data in candidates:
        try:
            decoded = decode(data)
        except CodecError:
            continue
        assert not isinstance(decoded, str) or decoded != "pwned"
    assert RAN == []  # ...but decode never did
    assert decode(encode(payload)) == payload  # as a result, pickle bytes are just bytes


def test_hostile_deep_nesting_does_not_crash() -> None:
    # 2000 nested tuple exts would need ~80 MB of C stack through unpackb alone;
    # run it in a small-stack thread in a child so a crash cannot take pytest down.
    code = """
import threading, msgpack, sys
from aiomemo._codec import decode, CodecError
def nested_tuples(n):
    data = msgpack.packb(1)
    for _ in range(n):
        data = msgpack.packb(msgpack.ExtType(2, b"\\x91" + data))  # a 1-tuple around data
    return data
deep_list = b"\\x91" * 5000 + b"\\x01"
out = []
def run():
    for d in (nested_tuples(99), nested_tuples(2000), deep_list):
        try:
            decode(d)
            out.append("value")
        except CodecError:
            out.append("codec")
threading.stack_size(512 * 1024)
t = threading.Thread(target=run)
t.start()
t.join()
print(out)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['value', 'codec', 'codec']"


# ---------------------------------------------------------------------------
# format pins, numpy isolation, threads


GOLDEN: list[tuple[Any, str]] = [
    (None, "c0"),
    ({"a": [1, 2.5]}, "81a1619201cb4004000000000000"),
    ((1, "a"), "d6029201a161"),
    (2**64, "c70901010000000000000000"),
    (-(2**63) - 1, "c70901ff7fffffffffffffff"),
    (bytearray(b"ab"), "d5056162"),
    ("\udc80", "c70306edb280"),
    (1 + 2j, "d8073ff00000000000004000000000000000"),
    (decimal.Decimal("-1.50"), "c705082d312e3530"),
    (datetime.date(2024, 2, 29), "d60907e8021d"),
    (
        datetime.time(12, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        "c70f0a960c1e000000cf00000001ad274800",
    ),
    (
        datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC),
        "c70c0b99cd07e80102030405060000",
    ),
    (datetime.timedelta(days=-1, seconds=5, microseconds=7), "c70c0cffffffff0000000500000007"),
    (uuid.UUID(int=1), "d80d00000000000000000000000000000001"),
    (pathlib.PurePosixPath("/tmp/x"), "c7060e2f746d702f78"),
    (pathlib.PureWindowsPath("C:/x"), "d60f433a5c78"),
    ({1}, "d5039101"),
    (frozenset(), "d40490"),
    ({(1, 2): None}, "81c70302920102c0"),
    (np.arange(3, dtype="<i2"), "c70d1292a33c69329103000001000200"),
    (np.float64(0.5), "c70c13a33c6638000000000000e03f"),
]


@pytest.mark.parametrize(("value", "hexdata"), GOLDEN)
def test_golden_encodings(value: Any, hexdata: str) -> None:
    assert encode(value).hex() == hexdata
    assert same(decode(bytes.fromhex(hexdata)), value)


def test_numpy_left_alone_when_not_imported() -> None:
    code = """
import sys, datetime, decimal
from aiomemo._codec import encode, decode, CodecError, UnencodableResultError
assert "numpy" not in sys.modules
value = {"a": (1, 2.5, {3}), "d": decimal.Decimal(1), "t": datetime.datetime(2020, 1, 1)}
assert decode(encode(value)) == value
try:
    encode(object())
except UnencodableResultError:
    pass
assert "numpy" not in sys.modules
sys.modules["numpy"] = None  # make the lazy import fail
try:
    decode(bytes.fromhex("c70d1292a33c69329103000001000200"))
except CodecError as exc:
    print("codec:", exc)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "codec: checkpoint holds a numpy value but numpy is not installed" in proc.stdout


def test_encode_from_many_threads() -> None:
    values_ = [{"i": i, "t": (i, str(i)), "b": b"x" * (i * 5000)} for i in range(64)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for _ in range(20):
                for v in values_[offset:] + values_[:offset]:
                    assert decode(encode(v)) == v
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_signalling_nan_decimal_and_nan_keys() -> None:
    roundtrip([decimal.Decimal("sNaN"), decimal.Decimal("-sNaN12")])
    nan_a, nan_b = float("nan"), float("nan")
    back = roundtrip({nan_a: 1, nan_b: 2})
    assert len(back) == 2 and all(math.isnan(k) for k in back)


def test_deep_caller_stack_gives_unencodable_not_recursion_error() -> None:
    value: Any = 0
    for _ in range(MAX_DEPTH):
        value = (value,)

    def recurse(n: int) -> bytes:
        return recurse(n - 1) if n else encode(value)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(250)
    try:
        with pytest.raises(UnencodableResultError, match="too deeply nested"):
            recurse(50)
    finally:
        sys.setrecursionlimit(limit)
