"""Result codec: a task's result to bytes for checkpoints, and back.

:func:`encode` turns a result into msgpack bytes; :func:`decode` turns those
bytes back into an equal value of exactly the same types. Decoding never runs
code from the data: no pickle, no import of a module named by the data, no
constructor chosen by the data beyond the fixed table below.

Supported types (exact types, not subclasses): ``None``, ``bool``, ``int`` (any
size), ``float`` (NaN payloads and ``-0.0`` kept bitwise), ``str`` (lone
surrogates included), ``bytes``, ``bytearray``, ``list``, ``tuple``, ``dict``
(any encodable hashable keys, insertion order kept), ``set``, ``frozenset``,
``complex``, :class:`decimal.Decimal`, :class:`datetime.date`,
:class:`datetime.time`, :class:`datetime.datetime`,
:class:`datetime.timedelta` (naive, fixed-offset :class:`datetime.timezone`,
or :class:`zoneinfo.ZoneInfo` stored by key), :class:`uuid.UUID`, the four
:mod:`pathlib` path classes, ``numpy.ndarray`` of bool/int/uint/float/complex/
bytes/str dtypes and numpy scalars of those dtypes. Anything else (enum
members, namedtuples, dataclasses, subclasses of builtins, arbitrary objects,
cycles, nesting deeper than :data:`MAX_DEPTH`) is refused by :func:`encode`
with :class:`UnencodableResultError`.

Wire format (checkpoint format version 1)
-----------------------------------------
Plain msgpack (``use_bin_type=True``): nil, bool, int in the 64-bit range,
float64, str (UTF-8), bin (``bytes``), array (``list``), map (``dict``, keys of
any supported type). Everything else is an ext type whose payload is
described below. **These codes are part of the checkpoint format and must
never change meaning**; new types get new codes, unknown codes are a
:class:`CodecError` on decode. "packed X" means a msgpack-encoded X whose
items are themselves encoded by these same rules.

====  =================  ====================================================
code  type               payload
====  =================  ====================================================
1     int (big)          two's complement, big-endian, minimal length; used
                         only outside ``[-2**63, 2**64)``
2     tuple              packed array of the items
3     set                packed array of the members
4     frozenset          packed array of the members
5     bytearray          the raw bytes
6     str (surrogates)   ``str.encode("utf-8", "surrogatepass")``; used only
                         for strings that strict UTF-8 cannot encode
7     complex            ``struct.pack(">dd", real, imag)``
8     Decimal            ASCII ``str(d)``
9     date               ``struct.pack(">HBB", year, month, day)``
10    time               packed ``[hour, minute, second, microsecond, fold, tz]``
11    datetime           packed ``[year, month, day, hour, minute, second,
                         microsecond, fold, tz]``
12    timedelta          ``struct.pack(">iII", days, seconds, microseconds)``
13    UUID               the 16 bytes of ``uuid.bytes``
14    PurePosixPath      ``str(p).encode("utf-8", "surrogatepass")``
15    PureWindowsPath    same
16    PosixPath          same (decodes only where ``PosixPath`` exists)
17    WindowsPath        same (decodes only where ``WindowsPath`` exists)
18    numpy.ndarray      packed ``[dtype.str, [dims...]]`` followed directly by
                         the raw C-order data
19    numpy scalar       packed ``dtype.str`` followed directly by the raw
                         item bytes
====  =================  ====================================================

``tz`` in codes 10 and 11 is nil (naive), an int (a fixed
:class:`datetime.timezone` offset in microseconds with its default name),
``[offset_us, name]`` (a fixed offset with an explicit name) or a str (the
key of a :class:`zoneinfo.ZoneInfo`, rebuilt with ``ZoneInfo(key)`` on
decode: the key must name a zone known to this machine). Ext code -1 (the
msgpack timestamp) and every code not listed are rejected.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import functools
import pathlib
import re
import struct
import sys
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgpack

from aiomemo._exceptions import CodecError, UnencodableResultError

__all__ = [
    "MAX_DEPTH",
    "CodecError",
    "UnencodableResultError",
    "decode",
    "direct_target",
    "encode",
]

MAX_DEPTH: Final = 100
"""Deepest container nesting :func:`encode` accepts (and :func:`decode` reads)."""

# Ext codes: checkpoint format version 1. Never change the meaning of a code.
EXT_BIGINT: Final = 1
EXT_TUPLE: Final = 2
EXT_SET: Final = 3
EXT_FROZENSET: Final = 4
EXT_BYTEARRAY: Final = 5
EXT_STR_SURROGATES: Final = 6
EXT_COMPLEX: Final = 7
EXT_DECIMAL: Final = 8
EXT_DATE: Final = 9
EXT_TIME: Final = 10
EXT_DATETIME: Final = 11
EXT_TIMEDELTA: Final = 12
EXT_UUID: Final = 13
EXT_PURE_POSIX_PATH: Final = 14
EXT_PURE_WINDOWS_PATH: Final = 15
EXT_POSIX_PATH: Final = 16
EXT_WINDOWS_PATH: Final = 17
EXT_NDARRAY: Final = 18
EXT_NPSCALAR: Final = 19


# ---------------------------------------------------------------------------
# encoding

_INT_MIN: Final = -(2**63)
_INT_END: Final = 2**64
_LEAVES: Final = frozenset({type(None), bool, int, float, str, bytes})
_PLAIN: Final = _LEAVES | {list, dict}
_POOL_MAX: Final = 8
_KEEP_PACKER_BELOW: Final = 256 * 1024
_NUMPY_KINDS: Final = frozenset("biufcSU")
_ZONE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")
_ONE_US: Final = datetime.timedelta(microseconds=1)


class _Refused(Exception):
    """Internal: carries a refusal up the walk, collecting the path on the way."""

    def __init__(self, node: object, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason
        self.type_name = _type_name(type(node))
        self.segments: list[str] = []
        self.ids: list[int] = [id(node)]
        self.too_deep = False

    def up(self, container: object, segment: str) -> None:
        self.segments.append(segment)
        self.node = container
        self.ids.append(id(container))


def _type_name(t: type) -> str:
    if t.__module__ == "builtins":
        return t.__qualname__
    return f"{t.__module__}.{t.__qualname__}"


def _big_int_default(obj: object) -> object:
    # Only ints outside the 64-bit range reach here on the fast path.
    if type(obj) is int:
        return _bigint(obj)
    raise TypeError(f"cannot encode {type(obj).__qualname__}")


def _bigint(n: int) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_BIGINT, n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True))


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(
        use_bin_type=True, strict_types=True, datetime=False, default=_big_int_default
    )


# A lock-free pool: list.pop/append are atomic, so threads (and re-entrant
# calls) never share a Packer while it is packing.
_POOL: list[msgpack.Packer] = []


def _pack(obj: object) -> bytes:
    try:
        packer = _POOL.pop()
    except IndexError:
        packer = _new_packer()
    out: bytes = packer.pack(obj)  # on error the packer is simply dropped
    if len(out) < _KEEP_PACKER_BELOW and len(_POOL) < _POOL_MAX:
        _POOL.append(packer)
    return out


def _plain(obj: Any, depth: int) -> bool:
    """True if ``obj`` holds only types msgpack packs natively and exactly."""
    if depth > MAX_DEPTH:
        return False
    small = len(obj) <= 16
    values: Any
    if type(obj) is list:
        values = obj
    else:
        if small:
            for k in obj:
                if type(k) not in _LEAVES:
                    return False
        elif not _LEAVES.issuperset(map(type, obj)):
            return False
        values = obj.values()
    if small:  # a Python loop beats building a set of types here
        for v in values:
            t = type(v)
            if t not in _LEAVES and not ((t is list or t is dict) and _plain(v, depth + 1)):
                return False
        return True
    types = set(map(type, values))
    if _LEAVES.issuperset(types):
        return True
    if not _PLAIN.issuperset(types):
        return False
    for v in values:
        t = type(v)
        if (t is list or t is dict) and not _plain(v, depth + 1):
            return False
    return True


def encode(obj: object) -> bytes:
    """Encode a task result as bytes for a checkpoint.

    ``decode(encode(x))`` is equal to ``x`` and has exactly the same types,
    all the way down. Raises :class:`UnencodableResultError` (a ``TypeError``)
    when ``x`` holds something that cannot be rebuilt without running code,
    a cycle, or nesting deeper than :data:`MAX_DEPTH`. Thread-safe.
    """
    t = type(obj)
    try:
        if t in _LEAVES or ((t is list or t is dict) and _plain(obj, 1)):
            try:
                return _pack(obj)
            except UnicodeEncodeError:
                return _encode_walk(obj, True)
        return _encode_walk(obj, False)
    except RecursionError:  # called from an already deep stack
        raise UnencodableResultError(
            f"cannot encode {_type_name(t)} at result: too deeply nested for the "
            "current Python stack",
            type_name=_type_name(t),
        ) from None


def _encode_walk(obj: object, surrogates: bool) -> bytes:
    try:
        try:
            return _pack(_conv(obj, 0, surrogates))
        except UnicodeEncodeError:
            if surrogates:
                raise
            return _pack(_conv(obj, 0, True))
    except _Refused as exc:
        raise _public_error(exc) from None


def _public_error(exc: _Refused) -> UnencodableResultError:
    where = "result" + "".join(reversed(exc.segments))
    if exc.too_deep:
        ids = exc.ids[::-1]  # outermost first
        segs = exc.segments[::-1]
        first: dict[int, int] = {}
        for i, ident in enumerate(ids):
            if ident in first:
                back = "result" + "".join(segs[: first[ident]])
                here = "result" + "".join(segs[:i])
                return UnencodableResultError(
                    f"cannot encode result: cycle, {here} refers back to {back} ({exc.type_name})",
                    where=here,
                    type_name=exc.type_name,
                )
            first[ident] = i
    shown = where if len(where) <= 120 else where[:100] + "..." + where[-17:]
    return UnencodableResultError(
        f"cannot encode {exc.type_name} at {shown}: {exc.reason}",
        where=where,
        type_name=exc.type_name,
    )


def _deeper(obj: object, depth: int) -> int:
    if depth >= MAX_DEPTH:
        err = _Refused(obj, f"nested deeper than {MAX_DEPTH} levels")
        err.too_deep = True
        raise err
    return depth + 1


def _short_repr(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _where_in(container: Any, node: object) -> str:
    """The path segment of ``node`` inside ``container`` (error path only)."""
    if type(container) is dict:
        for i, (k, v) in enumerate(container.items()):
            if v is node:
                return f"[{_short_repr(k)}]"
            if k is node:
                return f"<key #{i}>"
    elif type(container) in (set, frozenset):
        for i, v in enumerate(container):
            if v is node:
                return f"<member #{i}>"
    else:
        for i, v in enumerate(container):
            if v is node:
                return f"[{i}]"
    return "[?]"


def _conv_items(obj: Iterable[Any], container: object, depth: int, sur: bool) -> list[Any]:
    try:
        return [_conv(x, depth, sur) for x in obj]
    except _Refused as exc:
        exc.up(container, _where_in(container, exc.node))
        raise


def _conv(obj: object, depth: int, sur: bool) -> object:
    """Turn ``obj`` into something the packer packs exactly (ExtType for the rest)."""
    t = type(obj)
    if t is str:
        if sur:
            try:
                obj.encode("utf-8")  # type: ignore[attr-defined]
            except UnicodeEncodeError:
                return msgpack.ExtType(
                    EXT_STR_SURROGATES,
                    obj.encode("utf-8", "surrogatepass"),  # type: ignore[attr-defined]
                )
        return obj
    if t is float or t is bool or t is bytes or obj is None:
        return obj
    if t is int:
        if _INT_MIN <= obj < _INT_END:  # type: ignore[operator]
            return obj
        return _bigint(obj)  # type: ignore[arg-type]
    if t is list:
        d = _deeper(obj, depth)
        if not sur and _LEAVES.issuperset(map(type, obj)):  # type: ignore[call-overload]
            return obj  # packs as it is
        return _conv_items(obj, obj, d, sur)  # type: ignore[arg-type]
    if t is dict:
        d = _deeper(obj, depth)
        if (
            not sur
            and _LEAVES.issuperset(map(type, obj))  # type: ignore[call-overload]
            and _LEAVES.issuperset(map(type, obj.values()))  # type: ignore[attr-defined]
        ):
            return obj
        try:
            out = {_conv(k, d, sur): _conv(v, d, sur) for k, v in obj.items()}  # type: ignore[attr-defined]
        except _Refused as exc:
            exc.up(obj, _where_in(obj, exc.node))
            raise
        if len(out) != len(obj):  # type: ignore[arg-type]
            raise _Refused(obj, "two keys encode alike (e.g. two Decimal NaN keys)")
        return out
    code = _CONTAINER_CODES.get(t)
    if code is not None:
        d = _deeper(obj, depth)
        if not sur and _LEAVES.issuperset(map(type, obj)):  # type: ignore[call-overload]
            return msgpack.ExtType(code, _pack(list(obj)))  # type: ignore[call-overload]
        return msgpack.ExtType(code, _pack(_conv_items(obj, obj, d, sur)))  # type: ignore[arg-type]
    conv = _CONVERTERS.get(t)
    if conv is not None:
        return conv(obj)
    return _conv_other(obj)


def _conv_other(obj: object) -> object:
    np = sys.modules.get("numpy")
    if np is not None:
        if type(obj) is np.ndarray:
            return _conv_ndarray(obj, np)
        if isinstance(obj, np.generic) and obj.dtype.type is type(obj):
            return _conv_npscalar(obj, np)
    raise _Refused(obj, _refusal_reason(obj))


def _refusal_reason(obj: object) -> str:
    suffix = "only plain data types can be rebuilt from a checkpoint without running code"
    t = type(obj)
    if isinstance(obj, enum.Enum):
        what = "an enum member"
    elif isinstance(obj, tuple) and hasattr(t, "_fields"):
        what = "a namedtuple"
    elif dataclasses.is_dataclass(obj):
        what = "a dataclass instance"
    elif t is memoryview:
        what = "a memoryview (convert it to bytes)"
    else:
        base = next(
            (b for b in t.__mro__[1:] if b in _ALL_SUPPORTED or b.__module__ == "numpy"),
            None,
        )
        what = f"a subclass of {_type_name(base)}" if base is not None else "an unsupported type"
    return f"{what}; {suffix}"


def _conv_complex(obj: Any) -> object:
    return msgpack.ExtType(EXT_COMPLEX, struct.pack(">dd", obj.real, obj.imag))


def _conv_decimal(obj: Any) -> object:
    return msgpack.ExtType(EXT_DECIMAL, str(obj).encode("ascii"))


def _conv_date(obj: Any) -> object:
    return msgpack.ExtType(EXT_DATE, struct.pack(">HBB", obj.year, obj.month, obj.day))


def _conv_timedelta(obj: Any) -> object:
    return msgpack.ExtType(
        EXT_TIMEDELTA, struct.pack(">iII", obj.days, obj.seconds, obj.microseconds)
    )


@functools.cache
def _known_zones() -> frozenset[str]:
    import zoneinfo

    return frozenset(zoneinfo.available_timezones())


def _tz_field(obj: Any) -> object:
    tz = obj.tzinfo
    if tz is None:
        return None
    if type(tz) is datetime.timezone:
        off = tz.utcoffset(None)
        us = off // _ONE_US
        name = tz.tzname(None)
        if name == datetime.timezone(off).tzname(None):
            return us
        return [us, name]
    zoneinfo = sys.modules.get("zoneinfo")
    if zoneinfo is not None and type(tz) is zoneinfo.ZoneInfo:
        key = tz.key
        if key is not None and _ZONE_KEY_RE.fullmatch(key) and key in _known_zones():
            return key
        raise _Refused(obj, f"its ZoneInfo has no known key ({key!r})")
    raise _Refused(
        obj,
        f"its tzinfo is a {_type_name(type(tz))}; only datetime.timezone and "
        "zoneinfo.ZoneInfo can be rebuilt from a checkpoint",
    )


def _conv_time(obj: Any) -> object:
    fields = [obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold, _tz_field(obj)]
    return msgpack.ExtType(EXT_TIME, _pack(fields))


def _conv_datetime(obj: Any) -> object:
    fields = [
        obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second,
        obj.microsecond, obj.fold, _tz_field(obj),
    ]  # fmt: skip
    return msgpack.ExtType(EXT_DATETIME, _pack(fields))


def _conv_uuid(obj: Any) -> object:
    return msgpack.ExtType(EXT_UUID, obj.bytes)


def _path_conv(code: int) -> Callable[[Any], object]:
    def conv(obj: Any) -> object:
        return msgpack.ExtType(code, str(obj).encode("utf-8", "surrogatepass"))

    return conv


def _conv_bytearray(obj: Any) -> object:
    return msgpack.ExtType(EXT_BYTEARRAY, bytes(obj))


def _check_dtype(obj: object, dtype: Any) -> str:
    if (
        dtype.kind not in _NUMPY_KINDS
        or dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.itemsize == 0
    ):
        raise _Refused(
            obj,
            f"numpy dtype {dtype!s} is not supported (only bool, int, uint, float, "
            "complex, bytes and str dtypes)",
        )
    return str(dtype.str)


def _conv_ndarray(obj: Any, np: Any) -> object:
    dtype_str = _check_dtype(obj, obj.dtype)
    header = _pack([dtype_str, list(obj.shape)])
    raw = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)  # no copy if C-contiguous
    return msgpack.ExtType(EXT_NDARRAY, b"".join([header, raw]))


def _conv_npscalar(obj: Any, np: Any) -> object:
    dtype_str = _check_dtype(obj, obj.dtype)
    arr = np.asarray(obj)
    if obj.dtype.kind in "SU" and arr[()] != obj:
        raise _Refused(obj, "a numpy string scalar with trailing NUL characters")
    return msgpack.ExtType(EXT_NPSCALAR, _pack(dtype_str) + arr.tobytes())


_CONTAINER_CODES: Final[dict[type, int]] = {
    tuple: EXT_TUPLE,
    set: EXT_SET,
    frozenset: EXT_FROZENSET,
}

_CONVERTERS: Final[dict[type, Callable[[Any], object]]] = {
    bytearray: _conv_bytearray,
    complex: _conv_complex,
    decimal.Decimal: _conv_decimal,
    datetime.date: _conv_date,
    datetime.time: _conv_time,
    datetime.datetime: _conv_datetime,
    datetime.timedelta: _conv_timedelta,
    uuid.UUID: _conv_uuid,
    pathlib.PurePosixPath: _path_conv(EXT_PURE_POSIX_PATH),
    pathlib.PureWindowsPath: _path_conv(EXT_PURE_WINDOWS_PATH),
    pathlib.PosixPath: _path_conv(EXT_POSIX_PATH),
    pathlib.WindowsPath: _path_conv(EXT_WINDOWS_PATH),
}

_ALL_SUPPORTED: Final = frozenset(_PLAIN | _CONTAINER_CODES.keys() | _CONVERTERS.keys())


# ---------------------------------------------------------------------------
# decoding

# Nested payloads are unpacked with unpackb (fast, but ~40 KB of C stack per
# level) only this many ext levels deep; deeper ones use an Unpacker, whose
# state lives on the heap, so hostile nesting cannot overflow a thread's stack.
_UNPACKB_LEVELS: Final = 3


def decode(data: bytes | memoryview) -> object:
    """Decode bytes made by :func:`encode` back into the result.

    Never runs code, imports nothing named by the data and never uses pickle.
    Raises :class:`CodecError` (a ``ValueError``), and nothing else, for any
    input that is not a valid encoding.
    """
    try:
        obj = msgpack.unpackb(
            data, ext_hook=_HOOKS[0], raw=False, strict_map_key=False, use_list=True
        )
    except CodecError:
        raise
    except Exception as exc:  # any failure of the C unpacker or of a payload
        raise CodecError(f"not a valid result encoding: {type(exc).__name__}: {exc}") from exc
    if type(obj) in _CONTAINERS:
        _reject_timestamps(obj, data)
    elif type(obj) is msgpack.Timestamp:
        raise CodecError("not a valid result encoding: ext code -1 (timestamp)")
    return obj


_CONTAINERS: Final = frozenset({list, dict, tuple, set, frozenset})


def direct_target(head: bytes, length: int) -> tuple[int, object, memoryview | None] | None:
    """How to read a large flat result without decoding it: its raw bytes go straight to the result.

    ``head`` is the first bytes (about 1 KiB, or all) of an encoding
    ``length`` bytes long. When the whole result is one ``bytes``,
    ``bytearray`` or numpy array, returns ``(start, result, view)``: the
    encoding's bytes from ``start`` on are the result's raw contents, to be
    read into ``view`` (a writable byte view of the fresh, not yet filled
    ``result``; release it once filled), or, when ``view`` is None, read as
    one ``bytes`` object that is the result itself. The result equals what
    :func:`decode` makes of the same bytes, with no copy in between.

    None: any other encoding, one that does not add up, or a numpy array
    that :func:`decode` would refuse; decode the whole encoding instead (it
    raises the right :class:`CodecError`).
    """
    if len(head) < 3:
        return None
    lead = head[0]
    if lead in _BIN_LENGTHS:
        size = _BIN_LENGTHS[lead]
        start = 1 + size
        n = int.from_bytes(head[1:start], "big")
        return (start, None, None) if start + n == length and len(head) >= start else None
    size = _EXT_LENGTHS.get(lead, 0)
    if not size or len(head) < 2 + size:
        return None
    n = int.from_bytes(head[1 : 1 + size], "big")
    code = head[1 + size]
    start = 2 + size
    if start + n != length:
        return None
    if code == EXT_BYTEARRAY:
        target = bytearray(n)
        return start, target, memoryview(target)
    if code == EXT_NDARRAY:
        try:
            return _ndarray_target(head[start:], n, start)
        except Exception:  # decode() then says what is wrong with it
            return None
    return None


#: msgpack bin 8/16/32 and ext 8/16/32 lead bytes -> width of their length field
_BIN_LENGTHS: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_EXT_LENGTHS: Final = {0xC7: 1, 0xC8: 2, 0xC9: 4}


def _ndarray_target(
    payload_head: bytes, n: int, start: int
) -> tuple[int, object, memoryview] | None:
    np, header, offset = _np_header(payload_head)
    if type(header) is not list or len(header) != 2 or type(header[1]) is not list:
        return None
    dtype = _np_dtype(np, header[0])
    shape = header[1]
    if len(shape) > 64 or any(type(d) is not int or d < 0 for d in shape):
        return None
    count = 1
    for d in shape:
        count *= d
    if count == 0 or count * dtype.itemsize != n - offset:
        return None
    target = np.empty(shape, dtype=dtype)
    return start + offset, target, memoryview(target.reshape(-1).view(np.uint8))


def _reject_timestamps(obj: object, data: bytes | memoryview) -> None:
    """Refuse msgpack timestamps (ext -1), which msgpack decodes without our hook.

    We never write them; they can only hide in containers, and only if the
    bytes hold one of their three headers, so look for those first (memchr
    for 0xff is nearly free) and walk the decoded containers only then.
    """
    raw = data if type(data) is bytes else bytes(data)
    if b"\xff" not in raw or not (
        b"\xd6\xff" in raw or b"\xd7\xff" in raw or b"\xc7\x0c\xff" in raw
    ):
        return
    stack: list[Any] = [obj]
    while stack:
        o = stack.pop()
        parts = (o.keys(), o.values()) if type(o) is dict else (o,)
        for part in parts:
            types = set(map(type, part))
            if msgpack.Timestamp in types:
                raise CodecError("not a valid result encoding: ext code -1 (timestamp)")
            if not types.isdisjoint(_CONTAINERS):
                stack.extend(x for x in part if type(x) in _CONTAINERS)


def _unpack_payload(data: bytes, level: int) -> object:
    if level > MAX_DEPTH:
        raise CodecError(f"not a valid result encoding: nested deeper than {MAX_DEPTH}")
    if level < _UNPACKB_LEVELS:
        return msgpack.unpackb(
            data, ext_hook=_HOOKS[level], raw=False, strict_map_key=False, use_list=True
        )
    unpacker = msgpack.Unpacker(
        None,
        ext_hook=_HOOKS[level],
        raw=False,
        strict_map_key=False,
        use_list=True,
        max_buffer_size=max(len(data), 1),
    )
    unpacker.feed(data)
    obj = unpacker.unpack()
    if unpacker.tell() != len(data):
        raise CodecError("not a valid result encoding: extra bytes in an ext payload")
    return obj


def _items(data: bytes, level: int) -> list[Any]:
    items = _unpack_payload(data, level)
    if type(items) is not list:
        raise CodecError("not a valid result encoding: container payload is not an array")
    return items


def _ints(fields: object, n: int) -> list[Any]:
    if type(fields) is not list or len(fields) != n:
        raise CodecError("not a valid result encoding: bad date/time fields")
    for v in fields[: n - 1]:
        if type(v) is not int:
            raise CodecError("not a valid result encoding: bad date/time fields")
    return fields


def _tz_from(field: object) -> datetime.tzinfo | None:
    if field is None:
        return None
    if type(field) is int:
        return datetime.timezone(datetime.timedelta(microseconds=field))
    if type(field) is list and len(field) == 2:
        off, name = field
        if type(off) is int and type(name) is str:
            return datetime.timezone(datetime.timedelta(microseconds=off), name)
    if type(field) is str and _ZONE_KEY_RE.fullmatch(field) and field in _known_zones():
        import zoneinfo

        return zoneinfo.ZoneInfo(field)
    raise CodecError(f"not a valid result encoding: bad time zone {field!r:.60}")


def _dec_bigint(data: bytes, level: int) -> object:
    if not data:
        raise CodecError("not a valid result encoding: empty big int")
    return int.from_bytes(data, "big", signed=True)


def _dec_tuple(data: bytes, level: int) -> object:
    return tuple(_items(data, level + 1))


def _dec_set(data: bytes, level: int) -> object:
    return set(_items(data, level + 1))


def _dec_frozenset(data: bytes, level: int) -> object:
    return frozenset(_items(data, level + 1))


def _dec_bytearray(data: bytes, level: int) -> object:
    return bytearray(data)


def _dec_str(data: bytes, level: int) -> object:
    return data.decode("utf-8", "surrogatepass")


def _dec_complex(data: bytes, level: int) -> object:
    real, imag = struct.unpack(">dd", data)
    return complex(real, imag)


def _dec_decimal(data: bytes, level: int) -> object:
    text = data.decode("ascii")
    value = decimal.Decimal(text)
    if str(value) != text:
        raise CodecError(f"not a valid result encoding: bad Decimal {text!r:.60}")
    return value


def _dec_date(data: bytes, level: int) -> object:
    return datetime.date(*struct.unpack(">HBB", data))


def _dec_time(data: bytes, level: int) -> object:
    h, mi, s, us, fold, tz = _ints(_unpack_payload(data, level + 1), 6)
    return datetime.time(h, mi, s, us, tzinfo=_tz_from(tz), fold=fold)


def _dec_datetime(data: bytes, level: int) -> object:
    y, mo, d, h, mi, s, us, fold, tz = _ints(_unpack_payload(data, level + 1), 9)
    return datetime.datetime(y, mo, d, h, mi, s, us, tzinfo=_tz_from(tz), fold=fold)


def _dec_timedelta(data: bytes, level: int) -> object:
    days, seconds, us = struct.unpack(">iII", data)
    return datetime.timedelta(days=days, seconds=seconds, microseconds=us)


def _dec_uuid(data: bytes, level: int) -> object:
    return uuid.UUID(bytes=data)


def _path_dec(cls: type[pathlib.PurePath]) -> Callable[[bytes, int], object]:
    def dec(data: bytes, level: int) -> object:
        return cls(data.decode("utf-8", "surrogatepass"))

    return dec


_NP_DTYPE_RE: Final = re.compile(r"[<>|][biufcSU][0-9]{1,6}")


def _np_header(data: bytes) -> tuple[Any, object, int]:
    """Split a numpy payload into (numpy module, header, offset of raw data)."""
    try:
        import numpy as np
    except ImportError as exc:
        raise CodecError("checkpoint holds a numpy value but numpy is not installed") from exc
    unpacker = msgpack.Unpacker(None, raw=False, use_list=True, max_buffer_size=1024)
    unpacker.feed(data[:1024])
    header = unpacker.unpack()
    return np, header, unpacker.tell()


def _np_dtype(np: Any, text: object) -> Any:
    if type(text) is not str or not _NP_DTYPE_RE.fullmatch(text):
        raise CodecError(f"not a valid result encoding: bad numpy dtype {text!r:.60}")
    dtype = np.dtype(text)
    if dtype.str != text or dtype.itemsize == 0 or dtype.hasobject:
        raise CodecError(f"not a valid result encoding: bad numpy dtype {text!r:.60}")
    return dtype


def _dec_ndarray(data: bytes, level: int) -> object:
    np, header, offset = _np_header(data)
    if type(header) is not list or len(header) != 2 or type(header[1]) is not list:
        raise CodecError("not a valid result encoding: bad numpy array header")
    dtype = _np_dtype(np, header[0])
    shape = header[1]
    if len(shape) > 64 or any(type(n) is not int or n < 0 for n in shape):
        raise CodecError("not a valid result encoding: bad numpy array shape")
    count = 1
    for n in shape:
        count *= n
    if count * dtype.itemsize != len(data) - offset:
        raise CodecError("not a valid result encoding: numpy array size mismatch")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


def _dec_npscalar(data: bytes, level: int) -> object:
    np, header, offset = _np_header(data)
    dtype = _np_dtype(np, header)
    if dtype.itemsize != len(data) - offset:
        raise CodecError("not a valid result encoding: numpy scalar size mismatch")
    return np.frombuffer(data, dtype=dtype, count=1, offset=offset)[0]


_DECODERS: Final[dict[int, Callable[[bytes, int], object]]] = {
    EXT_BIGINT: _dec_bigint,
    EXT_TUPLE: _dec_tuple,
    EXT_SET: _dec_set,
    EXT_FROZENSET: _dec_frozenset,
    EXT_BYTEARRAY: _dec_bytearray,
    EXT_STR_SURROGATES: _dec_str,
    EXT_COMPLEX: _dec_complex,
    EXT_DECIMAL: _dec_decimal,
    EXT_DATE: _dec_date,
    EXT_TIME: _dec_time,
    EXT_DATETIME: _dec_datetime,
    EXT_TIMEDELTA: _dec_timedelta,
    EXT_UUID: _dec_uuid,
    EXT_PURE_POSIX_PATH: _path_dec(pathlib.PurePosixPath),
    EXT_PURE_WINDOWS_PATH: _path_dec(pathlib.PureWindowsPath),
    EXT_POSIX_PATH: _path_dec(pathlib.PosixPath),
    EXT_WINDOWS_PATH: _path_dec(pathlib.WindowsPath),
    EXT_NDARRAY: _dec_ndarray,
    EXT_NPSCALAR: _dec_npscalar,
}


def _ext_hook(level: int, code: int, data: bytes) -> object:
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise CodecError(f"not a valid result encoding: unknown ext code {code}")
    return decoder(data, level)


_HOOKS: Final = [functools.partial(_ext_hook, level) for level in range(MAX_DEPTH + 1)]
