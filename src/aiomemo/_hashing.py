"""Task keys: a canonical msgpack stream of the task's inputs, hashed with blake3.

The key of a task is ``blake3(stream).hexdigest()`` where ``stream`` is

1. ``packb(tree)``: one msgpack document, the canonical form of
   ``[FORMAT, [module, qualname, version], args, kwargs, outputs]``, then
2. the payload of every large buffer and every :class:`File` met while
   building ``tree``, in the order met, fed to the hasher as they are (no
   copy). ``tree`` holds a header for each (kind, dtype, shape, length), so
   the stream stays unambiguous.

Canonical form (format version 1; golden vectors in the tests pin it):

* ``None``, ``bool``, ``str`` and ints that fit in 64 bits are msgpack's own
  types; a bigger int is ext ``BIGINT``. msgpack tells int, float, bool, str
  and bin apart, so ``1``, ``1.0``, ``True``, ``"1"`` and ``b"1"`` differ.
* floats are 64-bit; every NaN is one NaN; ``-0.0`` and ``0.0`` are two keys
  (a function may tell them apart: ``math.copysign``).
* lists are msgpack arrays; every other container is an array that starts
  with a *mark* (an empty ext value; user data can never contain one), so
  ``(1,)`` and ``[1]`` differ. Sets are sorted by the packed bytes of their
  members; dicts whose keys are all ``str`` are msgpack maps sorted by key,
  other dicts a marked array sorted by packed key.
* bytes shorter than ``INLINE_LIMIT`` are msgpack bin; longer buffers
  (bytes, bytearray, memoryview, contiguous numpy arrays) go out of band.
* everything else is tagged with its kind and, for user types, the type's
  ``module.qualname``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import os
import pathlib
import struct
import sys
import threading
import types
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, cast

import aiofiles
import aiofiles.os
import blake3
import msgpack

from aiomemo import _fingerprint
from aiomemo._exceptions import UnhashableInputError

__all__ = [
    "FORMAT_VERSION",
    "NOT_HANDLED",
    "File",
    "arg_digests",
    "fallback_hooks",
    "hash_task",
    "hash_task_async",
    "id_for_memo",
    "make_hash",
    "make_hash_async",
]

FORMAT_VERSION: Final = 1
#: byte strings at least this long are fed to the hasher out of band (no copy)
INLINE_LIMIT: Final = 4096
#: out-of-band bytes from which async hashing moves to a worker thread
THREAD_THRESHOLD: Final = 1 << 20
#: nesting deeper than this is reported as an error (and checked for a cycle)
MAX_DEPTH: Final = 200
#: chunk size when reading files
FILE_CHUNK: Final = 1 << 20

_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 64) - 1
_NAN: Final = float("nan")

# ext codes of format version 1 (never reuse or renumber)
_X_BIGINT = 1
_X_COMPLEX = 2
_X_DECIMAL = 3
_X_DATE = 4
_X_TIME = 5
_X_DATETIME = 6
_X_TIMEDELTA = 7
_X_UUID = 8
_X_OOB = 9  # header of an out-of-band buffer: packb([kind, meta, nbytes])
_X_FILE = 10  # header of an out-of-band file digest: packb([mode, path or None])
_X_BYTEARRAY = 11


def _mark(code: int) -> msgpack.ExtType:
    return msgpack.ExtType(code, b"")


_M_TUPLE = _mark(32)
_M_SET = _mark(33)
_M_FROZENSET = _mark(34)
_M_ENUM = _mark(35)
_M_DATACLASS = _mark(36)
_M_FUNC = _mark(37)
_M_TYPE = _mark(38)
_M_CUSTOM = _mark(39)  # id_for_memo registration
_M_PATH = _mark(40)
_M_NDARRAY = _mark(41)
_M_NPSCALAR = _mark(42)
_M_SUBCLASS = _mark(43)  # subclass of a builtin (NamedTuple, OrderedDict...)
_M_PARTIAL = _mark(44)
_M_MEMORYVIEW = _mark(45)
_M_HOOK = _mark(46)  # fallback hook (the Parsl adapter's id_for_memo bridge)
_M_MAP = _mark(47)  # dict with non-str keys
_M_METHOD = _mark(48)
_M_OUTPUT_FILE = _mark(49)  # a File given as an output ref: keyed by path


class _NotHandled:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_HANDLED"


#: returned by a fallback hook that has nothing to say about a value
NOT_HANDLED: Final = _NotHandled()

#: hooks tried, in order, for a value no built-in rule or ``id_for_memo``
#: registration covers: ``hook(obj, output_ref)`` returns a keyable stand-in
#: or ``NOT_HANDLED``
fallback_hooks: list[Callable[[object, bool], object]] = []


@functools.singledispatch
def id_for_memo(obj: object, output_ref: bool = False) -> object:
    """Registry of stand-ins for user types (a ``functools.singledispatch``).

    Register a function that returns a value aiomemo can key (any built-in
    type, a tuple of fields, bytes...)::

        @aiomemo.id_for_memo.register
        def _(obj: Point, output_ref: bool = False) -> object:
            return (obj.x, obj.y)

    The key then holds ``Point``'s ``module.qualname`` and that value.
    ``output_ref`` is True when the value was passed in ``outputs=``.
    """
    raise NotImplementedError(type(obj))


_ID_DEFAULT: Final = id_for_memo.dispatch(object)


@dataclasses.dataclass(frozen=True, slots=True)
class File:
    """A file input keyed by its content (default) or by path, size and mtime.

    ``File(path)`` streams the file through blake3 in chunks when the task
    is hashed (aiofiles on the async path), so editing the file changes the
    key and moving it does not. ``File(path, by="stat")`` keys by absolute
    path + size + mtime instead, without reading it. Passed in ``outputs=``
    a File is keyed by its path only (it need not exist yet).
    """

    path: str
    by: Literal["content", "stat"] = "content"

    def __init__(self, path: str | os.PathLike[str], by: Literal["content", "stat"] = "content"):
        if by not in ("content", "stat"):
            raise ValueError(f"File(by=...) must be 'content' or 'stat', not {by!r}")
        object.__setattr__(self, "path", os.fspath(path))
        object.__setattr__(self, "by", by)

    def __fspath__(self) -> str:
        return self.path

    @property
    def filepath(self) -> str:
        """The path, under Parsl's name."""
        return self.path


class _Unhashable(Exception):
    """Internal: carries the path (innermost first) up to the top."""

    def __init__(self, obj: object, reason: str) -> None:
        super().__init__(reason)
        self.obj = obj
        self.reason = reason
        self.path: list[str] = []


class _Ctx:
    # No __init__ and class-level defaults: one is made per task hashed, and
    # most tasks never touch it (~0.3 µs saved per key).
    oob: list[object] = []  # noqa: RUF012 - never mutated: add() swaps in a fresh list
    oob_bytes = 0
    output_ref = False

    def add(self, item: object, nbytes: int) -> None:
        if self.oob is _Ctx.oob:
            self.oob = []
        self.oob.append(item)
        self.oob_bytes += nbytes


def _qualname(t: type | Callable[..., object]) -> str:
    mod = getattr(t, "__module__", None) or "?"
    qn = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or "?"
    return f"{mod}.{qn}"


def _canon(x: object, ctx: _Ctx, depth: int) -> object:
    t = type(x)
    if t is str or t is bool or x is None:
        return x
    if t is int:
        return x if _INT_MIN <= x <= _INT_MAX else _bigint(x)  # type: ignore[operator]
    if t is float:
        return x if x == x else _NAN  # NaN is the only float unequal to itself
    if depth > MAX_DEPTH:
        raise _Unhashable(x, "nesting too deep")
    h = _HANDLERS.get(t)
    if h is not None:
        return h(x, ctx, depth + 1)
    return _canon_other(x, ctx, depth + 1)


def _bigint(x: Any) -> msgpack.ExtType:
    n = (x.bit_length() + 8) // 8
    return msgpack.ExtType(_X_BIGINT, x.to_bytes(n, "big", signed=True))


def _canon_list(x: Any, ctx: _Ctx, depth: int) -> list[object]:
    if depth > MAX_DEPTH:
        raise _Unhashable(x, "nesting too deep")
    for e in x:
        te = type(e)
        if not (
            te is str
            or te is bool
            or e is None
            or (te is int and _INT_MIN <= e <= _INT_MAX)
            or (te is float and e == e)
        ):
            break
    else:
        # every item is already canonical: pack the list as it is (a tuple or
        # another sequence becomes a list, which msgpack needs)
        return x if type(x) is list else list(x)
    out = []
    i = 0
    try:
        for i, e in enumerate(x):  # noqa: B007
            te = type(e)
            if (
                te is str
                or te is bool
                or e is None
                or (te is int and _INT_MIN <= e <= _INT_MAX)
                or (te is float and e == e)  # NaN is the only float unequal to itself
            ):
                out.append(e)
            elif te is list:
                out.append(_canon_list(e, ctx, depth + 1))
            elif te is dict:
                out.append(_canon_dict(e, ctx, depth + 1))
            else:
                out.append(_canon(e, ctx, depth))
    except _Unhashable as exc:
        exc.path.append(f"[{i}]")
        raise
    return out


def _canon_tuple(x: Any, ctx: _Ctx, depth: int) -> list[object]:
    out = _canon_list(x, ctx, depth)
    out.insert(0, _M_TUPLE)
    return out


def _canon_dict(x: Any, ctx: _Ctx, depth: int) -> object:
    if depth > MAX_DEPTH:
        raise _Unhashable(x, "nesting too deep")
    for k in x:
        if type(k) is not str:
            return _canon_map(x, ctx, depth)
    out: dict[str, object] = {}
    k = ""
    try:
        for k in sorted(x):
            v = x[k]
            tv = type(v)
            if (
                tv is str
                or tv is bool
                or v is None
                or (tv is int and _INT_MIN <= v <= _INT_MAX)
                or (tv is float and v == v)
            ):
                out[k] = v
            elif tv is list:
                out[k] = _canon_list(v, ctx, depth + 1)
            elif tv is dict:
                out[k] = _canon_dict(v, ctx, depth + 1)
            else:
                out[k] = _canon(v, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(f"[{k!r}]")
        raise
    return out


def _canon_map(x: Any, ctx: _Ctx, depth: int) -> object:
    """A dict with some non-str key: a marked array of pairs sorted by packed key."""
    pairs: list[tuple[bytes, object, object]] = []
    for k in x:
        try:
            ck = _canon(k, ctx, depth)
        except _Unhashable as exc:
            exc.path.append(f" key {k!r}")
            raise
        try:
            cv = _canon(x[k], ctx, depth)
        except _Unhashable as exc:
            exc.path.append(f"[{k!r}]")
            raise
        pairs.append((_packb(ck), ck, cv))
    pairs.sort(key=lambda p: p[0])
    flat: list[object] = [_M_MAP]
    for _, ck, cv in pairs:
        flat.append(ck)
        flat.append(cv)
    return flat


def _sorted_members(x: Any, ctx: _Ctx, depth: int, mark: msgpack.ExtType) -> list[object]:
    if all(type(e) is str for e in x):
        members: list[object] = sorted(x)
    else:
        canon = []
        for e in x:
            try:
                ce = _canon(e, ctx, depth)
            except _Unhashable as exc:
                exc.path.append(f" member {e!r}")
                raise
            canon.append((_packb(ce), ce))
        canon.sort(key=lambda p: p[0])
        members = [c for _, c in canon]
    members.insert(0, mark)
    return members


def _canon_set(x: Any, ctx: _Ctx, depth: int) -> list[object]:
    return _sorted_members(x, ctx, depth, _M_SET)


def _canon_frozenset(x: Any, ctx: _Ctx, depth: int) -> list[object]:
    return _sorted_members(x, ctx, depth, _M_FROZENSET)


def _canon_bytes(x: Any, ctx: _Ctx, depth: int) -> object:
    if len(x) < INLINE_LIMIT:
        return x
    return _oob(x, ctx, "bytes", None, len(x))


def _canon_bytearray(x: Any, ctx: _Ctx, depth: int) -> object:
    if len(x) < INLINE_LIMIT:
        return msgpack.ExtType(_X_BYTEARRAY, bytes(x))
    return _oob(x, ctx, "bytearray", None, len(x))


def _canon_memoryview(x: Any, ctx: _Ctx, depth: int) -> object:
    mv: memoryview = x
    meta = [mv.format, list(mv.shape or ())]
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())  # a copy, but only for strided views
    flat = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
    if flat.nbytes < INLINE_LIMIT:
        return [_M_MEMORYVIEW, *meta, flat.tobytes()]
    return _oob(flat, ctx, "memoryview", meta, flat.nbytes)


def _oob(buf: object, ctx: _Ctx, kind: str, meta: object, nbytes: int) -> msgpack.ExtType:
    ctx.add(buf, nbytes)
    return msgpack.ExtType(_X_OOB, _packb([kind, meta, nbytes]))


def _canon_complex(x: Any, ctx: _Ctx, depth: int) -> object:
    re_, im = x.real, x.imag
    re_ = _NAN if re_ != re_ else re_
    im = _NAN if im != im else im
    return msgpack.ExtType(_X_COMPLEX, struct.pack(">dd", re_, im))


def _canon_decimal(x: Any, ctx: _Ctx, depth: int) -> object:
    return msgpack.ExtType(_X_DECIMAL, str(x).encode())


def _tz_tag(tz: _dt.tzinfo | None, sample: Any) -> str:
    if tz is None:
        return ""
    key = getattr(tz, "key", None)  # zoneinfo.ZoneInfo
    if isinstance(key, str):
        return key
    off = sample.utcoffset()
    return f"{tz.__class__.__name__}:{off}"


def _canon_date(x: Any, ctx: _Ctx, depth: int) -> object:
    return msgpack.ExtType(_X_DATE, x.isoformat().encode())


def _canon_time(x: Any, ctx: _Ctx, depth: int) -> object:
    tag = _tz_tag(x.tzinfo, x)
    return msgpack.ExtType(_X_TIME, f"{x.isoformat()}|{tag}|{x.fold}".encode())


def _canon_datetime(x: Any, ctx: _Ctx, depth: int) -> object:
    tag = _tz_tag(x.tzinfo, x)
    return msgpack.ExtType(_X_DATETIME, f"{x.isoformat()}|{tag}|{x.fold}".encode())


def _canon_timedelta(x: Any, ctx: _Ctx, depth: int) -> object:
    return msgpack.ExtType(_X_TIMEDELTA, struct.pack(">qii", x.days, x.seconds, x.microseconds))


def _canon_uuid(x: Any, ctx: _Ctx, depth: int) -> object:
    return msgpack.ExtType(_X_UUID, x.bytes)


def _canon_path(x: Any, ctx: _Ctx, depth: int) -> object:
    return [_M_PATH, type(x).__name__, str(x)]


def _canon_function(x: Any, ctx: _Ctx, depth: int) -> object:
    return [_M_FUNC, getattr(x, "__module__", None) or "?", x.__qualname__]


def _canon_type(x: Any, ctx: _Ctx, depth: int) -> object:
    return [_M_TYPE, x.__module__, x.__qualname__]


def _canon_partial(x: Any, ctx: _Ctx, depth: int) -> object:
    return [
        _M_PARTIAL,
        _canon(x.func, ctx, depth),
        _canon_list(x.args, ctx, depth),
        _canon_dict(x.keywords, ctx, depth),
    ]


def _canon_method(x: Any, ctx: _Ctx, depth: int) -> object:
    try:
        owner = _canon(x.__self__, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(".__self__")
        raise
    return [_M_METHOD, _canon_function(x.__func__, ctx, depth), owner]


def _canon_file(x: Any, ctx: _Ctx, depth: int) -> object:
    f: File = x
    if ctx.output_ref:
        return [_M_OUTPUT_FILE, f.path]
    ctx.add(f, 0)
    # content mode: the path is not part of the key (moving a file keeps it)
    return msgpack.ExtType(_X_FILE, _packb([f.by]))


_HANDLERS: dict[type, Callable[[Any, _Ctx, int], object]] = {
    list: _canon_list,
    tuple: _canon_tuple,
    dict: _canon_dict,
    set: _canon_set,
    frozenset: _canon_frozenset,
    bytes: _canon_bytes,
    bytearray: _canon_bytearray,
    memoryview: _canon_memoryview,
    complex: _canon_complex,
    decimal.Decimal: _canon_decimal,
    _dt.date: _canon_date,
    _dt.time: _canon_time,
    _dt.datetime: _canon_datetime,
    _dt.timedelta: _canon_timedelta,
    uuid.UUID: _canon_uuid,
    pathlib.PurePosixPath: _canon_path,
    pathlib.PureWindowsPath: _canon_path,
    pathlib.PosixPath: _canon_path,
    pathlib.WindowsPath: _canon_path,
    types.FunctionType: _canon_function,
    types.BuiltinFunctionType: _canon_function,
    types.MethodType: _canon_method,
    functools.partial: _canon_partial,
    File: _canon_file,
}


def _canon_other(x: object, ctx: _Ctx, depth: int) -> object:
    t = type(x)
    impl = id_for_memo.dispatch(t)
    if impl is not _ID_DEFAULT:
        try:
            value = impl(x, ctx.output_ref)
        except NotImplementedError:
            pass
        else:
            return [_M_CUSTOM, _qualname(t), _canon(value, ctx, depth)]
    if isinstance(x, enum.Enum):
        return [_M_ENUM, _qualname(t), x.name]
    if isinstance(x, type):
        return _canon_type(x, ctx, depth)
    if dataclasses.is_dataclass(x):
        out: list[object] = [_M_DATACLASS, _qualname(t)]
        for f in dataclasses.fields(x):
            try:
                out.append(f.name)
                out.append(_canon(getattr(x, f.name), ctx, depth))
            except _Unhashable as exc:
                exc.path.append(f".{f.name}")
                raise
        return out
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(x, np.ndarray):
            return _canon_ndarray(x, ctx, depth)
        if isinstance(x, np.generic):
            if x.dtype.hasobject:
                raise _Unhashable(x, "numpy object scalar")
            return [_M_NPSCALAR, x.dtype.str, x.tobytes()]
    for hook in fallback_hooks:
        value = hook(x, ctx.output_ref)
        if value is not NOT_HANDLED:
            return [_M_HOOK, _qualname(t), _canon(value, ctx, depth)]
    # subclasses of builtins: the type's name + the builtin value
    for base in (tuple, list, dict, set, frozenset, str, int, float, bytes):
        if isinstance(x, base):
            if base is tuple and hasattr(t, "_fields"):
                fields: Sequence[str] = getattr(t, "_fields", ())
                try:
                    inner: object = _canon_list(x, ctx, depth)
                except _Unhashable as exc:
                    # name the field, not the index: "args[0].port"
                    exc.path[-1:] = [f".{fields[int(exc.path[-1][1:-1])]}"]
                    raise
            else:
                conv: Any = base
                inner = _canon(conv(x), ctx, depth)
            return [_M_SUBCLASS, _qualname(t), inner]
    if callable(x) and hasattr(x, "__qualname__") and hasattr(x, "__module__"):
        return _canon_function(x, ctx, depth)  # builtin methods, C functions...
    raise _Unhashable(x, "no rule for this type")


def _canon_ndarray(x: Any, ctx: _Ctx, depth: int) -> object:
    if x.dtype.hasobject:
        raise _Unhashable(x, "numpy array of dtype object")
    if not x.flags.c_contiguous:
        x = x.copy(order="C")  # a copy, but only for strided arrays
    meta = [x.dtype.str, list(x.shape)]
    if x.dtype.fields is not None:
        meta.append(str(x.dtype.descr))
    if x.nbytes < INLINE_LIMIT:
        return [_M_NDARRAY, *meta, x.tobytes()]
    buf = memoryview(x).cast("B") if x.ndim else memoryview(x.tobytes())
    return _oob(buf, ctx, "ndarray", meta, x.nbytes)


_local = threading.local()


def _packb(obj: object) -> bytes:
    # msgpack.packb builds a Packer per call (~0.5 µs); a Packer is not
    # thread-safe, so keep one per thread.
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(
            use_bin_type=True, strict_types=True, datetime=False
        )
    try:
        return packer.pack(obj)  # type: ignore[no-any-return]
    except BaseException:
        packer.reset()
        raise


_FID_CACHE: dict[object, list[object]] = {}


def _func_identity(func: object, version: object) -> list[object]:
    if version is None:
        try:
            return _FID_CACHE[func]
        except (KeyError, TypeError):
            pass
    if type(func) is types.FunctionType:
        fid: list[object] = [func.__module__ or "?", func.__qualname__, version]
        if version is None and len(_FID_CACHE) < 4096:
            _FID_CACHE[func] = fid  # never mutated: packed as it is
        return fid
    if isinstance(func, types.FunctionType | types.BuiltinFunctionType | type):
        return [func.__module__ or "?", func.__qualname__, version]
    if isinstance(func, types.MethodType):
        return [func.__func__.__module__ or "?", func.__func__.__qualname__, version]
    if hasattr(func, "__qualname__") and hasattr(func, "__module__"):
        return [func.__module__ or "?", func.__qualname__, version]
    return [type(func).__module__, type(func).__qualname__, version]


def _where(top: str, path: list[str]) -> str:
    parts = path[::-1]
    if len(parts) > 12:  # a cycle or a very deep value: the head says where
        parts = [*parts[:8], "..."]
    return top + "".join(parts)


def _error(exc: _Unhashable, top: str) -> UnhashableInputError:
    where = _where(top, exc.path)
    t = type(exc.obj)
    tname = _qualname(t)
    if exc.reason == "nesting too deep":
        cyc = _find_cycle(exc)
        msg = (
            f"{where}: {cyc or 'nesting deeper than ' + str(MAX_DEPTH) + ' levels'}; "
            "aiomemo cannot key it"
        )
    else:
        msg = (
            f"{where}: aiomemo cannot key a value of type {tname} ({exc.reason}). "
            f"Register a stand-in: @aiomemo.id_for_memo.register def _(obj: {t.__name__}, "
            "output_ref=False): return <a keyable value>"
        )
    return UnhashableInputError(msg, where=where, type_name=tname)


def _find_cycle(exc: _Unhashable) -> str | None:
    return "a cyclic structure (it contains itself)" if _is_cyclic(exc.obj) else None


def _is_cyclic(obj: object) -> bool:
    seen: set[int] = set()
    stack: list[tuple[object, bool]] = [(obj, False)]
    on_path: set[int] = set()
    while stack:
        o, leaving = stack.pop()
        if leaving:
            on_path.discard(id(o))
            continue
        if id(o) in on_path:
            return True
        if id(o) in seen:
            continue
        children: list[object]
        if isinstance(o, dict):
            children = [*o.keys(), *o.values()]
        elif isinstance(o, list | tuple | set | frozenset):
            children = list(o)
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            children = [getattr(o, f.name) for f in dataclasses.fields(o)]
        else:
            continue
        seen.add(id(o))
        on_path.add(id(o))
        stack.append((o, True))
        stack.extend((c, False) for c in children)
    return False


def _task_tree(task: Mapping[str, Any]) -> tuple[bytes, _Ctx]:
    """Canonical stream head of a task, plus the out-of-band items to feed after it."""
    try:
        func = task["func"]
    except KeyError:
        raise TypeError("task has no 'func'") from None
    args = task.get("args", ())
    kwargs = task.get("kwargs") or {}
    if type(kwargs) is not dict and not isinstance(kwargs, Mapping):
        raise TypeError(f"task['kwargs'] must be a mapping, not {type(kwargs).__name__}")
    ignore = task.get("ignore_for_cache") or ()
    ctx = _Ctx()
    outputs: object = None
    if ignore or "outputs" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k not in ignore}
        if "outputs" in kwargs:
            ctx.output_ref = True
            try:
                outputs = _canon(kwargs.pop("outputs"), ctx, 0)
            except _Unhashable as exc:
                raise _error(exc, "kwargs['outputs']") from None
            ctx.output_ref = False
    try:
        version = task.get("version")
        fid = _func_identity(func, None if version is None else _canon(version, ctx, 0))
    except _Unhashable as exc:
        raise _error(exc, "version") from None
    if type(args) is not tuple and type(args) is not list and not isinstance(args, Sequence):
        raise TypeError(f"task['args'] must be a sequence, not {type(args).__name__}")
    try:
        cargs = _canon_list(args, ctx, 0)
    except _Unhashable as exc:
        raise _error(exc, "args") from None
    try:
        ckw = _canon_dict(kwargs, ctx, 0)
    except _Unhashable as exc:
        raise _error(exc, "kwargs") from None
    tree = [FORMAT_VERSION, fid, cargs, ckw, outputs]
    if task.get("track_code"):
        # the code fingerprint (aiomemo._fingerprint): a sixth item, so keys
        # without it stay as they were; its table read inline (hot path)
        try:
            e = _fingerprint._FAST.get(func)
        except TypeError:  # an unhashable callable object
            e = None
        if e is not None and e[0] is getattr(func, "__code__", None):
            tree.append(e[1])
        else:
            tree.append(_fingerprint.code_digest(func))
    head = _packb(tree)
    return head, ctx


def _feed_buffers_and_files_sync(h: Any, ctx: _Ctx) -> None:
    for item in ctx.oob:
        if isinstance(item, File):
            h.update(_file_part_sync(item))
        else:
            h.update(item)


def _abspath(path: str) -> str:
    # pure string work (no file system access) on the current directory
    return os.path.normpath(os.path.join(os.getcwd(), path))


def _file_error(f: File, exc: OSError) -> UnhashableInputError:
    return UnhashableInputError(
        f"File({f.path!r}): cannot read it to make the key: {exc}",
        where=f"File({f.path!r})",
        type_name="aiomemo.File",
    )


def _file_part_sync(f: File) -> bytes:
    try:
        if f.by == "stat":
            st = os.stat(f.path)
            return _packb([_abspath(f.path), st.st_size, st.st_mtime_ns])
        fh = blake3.blake3()
        with open(f.path, "rb") as fp:
            while chunk := fp.read(FILE_CHUNK):
                fh.update(chunk)
        return fh.digest()
    except OSError as exc:
        raise _file_error(f, exc) from exc


async def _file_part_async(f: File) -> bytes:
    try:
        if f.by == "stat":
            st = await aiofiles.os.stat(f.path)
            return _packb([_abspath(f.path), st.st_size, st.st_mtime_ns])
        fh = blake3.blake3()
        async with aiofiles.open(f.path, "rb") as fp:
            while chunk := await fp.read(FILE_CHUNK):
                fh.update(chunk)
        return fh.digest()
    except OSError as exc:
        raise _file_error(f, exc) from exc


def hash_task(task: Mapping[str, Any]) -> bytes:
    """The task's key as 32 raw bytes (sync; reads Files with plain reads)."""
    head, ctx = _task_tree(task)
    h = blake3.blake3(head)
    if ctx.oob:
        _feed_buffers_and_files_sync(h, ctx)
    return h.digest()


async def hash_task_async(task: Mapping[str, Any]) -> bytes:
    """The task's key as 32 raw bytes, without stalling the event loop.

    The canonical tree is built on the loop; Files are read with aiofiles;
    when the out-of-band buffers add up to ``THREAD_THRESHOLD`` or more they
    are hashed in a worker thread (blake3 releases the GIL).
    """
    if task.get("track_code"):
        func = task.get("func")
        try:
            ready = func in _fingerprint._FAST
        except TypeError:  # an unhashable callable object
            ready = False
        if not ready:
            await _fingerprint.prepare(func)  # reads source: off the loop
    head, ctx = _task_tree(task)
    h = blake3.blake3(head)
    if not ctx.oob:
        return h.digest()
    parts: list[object] = []
    for item in ctx.oob:
        parts.append(await _file_part_async(item) if isinstance(item, File) else item)
    if ctx.oob_bytes >= THREAD_THRESHOLD:
        await asyncio.to_thread(_update_all, h, parts)
    else:
        _update_all(h, parts)
    return h.digest()


def _update_all(h: Any, parts: Sequence[object]) -> None:
    for p in parts:
        h.update(p)


#: large buffers above this are sampled (head and tail) in per-argument digests
_DIGEST_SAMPLE: Final = 1 << 20
ARG_DIGEST_SIZE: Final = 8


_DIGEST_PAIR = struct.Struct("<II")
_CRC_SEED: Final = 0x9E3779B9


def _arg_digest(value: object, output_ref: bool = False) -> bytes:
    t = type(value)
    if t is str or t is bool or value is None or (t is int and _INT_MIN <= value <= _INT_MAX):  # type: ignore[operator]
        head = _packb(value)  # already canonical: no walk
        return _DIGEST_PAIR.pack(zlib.crc32(head), zlib.crc32(head, _CRC_SEED))
    ctx = _Ctx()
    ctx.output_ref = output_ref
    head = _packb(_canon(value, ctx, 0))
    if ctx.oob is _Ctx.oob:
        # advisory only (explain): two CRC-32s are ~10x cheaper than a
        # blake3 object for the small arguments most tasks have
        return _DIGEST_PAIR.pack(zlib.crc32(head), zlib.crc32(head, _CRC_SEED))
    h = blake3.blake3(head)
    for item in ctx.oob:
        if isinstance(item, File):
            h.update(_packb([item.by, item.path]))  # not re-read: path and mode only
            continue
        mv = memoryview(cast(Any, item)).cast("B")
        if mv.nbytes <= 2 * _DIGEST_SAMPLE:
            h.update(mv)
        else:
            h.update(mv[:_DIGEST_SAMPLE])
            h.update(mv[-_DIGEST_SAMPLE:])
    return h.digest()[:ARG_DIGEST_SIZE]


def arg_digests(task: Mapping[str, Any]) -> bytes:
    """Short per-argument digests of a task, for ``explain`` (why did it miss?).

    Returns ``packb([[d0, d1, ...], {kwarg: d, ...}])`` with 8-byte digests
    (two CRC-32s of the canonical form; blake3 when large buffers are in
    it) of each positional argument and each keyword argument (after
    ``ignore_for_cache``; ``outputs`` as output refs). Files count by path
    and mode (not re-read) and buffers over 2 MiB by their head, tail and
    size, so this stays cheap; the key itself is always exact. Values that
    cannot be keyed get an empty digest.
    """
    args = task.get("args", ())
    kwargs = task.get("kwargs") or {}
    ignore = task.get("ignore_for_cache") or ()
    pos: list[bytes] = []
    for a in args:
        try:
            pos.append(_arg_digest(a))
        except (_Unhashable, TypeError, ValueError):
            pos.append(b"")
    kw: dict[str, bytes] = {}
    if kwargs:
        for name in sorted(kwargs):
            if name in ignore:
                continue
            try:
                kw[name] = _arg_digest(kwargs[name], output_ref=name == "outputs")
            except (_Unhashable, TypeError, ValueError):
                kw[name] = b""
    return _packb([pos, kw])


def make_hash(task: Mapping[str, Any]) -> str:
    """The key of a task: 64 hex characters of blake3-256.

    ``task`` is a mapping with ``func``, ``args``, ``kwargs`` and optionally
    ``ignore_for_cache`` (kwargs left out of the key; absent names are
    ignored) and ``version`` (separates functions that share a qualname).
    Parsl's TaskRecord dicts work as they are.

    Raises:
        UnhashableInputError: an input has no key; the message says where
            (``kwargs['cfg'][3]``), its type, and how to register one.
    """
    return hash_task(task).hex()


async def make_hash_async(task: Mapping[str, Any]) -> str:
    """:func:`make_hash` for coroutines: never stalls the event loop."""
    return (await hash_task_async(task)).hex()

