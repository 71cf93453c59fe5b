"""Task keys: a canonical msgpack stream of the task's inputs, hashed with blake3.

The key of a task is ``blake3(stream).hexdigest()`` where ``stream`` is

1. ``packb(tree)``: one msgpack document, the canonical form of
   ``[FORMAT, [module, qualname, version], args, kwargs, outputs]``, then
2. the payload of every large buffer and every :class:`File` in ``tree``,
   fed to the hasher as they are (no copy), in the canonical order of the
   tree (outputs, version, func, args, kwargs, and inside sorted containers
   the sorted order; members whose canonical form ties are ordered by the
   digest of their content). ``tree`` holds a header for each (kind, dtype,
   shape, length), so the stream stays unambiguous.

Canonical form (format version 1; golden vectors in the tests pin it):

* ``None``, ``bool``, ``str`` and ints that fit in 64 bits are msgpack's own
  types; a bigger int is ext ``BIGINT``. msgpack tells int, float, bool, str
  and bin apart, so ``1``, ``1.0``, ``True``, ``"1"`` and ``b"1"`` differ.
* floats are keyed by their 64 bits: ``-0.0`` and ``0.0`` are two keys, and
  so are NaNs of another sign or payload (a function may tell them apart:
  ``math.copysign``, ``struct.pack``); ``float("nan")`` is one key.
* lists are msgpack arrays; every other container is an array that starts
  with a *mark* (an empty ext value; user data can never contain one), so
  ``(1,)`` and ``[1]`` differ. Sets are sorted by the packed bytes of their
  members; dicts whose keys are all ``str`` are msgpack maps sorted by key,
  other dicts a marked array sorted by packed key.
* bytes shorter than ``INLINE_LIMIT`` are msgpack bin; longer buffers
  (bytes, bytearray, memoryview, contiguous numpy arrays) go out of band.
* everything else is tagged with its kind and, for user types, the type's
  ``module.qualname`` (which must lead back to the class, or it raises).

The rule every handler follows: two inputs share a key only when no
function could tell them apart; what aiomemo cannot tell raises
``UnhashableInputError`` naming where it sits.
"""

from __future__ import annotations

import array
import asyncio
import collections
import dataclasses
import datetime as _dt
import decimal
import enum
import fractions
import functools
import itertools
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
    "IgnoreNames",
    "KeyHook",
    "arg_digests",
    "check_ignore",
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
_X_SURROGATE_STR = 12  # a str holding lone surrogates: its "surrogatepass" UTF-8 bytes


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
_M_ORDERED = _mark(50)  # pairs in insertion order (an OrderedDict not in sorted order)
_M_DEQUE = _mark(51)
_M_CHAINMAP = _mark(52)
_M_RANGE = _mark(53)
_M_SLICE = _mark(54)
_M_FRACTION = _mark(55)
_M_ARRAY = _mark(56)  # array.array
_M_NAMESPACE = _mark(57)  # types.SimpleNamespace
_M_WRAPPER = _mark(58)  # staticmethod, classmethod, lru_cache wrapper not found by name
_M_OUTPUTS_NONE = _mark(59)  # outputs=None given (the tree's None means "not given")
_M_CLOSURE = _mark(61)  # then the code, defaults and closure of a function not found by name


class _NotHandled:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_HANDLED"


#: returned by a fallback hook that has nothing to say about a value
NOT_HANDLED: Final = _NotHandled()

#: A key hook, given to ``Memoizer(key_hooks=...)`` or ``hash_task(hooks=...)``:
#: tried, in order, for a value no built-in rule or ``id_for_memo``
#: registration covers; ``hook(obj, output_ref)`` returns a keyable stand-in
#: or ``NOT_HANDLED``. Hooks belong to one Memoizer: nothing process-global.
KeyHook = Callable[[object, bool], object]

#: names of keyword arguments left out of a key: a list (or tuple, set) of
#: str, never a bare str (``"log"`` would be read as ``l``, ``o``, ``g``)
IgnoreNames = list[str] | tuple[str, ...] | set[str] | frozenset[str]


def check_ignore(ignore: object, what: str = "ignore") -> list[str]:
    """``ignore`` as a list of names; TypeError for a bare str or a non-str name."""
    if isinstance(ignore, str | bytes):
        raise TypeError(
            f"{what} must be a list of keyword names, not a bare str: "
            f"write [{ignore!r}], not {ignore!r}"
        )
    try:
        names: list[str] = list(cast(Any, ignore))
    except TypeError:
        raise TypeError(
            f"{what} must be a list of keyword names, not {type(ignore).__name__}"
        ) from None
    for name in names:
        if type(name) is not str:
            raise TypeError(
                f"{what} holds {name!r} ({type(name).__name__}): it must hold keyword names (str)"
            )
    return names


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
    hooks: tuple[KeyHook, ...] = ()
    #: sorted containers whose order waits on the content of their buffers
    pending: list[_Pending] = []  # noqa: RUF012 - never mutated: swapped like oob
    #: functions whose closure is being keyed (a recursive closure holds itself)
    funcs: list[object] = []  # noqa: RUF012 - never mutated: swapped like oob

    def add(self, item: object, nbytes: int) -> None:
        if self.oob is _Ctx.oob:
            self.oob = []
        self.oob.append(item)
        self.oob_bytes += nbytes


class _Pending:
    """A sorted container (set, frozenset, dict with non-str keys) whose members
    tie on their canonical form but hold out-of-band content (two 5 KB bytes,
    two Files): their order, and the order of their payloads in the stream,
    is decided by the digests of that content once it is known (Files are
    read first, asynchronously on the async path).

    ``out[offset:]`` is the container's part of the tree, rewritten in place
    by :meth:`resolve`; ``items`` is then its out-of-band items in canonical
    order (this object stands for them in its parent's list).
    """

    __slots__ = ("entries", "items", "offset", "out")

    def __init__(
        self,
        out: list[object],
        offset: int,
        entries: list[tuple[bytes, list[object], list[object]]],
    ) -> None:
        self.out = out
        self.offset = offset
        self.entries = entries  # (canonical bytes, tree items, out-of-band items)
        self.items: list[object] = []

    def resolve(self, part: Callable[[object], object]) -> None:
        keyed = []
        for packed, tree_items, oob in self.entries:
            h = blake3.blake3()
            for leaf in _leaves(oob):
                h.update(part(leaf))  # type: ignore[arg-type]
            keyed.append((packed, h.digest(), tree_items, oob))
        keyed.sort(key=lambda e: (e[0], e[1]))
        del self.out[self.offset :]
        for _, _, tree_items, oob in keyed:
            self.out.extend(tree_items)
            self.items.extend(oob)


def _leaves(items: list[object]) -> Any:
    """Out-of-band items in canonical order, resolved containers expanded."""
    for item in items:
        if type(item) is _Pending:
            yield from _leaves(item.items)
        else:
            yield item


def _order(
    ctx: _Ctx,
    start: int,
    out: list[object],
    entries: list[tuple[bytes, list[object], int]],
) -> None:
    """Append the sorted entries' tree items to ``out`` and put their out-of-band
    items (``ctx.oob[start:]``, each entry's ending at its index) in the same order.

    Out-of-band payloads are referenced by position, so they must follow the
    canonical order of the tree, not the order the container iterated in.
    """
    if len(ctx.oob) == start:  # nothing out of band: the common case
        entries.sort(key=lambda e: e[0])
        for e in entries:
            out.extend(e[1])
        return
    segs = ctx.oob[start:]
    del ctx.oob[start:]
    lo = start
    split: list[tuple[bytes, list[object], list[object]]] = []
    for packed, tree_items, hi in entries:
        split.append((packed, tree_items, segs[lo - start : hi - start]))
        lo = hi
    split.sort(key=lambda e: e[0])
    tie = any(
        split[i][0] == split[i + 1][0] and (split[i][2] or split[i + 1][2])
        for i in range(len(split) - 1)
    )
    if not tie:
        for _, tree_items, oob in split:
            out.extend(tree_items)
            ctx.oob.extend(oob)
        return
    offset = len(out)
    for _, tree_items, _ in split:
        out.extend(tree_items)  # a placeholder order: same bytes whatever the order
    pending = _Pending(out, offset, split)
    if ctx.pending is _Ctx.pending:
        ctx.pending = []
    ctx.pending.append(pending)  # inner containers come first: resolved first
    ctx.oob.append(pending)


def _resolve(ctx: _Ctx, part: Callable[[object], object]) -> None:
    for pending in ctx.pending:
        pending.resolve(part)


def _safe_repr(x: object) -> str:
    """``repr(x)`` for an error's path, never raising (a user's __repr__ may)."""
    try:
        r = repr(x)
    except Exception:
        return f"<{type(x).__name__} object>"
    return r if len(r) <= 80 else r[:77] + "..."


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
        return x  # by its bits (msgpack packs them as they are)
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
            or te is float
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
                or te is float
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
                or tv is float
            ):
                out[k] = v
            elif tv is list:
                out[k] = _canon_list(v, ctx, depth + 1)
            elif tv is dict:
                out[k] = _canon_dict(v, ctx, depth + 1)
            else:
                out[k] = _canon(v, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(f"[{_safe_repr(k)}]")
        raise
    return out


def _canon_map(x: Any, ctx: _Ctx, depth: int) -> object:
    """A dict with some non-str key: a marked array of pairs sorted by packed key."""
    start = len(ctx.oob)
    entries: list[tuple[bytes, list[object], int]] = []
    for k in x:
        try:
            ck = _canon(k, ctx, depth)
        except _Unhashable as exc:
            exc.path.append(f" key {_safe_repr(k)}")
            raise
        try:
            cv = _canon(x[k], ctx, depth)
        except _Unhashable as exc:
            exc.path.append(f"[{_safe_repr(k)}]")
            raise
        entries.append((_packb(ck), [ck, cv], len(ctx.oob)))
    if len({e[0] for e in entries}) < len(entries):
        # distinct keys with one canonical form (NaNs): order by the pair, so
        # that insertion order does not leak into the key
        entries = [(_packb(e[1]), e[1], e[2]) for e in entries]
    flat: list[object] = [_M_MAP]
    _order(ctx, start, flat, entries)
    return flat


def _sorted_members(x: Any, ctx: _Ctx, depth: int, mark: msgpack.ExtType) -> list[object]:
    if all(type(e) is str for e in x):
        members: list[object] = sorted(x)
        members.insert(0, mark)
        return members
    start = len(ctx.oob)
    entries: list[tuple[bytes, list[object], int]] = []
    for e in x:
        try:
            ce = _canon(e, ctx, depth)
        except _Unhashable as exc:
            exc.path.append(f" member {_safe_repr(e)}")
            raise
        entries.append((_packb(ce), [ce], len(ctx.oob)))
    out: list[object] = [mark]
    _order(ctx, start, out, entries)
    return out


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
    try:
        meta = [mv.format, list(mv.shape or ())]
    except ValueError:  # released
        raise _Unhashable(x, "a released memoryview") from None
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
    return msgpack.ExtType(_X_COMPLEX, struct.pack(">dd", x.real, x.imag))


def _canon_decimal(x: Any, ctx: _Ctx, depth: int) -> object:
    return msgpack.ExtType(_X_DECIMAL, str(x).encode())


def _tz_tag(tz: _dt.tzinfo | None, sample: Any) -> str:
    if tz is None:
        return ""
    if type(tz) is _dt.timezone:
        off = sample.utcoffset()
        if len(tz.__getinitargs__()) == 1:  # type: ignore[attr-defined]
            return f"timezone:{off}"  # unnamed (timezone.utc included)
        # named, even as the default would be: repr() tells timezone(0, "UTC")
        # from timezone.utc
        return f"timezone:{off}:{tz.tzname(None)}"
    key = getattr(tz, "key", None)
    if isinstance(key, str) and _is_zoneinfo(tz):
        return key
    # another tzinfo (or a ZoneInfo read from a file, without a key): its
    # offset now says nothing of its rules, and a name may not be unique
    raise _Unhashable(
        tz, "a time zone aiomemo cannot name: use zoneinfo.ZoneInfo(key) or datetime.timezone"
    )


def _is_zoneinfo(tz: object) -> bool:
    zi = sys.modules.get("zoneinfo")
    return zi is not None and type(tz) is zi.ZoneInfo  # a subclass may override tzname...


def _canon_date(x: Any, ctx: _Ctx, depth: int) -> object:
    return msgpack.ExtType(_X_DATE, x.isoformat().encode())


def _canon_time(x: Any, ctx: _Ctx, depth: int) -> object:
    tag = _tz_tag(x.tzinfo, x) if x.tzinfo is not None else ""
    return msgpack.ExtType(_X_TIME, f"{x.isoformat()}|{tag}|{x.fold}".encode())


def _canon_datetime(x: Any, ctx: _Ctx, depth: int) -> object:
    tag = _tz_tag(x.tzinfo, x) if x.tzinfo is not None else ""
    return msgpack.ExtType(_X_DATETIME, f"{x.isoformat()}|{tag}|{x.fold}".encode())


def _canon_timedelta(x: Any, ctx: _Ctx, depth: int) -> object:
    return msgpack.ExtType(_X_TIMEDELTA, struct.pack(">qii", x.days, x.seconds, x.microseconds))


def _canon_uuid(x: Any, ctx: _Ctx, depth: int) -> object:
    return msgpack.ExtType(_X_UUID, x.bytes)


def _canon_path(x: Any, ctx: _Ctx, depth: int) -> object:
    return [_M_PATH, type(x).__name__, str(x)]


def _canon_function(x: Any, ctx: _Ctx, depth: int) -> object:
    mod = getattr(x, "__module__", None) or "?"
    qn = x.__qualname__
    if type(x) is not types.FunctionType:
        return [_M_FUNC, mod, qn]
    steps = _function_named(x, mod, qn)
    if steps == 0:
        return [_M_FUNC, mod, qn]
    if steps > 0:
        # reached through the wrapper its name leads to (functools.wraps, a Parsl
        # app): not the wrapper itself, which may do something else
        return [_M_FUNC, mod, qn, steps]
    # a lambda, a closure, a function made in a loop: its name is not its
    # identity, so key what decides what it does (as code tracking would)
    if x.__globals__ is not getattr(sys.modules.get(mod), "__dict__", None):
        raise _Unhashable(
            x, "a function made outside its module's namespace (exec with other globals)"
        )
    if x in ctx.funcs:
        # a recursive closure: a back-reference, how many functions up the walk
        return [_M_FUNC, mod, qn, _M_CLOSURE, len(ctx.funcs) - 1 - ctx.funcs.index(x)]
    if ctx.funcs is _Ctx.funcs:
        ctx.funcs = []
    ctx.funcs.append(x)
    try:
        return [_M_FUNC, mod, qn, _M_CLOSURE, *_function_state(x, ctx, depth)]
    finally:
        ctx.funcs.pop()


def _function_named(x: object, mod: str, qn: str) -> int:
    """How many unwrapping steps lead from what ``module.qualname`` names to ``x``
    (0: the name leads to ``x``; 1+: to a wrapper of it, a decorated function:
    ``functools.wraps``, a Parsl app, ``memo.cached``); -1 when none do."""
    if "<" in qn:  # <locals>, <lambda>: never found
        return -1
    obj = _lookup(mod, qn.split("."))
    try:
        for step in range(4):
            if obj is x:
                return step
            obj = (
                getattr(obj, "__wrapped__", None)
                or getattr(obj, "__func__", None)  # a classmethod, bound to its class
                or getattr(obj, "func", None)  # a Parsl app
            )
            if obj is None:
                return -1
    except Exception:  # an attribute that fails on access
        return -1
    return -1


def _function_state(x: Any, ctx: _Ctx, depth: int) -> list[object]:
    code = x.__code__
    digest = _CODE_DIGESTS.get(code)
    if digest is None:
        # this _packb: str constants with lone surrogates pack too
        digest = blake3.blake3(_packb(_fingerprint._code_form(code))).digest()
        if len(_CODE_DIGESTS) < 4096:
            _CODE_DIGESTS[code] = digest
    try:
        defaults = _canon_list(x.__defaults__ or (), ctx, depth)
        kwdefaults = _canon_dict(x.__kwdefaults__ or {}, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(f" (a default of {x.__qualname__})")
        raise
    cells: list[object] = []
    for name, cell in zip(code.co_freevars, x.__closure__ or (), strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            cells.append(_M_CLOSURE)
            continue
        try:
            cells.append(_canon(value, ctx, depth))
        except _Unhashable as exc:
            exc.path.append(f" (closure variable {name!r} of {x.__qualname__})")
            raise
    state = [digest, defaults, kwdefaults, cells]
    attrs = x.__dict__
    if attrs:  # attributes set on it (a counter, a wrapper's __wrapped__): it may read them
        try:
            state.append(_canon_dict(attrs, ctx, depth))
        except _Unhashable as exc:
            exc.path.append(f" (an attribute of {x.__qualname__})")
            raise
    return state


_CODE_DIGESTS: dict[types.CodeType, bytes] = {}


def _found_as(x: object, mod: object, qn: object) -> bool:
    """Whether ``x`` is what its module.qualname leads to."""
    if not isinstance(mod, str) or not isinstance(qn, str):
        return False
    return _lookup(mod, qn.split(".")) is x


def _lookup(mod: str, parts: Sequence[str]) -> object:
    """What ``module.qualname`` leads to now (None when nothing)."""
    obj: object = sys.modules.get(mod)
    try:
        for part in parts:
            obj = getattr(obj, part, None)
    except Exception:  # a module attribute that fails on access
        return None
    return obj


def _canon_descriptor(x: Any, ctx: _Ctx, depth: int) -> object:
    """An unbound C method (``str.upper``, ``str.__add__``): its class + name."""
    owner = x.__objclass__
    _named_class(x, owner)
    return [_M_FUNC, owner.__module__, x.__qualname__]


def _class_name(t: type) -> str | None:
    """``module.qualname`` of a class when that name leads back to it, else None.

    Only then does the name identify the class: two classes defined by one
    function (or made with ``type()`` / ``namedtuple()`` and never stored
    under their name) may share it and still differ.
    """
    try:
        name, mod, parts = _CLASS_NAMES[t]
    except (KeyError, TypeError):
        pass
    else:
        if parts is None:
            return name  # a static C type: one per process, whatever its name
        # a class may be redefined (a reload, a notebook cell run again): the
        # name must still lead to this class, not only when first looked up
        return name if _lookup(mod, parts) is t else None
    mod = getattr(t, "__module__", None) or "?"
    qn = getattr(t, "__qualname__", None) or "?"
    heap = bool(t.__flags__ & _HEAPTYPE)
    if heap and not _found_as(t, mod, qn):
        return None
    name = f"{mod}.{qn}"
    if len(_CLASS_NAMES) < 4096:
        _CLASS_NAMES[t] = (name, mod, tuple(qn.split(".")) if heap else None)
    return name


_CLASS_NAMES: dict[type, tuple[str, str, tuple[str, ...] | None]] = {}
_HEAPTYPE: Final = 1 << 9  # Py_TPFLAGS_HEAPTYPE


def _named_class(x: object, t: type) -> str:
    name = _class_name(t)
    if name is None:
        raise _Unhashable(
            x,
            f"its class {_qualname(t)} cannot be found under that name (defined inside a "
            "function, or made dynamically), so another class may share the name; define "
            "it at module level or register a stand-in",
        )
    return name


def _canon_type(x: Any, ctx: _Ctx, depth: int) -> object:
    _named_class(x, x)
    return [_M_TYPE, x.__module__, x.__qualname__]


def _canon_partial(x: Any, ctx: _Ctx, depth: int) -> object:
    if _instance_dict(x):
        raise _Unhashable(x, "a partial with attributes the key would not see")
    try:
        func = _canon(x.func, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(".func")
        raise
    try:
        args = _canon_list(x.args, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(".args")
        raise
    try:
        kw = _canon_dict(x.keywords, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(".keywords")
        raise
    return [_M_PARTIAL, func, args, kw]


def _canon_method(x: Any, ctx: _Ctx, depth: int) -> object:
    try:
        owner = _canon(x.__self__, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(".__self__")
        raise
    try:
        func = _canon(x.__func__, ctx, depth)  # a function, or any callable object
    except _Unhashable as exc:
        exc.path.append(".__func__")
        raise
    return [_M_METHOD, func, owner]


def _canon_builtin(x: Any, ctx: _Ctx, depth: int) -> object:
    """A C function, or a C method bound to an object (``"abc".upper``, ``{}.get``)."""
    owner = getattr(x, "__self__", None)
    if owner is None or type(owner) is types.ModuleType:
        return _canon_function(x, ctx, depth)
    try:
        cowner = _canon(owner, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(".__self__")
        raise
    return [_M_METHOD, _canon_function(x, ctx, depth), cowner]


def _canon_file(x: Any, ctx: _Ctx, depth: int) -> object:
    f: File = x
    if ctx.output_ref:
        return [_M_OUTPUT_FILE, f.path]
    ctx.add(f, 0)
    # content mode: the path is not part of the key (moving a file keeps it)
    return msgpack.ExtType(_X_FILE, _packb([f.by]))


def _canon_ordereddict(x: Any, ctx: _Ctx, depth: int) -> object:
    """OrderedDict: ``==`` sees the order, so the key does (as before when sorted)."""
    _no_hidden_state(x, type(x), "OrderedDict")
    # read with OrderedDict's own methods: a subclass may override __iter__, items...
    pairs = list(collections.OrderedDict.items(x))
    keys = [k for k, _ in pairs]
    if all(type(k) is str for k in keys):
        in_order = keys == sorted(keys)
    else:
        probe = _Ctx()
        probe.hooks = ctx.hooks
        try:
            packed = [_packb(_canon(k, probe, depth)) for k in keys]
        except _Unhashable as exc:
            exc.path.append(" key")
            raise
        # strictly increasing: keys that tie (two NaNs) keep their order only as pairs
        in_order = all(a < b for a, b in itertools.pairwise(packed))
    if in_order:
        return [_M_SUBCLASS, _named_class(x, type(x)), _canon_dict(dict(pairs), ctx, depth)]
    flat: list[object] = [_M_ORDERED]
    for k, v in pairs:
        try:
            flat.append(_canon(k, ctx, depth))
        except _Unhashable as exc:
            exc.path.append(f" key {_safe_repr(k)}")
            raise
        try:
            flat.append(_canon(v, ctx, depth))
        except _Unhashable as exc:
            exc.path.append(f"[{_safe_repr(k)}]")
            raise
    return [_M_SUBCLASS, _named_class(x, type(x)), flat]


def _canon_defaultdict(x: Any, ctx: _Ctx, depth: int) -> object:
    """defaultdict: its content and its factory (``d[missing]`` tells factories apart)."""
    _no_hidden_state(x, type(x), "defaultdict")
    try:
        factory = _canon(x.default_factory, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(".default_factory")
        raise
    content = _canon_dict(dict(dict.items(x)), ctx, depth)
    return [_M_SUBCLASS, _named_class(x, type(x)), content, factory]


def _instance_dict(x: object) -> dict[str, Any] | None:
    """The attributes of ``x``, read with the ``__dict__`` descriptor Python made
    for its class: a ``__dict__`` property or a ``__getattribute__`` the class
    defines cannot hide them."""
    t = type(x)
    try:
        desc = _DICT_DESCR[t]
    except (KeyError, TypeError):
        desc = None
        for klass in t.__mro__:
            d = vars(klass).get("__dict__")
            if type(d) is types.GetSetDescriptorType:
                desc = d
                break
        if len(_DICT_DESCR) < 4096:
            _DICT_DESCR[t] = desc
    if desc is None:
        if t.__dictoffset__ or t.__flags__ & _MANAGED_DICT:
            # instances have a dict, but a class hides it behind its own __dict__
            raise _Unhashable(x, "its class redefines __dict__, so its attributes cannot be read")
        return None  # no class on the way gives its instances a dict
    return cast("dict[str, Any] | None", desc.__get__(x, t))


_DICT_DESCR: dict[type, Any] = {}
_MANAGED_DICT: Final = 1 << 4  # Py_TPFLAGS_MANAGED_DICT (3.11+): a dict kept before the object


def _slots_of(t: type) -> tuple[tuple[str, Any], ...]:
    """``(name, descriptor)`` of every ``__slots__`` entry declared along the MRO of
    ``t`` (by classes written in Python: a C type's members are its value)."""
    try:
        return _SLOTS[t]
    except (KeyError, TypeError):
        pass
    found: list[tuple[str, Any]] = []
    for klass in t.__mro__:
        own = vars(klass)
        declared = own.get("__slots__", ())
        for name in (declared,) if isinstance(declared, str) else declared:
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}"  # name mangling
            desc = own.get(name)
            if type(desc) is types.MemberDescriptorType:
                found.append((name, desc))
    if len(_SLOTS) < 4096:
        _SLOTS[t] = tuple(found)
    return tuple(found)


_SLOTS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _set_slot(x: object, t: type, slots: tuple[tuple[str, Any], ...]) -> str | None:
    """The name of the first of ``slots`` that holds a value in ``x``."""
    for name, desc in slots:
        try:
            desc.__get__(x, t)
        except AttributeError:  # never set (or deleted): no state
            continue
        return name
    return None


def _no_hidden_state(x: object, t: type, what: str) -> None:
    """Raise when an instance of a built-in's subclass holds more than the value."""
    if _instance_dict(x):
        raise _Unhashable(x, f"a {what} with instance attributes the key would not see")
    name = _set_slot(x, t, _slots_of(t))
    if name is not None:
        raise _Unhashable(x, f"a {what} with slot {name!r}, which the key would not see")


def _canon_deque(x: Any, ctx: _Ctx, depth: int) -> object:
    return [_M_DEQUE, x.maxlen, _canon_list(x, ctx, depth)]


def _canon_chainmap(x: Any, ctx: _Ctx, depth: int) -> object:
    extra = sorted(set(_instance_dict(x) or ()) - {"maps"})  # a ChainMap keeps .maps there
    if extra:
        raise _Unhashable(x, f"a ChainMap with attribute {extra[0]!r}, which the key would not see")
    try:
        return [_M_CHAINMAP, _canon_list(x.maps, ctx, depth)]
    except _Unhashable as exc:
        exc.path[-1:] = [f".maps{exc.path[-1]}"]
        raise


def _canon_range(x: Any, ctx: _Ctx, depth: int) -> object:
    # start/stop/step, not the items: range(0) and range(5, 5) compare equal
    # but a function can read .start
    return [
        _M_RANGE,
        _canon(x.start, ctx, depth),
        _canon(x.stop, ctx, depth),
        _canon(x.step, ctx, depth),
    ]


def _canon_slice(x: Any, ctx: _Ctx, depth: int) -> object:
    try:
        return [
            _M_SLICE,
            _canon(x.start, ctx, depth),
            _canon(x.stop, ctx, depth),
            _canon(x.step, ctx, depth),
        ]
    except _Unhashable as exc:
        exc.path.append(".slice")
        raise


def _canon_fraction(x: Any, ctx: _Ctx, depth: int) -> object:
    return [_M_FRACTION, _canon(x.numerator, ctx, depth), _canon(x.denominator, ctx, depth)]


def _canon_array(x: Any, ctx: _Ctx, depth: int) -> object:
    nbytes = len(x) * x.itemsize
    if nbytes < INLINE_LIMIT:
        return [_M_ARRAY, x.typecode, x.tobytes()]
    return [_M_ARRAY, x.typecode, _oob(memoryview(x).cast("B"), ctx, "array", None, nbytes)]


def _canon_namespace(x: Any, ctx: _Ctx, depth: int) -> object:
    return [_M_NAMESPACE, _canon_dict(vars(x), ctx, depth)]


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
    types.BuiltinFunctionType: _canon_builtin,
    types.MethodWrapperType: _canon_builtin,
    types.MethodDescriptorType: _canon_descriptor,
    types.WrapperDescriptorType: _canon_descriptor,
    types.ClassMethodDescriptorType: _canon_descriptor,
    types.MethodType: _canon_method,
    functools.partial: _canon_partial,
    File: _canon_file,
    collections.OrderedDict: _canon_ordereddict,
    collections.defaultdict: _canon_defaultdict,
    collections.deque: _canon_deque,
    collections.ChainMap: _canon_chainmap,
    range: _canon_range,
    slice: _canon_slice,
    fractions.Fraction: _canon_fraction,
    array.array: _canon_array,
    types.SimpleNamespace: _canon_namespace,
}


def _canon_enum(x: Any, ctx: _Ctx, depth: int) -> object:
    t = type(x)
    qn = _named_class(x, t)
    name = x._name_
    if name is not None and t._member_map_.get(name) is x:
        return [_M_ENUM, qn, name]  # a member of the class body: its name says which
    # a pseudo-member (Flag combinations, zero, unknown bits): by value
    try:
        return [_M_ENUM, qn, None, _canon(x._value_, ctx, depth)]
    except _Unhashable as exc:
        exc.path.append(".value")
        raise


class _DataclassInfo:
    __slots__ = ("fields", "names", "slots")

    def __init__(self, t: type) -> None:
        self.fields = tuple(f.name for f in dataclasses.fields(t))
        self.names = frozenset(self.fields)
        #: slots that are not fields (a base class's, say): state the key would miss
        self.slots = tuple((n, d) for n, d in _slots_of(t) if n not in self.names)


_DC_INFO: dict[type, _DataclassInfo] = {}


def _canon_dataclass(x: Any, ctx: _Ctx, depth: int) -> object:
    t = type(x)
    out: list[object] = [_M_DATACLASS, _named_class(x, t)]
    try:
        info = _DC_INFO[t]
    except KeyError:
        info = _DataclassInfo(t)
        if len(_DC_INFO) < 4096:
            _DC_INFO[t] = info
    for name in info.fields:
        try:
            try:
                value = getattr(x, name)
            except AttributeError:
                raise _Unhashable(x, "this field is not set (init=False, or deleted)") from None
            except Exception as exc:  # a property over the field that fails
                raise _Unhashable(
                    x, f"reading this field raised {type(exc).__name__}: {exc}"
                ) from None
            out.append(name)
            out.append(_canon(value, ctx, depth))
        except _Unhashable as exc:
            exc.path.append(f".{name}")
            raise
    attrs = _instance_dict(x)
    if attrs:
        for name in attrs:
            if name not in info.names and not isinstance(
                getattr(t, name, None), functools.cached_property
            ):
                raise _Unhashable(
                    x, f"attribute {name!r} is not a dataclass field, so the key would not see it"
                )
    slot = _set_slot(x, t, info.slots)
    if slot is not None:
        raise _Unhashable(x, f"slot {slot!r} is not a dataclass field, so the key would not see it")
    if isinstance(x, _VALUE_BASES):
        # a dataclass that is also a list, a str, a File...: its value as well
        out.append(_M_SUBCLASS)
        out.append(_base_value(x, t, ctx, depth))
    elif t not in _PLAIN_DATACLASSES:
        # another C base with state of its own (an Exception's args, a complex,
        # a Decimal): the fields do not show it
        for klass in t.__mro__:
            if _has_c_state(klass):
                raise _Unhashable(
                    x, f"a dataclass that is also a {_qualname(klass)}: register a stand-in"
                )
        if len(_PLAIN_DATACLASSES) < 4096:
            _PLAIN_DATACLASSES.add(t)
    return out


_PLAIN_DATACLASSES: set[type] = set()


def _has_c_state(klass: type) -> bool:
    """Whether instances of ``klass`` hold state in C fields of its own (an
    Exception's args, a Decimal's digits), which no attribute shows. A class
    written in Python declares ``__slots__`` or has a dict; C types may be
    heap types too (``deque`` from 3.12, ``Decimal`` from 3.13)."""
    if klass is object or klass.__basicsize__ <= object.__basicsize__:
        return False
    if not klass.__flags__ & _HEAPTYPE:
        return True
    has_dict = klass.__dictoffset__ or klass.__flags__ & _MANAGED_DICT
    return "__slots__" not in vars(klass) and not has_dict


_BUILTIN_BASES: Final = (tuple, list, dict, set, frozenset, str, int, float, bytes)
#: bases that carry state of their own, beyond any attribute
_VALUE_BASES: Final = (*_BUILTIN_BASES, File, bytearray, collections.deque, array.array)


def _builtin_value(x: Any, base: type) -> object:
    """The built-in value of an instance of a subclass, read with the built-in's
    own methods: the subclass may override ``__iter__``, ``__str__``, ``keys``..."""
    if base is str:
        return str.__str__(x)
    if base is int:
        return int.__int__(x)
    if base is float:
        return float.__float__(x)
    if base is bytes:
        return bytes.__bytes__(x)
    if base is tuple:
        return tuple(tuple.__iter__(x))
    if base is list:
        return list(list.__iter__(x))
    if base is dict:
        return dict(dict.items(x))
    if base is set:
        return set(set.__iter__(x))
    return frozenset(frozenset.__iter__(x))


_FILE_PATH: Final = File.__dict__["path"]
_FILE_BY: Final = File.__dict__["by"]


def _base_value(x: Any, t: type, ctx: _Ctx, depth: int) -> object:
    """The canonical value a dataclass carries through a stateful base class."""
    if isinstance(x, File):
        return _canon_file(File(_FILE_PATH.__get__(x, File), _FILE_BY.__get__(x, File)), ctx, depth)
    if not isinstance(x, collections.OrderedDict | collections.defaultdict):
        for base in _BUILTIN_BASES:
            if isinstance(x, base):
                return _canon(_builtin_value(x, base), ctx, depth)
    solid = next(b for b in t.__mro__ if _has_c_state(b))
    raise _Unhashable(x, f"a dataclass that is also a {_qualname(solid)}: register a stand-in")


def _canon_other(x: object, ctx: _Ctx, depth: int) -> object:
    t = type(x)
    impl = id_for_memo.dispatch(t)
    if impl is not _ID_DEFAULT:
        try:
            value = impl(x, ctx.output_ref)
        except NotImplementedError:
            pass
        else:
            # a registration for this very class vouches for it, wherever it is
            # defined; one inherited from a base does not tell two local
            # subclasses of one name apart, so then the name must lead back
            name = _qualname(t) if t in id_for_memo.registry else _named_class(x, t)
            return [_M_CUSTOM, name, _canon(value, ctx, depth)]
    if isinstance(x, enum.Enum):
        return _canon_enum(x, ctx, depth)
    if isinstance(x, type):
        return _canon_type(x, ctx, depth)
    if dataclasses.is_dataclass(x):
        return _canon_dataclass(x, ctx, depth)
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(x, np.ndarray):
            return _canon_ndarray_any(x, ctx, depth, np)
        if isinstance(x, np.generic):
            if not (type(x).__module__ or "").startswith("numpy"):
                raise _Unhashable(
                    x,
                    f"numpy scalar subclass {_qualname(t)} (it may hold state beyond its "
                    "value): pass x.item() or register a stand-in",
                )
            return _canon_npscalar(x, np)
    for hook in ctx.hooks:
        value = hook(x, ctx.output_ref)
        if value is not NOT_HANDLED:
            return [_M_HOOK, _qualname(t), _canon(value, ctx, depth)]  # the hook vouches
    if isinstance(x, collections.OrderedDict):
        return _canon_ordereddict(x, ctx, depth)
    if isinstance(x, collections.defaultdict):
        return _canon_defaultdict(x, ctx, depth)
    # subclasses of builtins: the type's name + the builtin value
    for base in _BUILTIN_BASES:
        if isinstance(x, base):
            qn = _named_class(x, t)
            _no_hidden_state(x, t, f"{base.__name__} subclass")
            value = _builtin_value(x, base)
            if base is tuple and hasattr(t, "_fields"):
                fields: Sequence[str] = getattr(t, "_fields", ())
                try:
                    inner: object = _canon_list(value, ctx, depth)
                except _Unhashable as exc:
                    # name the field, not the index: "args[0].port"
                    exc.path[-1:] = [f".{fields[int(exc.path[-1][1:-1])]}"]
                    raise
            else:
                inner = _canon(value, ctx, depth)
            return [_M_SUBCLASS, qn, inner]
    if (
        callable(x)
        and hasattr(x, "__qualname__")
        and hasattr(x, "__module__")
        and _found_as(x, x.__module__, x.__qualname__)
    ):
        # ufuncs, lru_cache wrappers...: found under their name (a
        # list[int] alias is not: it would pass for the class list)
        return _canon_builtin(x, ctx, depth)
    wrapper = _WRAPPERS.get(t)
    if wrapper is not None:
        return wrapper(x, ctx, depth)
    if callable(x):
        raise _Unhashable(
            x, "a callable object: its state is not visible to aiomemo (make it a dataclass)"
        )
    raise _Unhashable(x, "no rule for this type")


def _canon_wrapper(x: Any, ctx: _Ctx, depth: int) -> object:
    """``staticmethod``/``classmethod`` objects and ``lru_cache`` wrappers not found
    under their name: the function they wrap (and the cache's parameters)."""
    t = type(x)
    inner = x.__func__ if t is staticmethod or t is classmethod else x.__wrapped__
    try:
        cinner = _canon(inner, ctx, depth)
    except _Unhashable as exc:
        exc.path.append(".__wrapped__")
        raise
    out = [_M_WRAPPER, t.__name__, cinner]
    params = getattr(x, "cache_parameters", None)
    if params is not None:
        out.append(_canon(params(), ctx, depth))
    return out


_WRAPPERS: dict[type, Callable[[Any, _Ctx, int], object]] = {
    staticmethod: _canon_wrapper,
    classmethod: _canon_wrapper,
    functools._lru_cache_wrapper: _canon_wrapper,
}


def _np_dtype(dt: Any) -> object:
    """Everything of a numpy dtype: fields, offsets, titles, itemsize, byte order, subarrays."""
    if dt.fields is None:
        if dt.subdtype is not None:
            base, shape = dt.subdtype
            return ["sub", _np_dtype(base), list(shape)]
        return dt.str
    fields: list[object] = []
    for name in dt.names:
        f = dt.fields[name]
        title = f[2] if len(f) > 2 else None
        if title is not None and type(title) is not str and type(title) is not bytes:
            raise _Unhashable(dt, f"field {name!r} has a title of type {type(title).__name__}")
        # repr of a str or bytes is one per value (and keeps the keys as they were)
        fields.append([name, f[1], _np_dtype(f[0]), title if title is None else repr(title)])
    return ["struct", dt.itemsize, bool(dt.isalignedstruct), fields]


def _descr_is_complete(dt: Any) -> bool:
    """Whether ``str(dt.descr)`` pins the dtype (no titles, alignment flag or overlaps)."""
    if dt.subdtype is not None:
        return _descr_is_complete(dt.subdtype[0])
    if dt.fields is None:
        return True
    if dt.isalignedstruct:
        return False
    end = 0
    for name in dt.names:
        f = dt.fields[name]
        if len(f) > 2 or f[1] < end or not _descr_is_complete(f[0]):
            return False
        end = f[1] + f[0].itemsize
    return True


def _canon_npscalar(x: Any, np: Any) -> object:
    dt = x.dtype
    if dt.hasobject:
        raise _Unhashable(x, "numpy object scalar")
    if dt.fields is None and dt.subdtype is None:
        return [_M_NPSCALAR, dt.str, x.tobytes()]
    data = x.tobytes()
    if dt.fields is not None and _has_padding(dt):
        clean = np.zeros((), dtype=dt)  # padding is not data: zero it
        clean[()] = x
        data = clean.tobytes()
    return [_M_NPSCALAR, dt.str, data, _np_dtype(dt), type(x).__name__]


def _canon_ndarray_any(x: Any, ctx: _Ctx, depth: int, np: Any) -> object:
    t = type(x)
    if t is np.ndarray:
        return _canon_ndarray(x, ctx, depth)
    if t is np.matrix or t is np.recarray:
        name = "numpy.matrix" if t is np.matrix else "numpy.recarray"
        return [_M_SUBCLASS, name, _canon_ndarray(x.view(np.ndarray), ctx, depth)]
    ma = np.ma
    if t is ma.MaskedArray:
        data = x.data
        if type(data) is not np.ndarray:
            raise _Unhashable(x, f"a masked array over {_qualname(type(data))}")
        try:
            fill = _canon(x.fill_value, ctx, depth)
        except _Unhashable as exc:
            exc.path.append(".fill_value")
            raise
        return [
            _M_SUBCLASS,
            "numpy.ma.MaskedArray",
            _canon_ndarray(data, ctx, depth),  # masked slots too: .data shows them
            _canon_ndarray(ma.getmaskarray(x), ctx, depth),
            fill,
            bool(x.hardmask),
            *(["nomask"] if x.mask is ma.nomask else []),  # .mask is np.False_, not an array
        ]
    if t is ma.core.MaskedConstant:
        return [_M_SUBCLASS, "numpy.ma.masked"]
    raise _Unhashable(
        x,
        f"numpy array subclass {_qualname(t)} (it may hold state beyond its data): "
        "pass numpy.asarray(x) or register a stand-in",
    )


def _covered(dt: Any, base: int, cover: bytearray) -> None:
    if dt.subdtype is not None:
        sub, shape = dt.subdtype
        n = 1
        for d in shape:
            n *= d
        for i in range(n):
            _covered(sub, base + i * sub.itemsize, cover)
    elif dt.fields is None:
        cover[base : base + dt.itemsize] = b"\x01" * dt.itemsize
    else:
        for name in dt.names:
            fdt, off = dt.fields[name][:2]
            _covered(fdt, base + off, cover)


def _has_padding(dt: Any) -> bool:
    """Whether some bytes of a structured dtype belong to no field."""
    try:
        return _PADDED[dt]
    except (KeyError, TypeError):
        pass
    cover = bytearray(dt.itemsize)
    _covered(dt, 0, cover)
    padded = 0 in cover
    if len(_PADDED) < 1024:
        _PADDED[dt] = padded
    return padded


_PADDED: dict[Any, bool] = {}


def _canon_ndarray(x: Any, ctx: _Ctx, depth: int) -> object:
    np = sys.modules["numpy"]
    dt = x.dtype
    if dt.hasobject:
        raise _Unhashable(x, "numpy array of dtype object")
    if dt.fields is not None and _has_padding(dt):
        # padding bytes are not data (numpy's own copy leaves them undefined):
        # key the fields only, in a copy with zeroed padding
        clean = np.zeros(x.shape, dtype=dt)
        clean[...] = x
        x = clean
    elif not x.flags.c_contiguous:
        x = x.copy(order="C")  # a copy, but only for strided arrays
    meta: list[object] = [dt.str, list(x.shape)]
    if dt.fields is not None:
        if _descr_is_complete(dt):
            meta.append(str(dt.descr))
        else:
            meta.append(None)
            meta.append(_np_dtype(dt))
    if x.nbytes < INLINE_LIMIT:
        return [_M_NDARRAY, *meta, x.tobytes()]
    # a byte view, no copy: datetime64 and some other dtypes cannot export a
    # buffer of their own
    buf = memoryview(x.reshape(-1).view("u1"))
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
    except UnicodeEncodeError:
        packer.reset()
        # a str with lone surrogates (os.fsdecode of a non-UTF-8 file name):
        # rare, so it costs a second walk only when met
        return packer.pack(_fix_surrogates(obj))  # type: ignore[no-any-return]
    except BaseException:
        packer.reset()
        raise


def _fix_surrogates(o: object) -> object:
    """The canonical tree with every unencodable str as ext ``SURROGATE_STR``."""
    t = type(o)
    if t is str:
        s: str = o  # type: ignore[assignment]
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return msgpack.ExtType(_X_SURROGATE_STR, s.encode("utf-8", "surrogatepass"))
        return s
    if t is list:
        return [_fix_surrogates(e) for e in o]  # type: ignore[attr-defined]
    if t is dict:
        return {_fix_surrogates(k): _fix_surrogates(v) for k, v in o.items()}  # type: ignore[attr-defined]
    return o


_FID_CACHE: dict[object, list[object]] = {}


def _func_identity(func: object, version: object, ctx: _Ctx) -> list[object]:
    """``[module, qualname, version]`` for functions and classes (as Parsl keys
    them); ``[version, canonical form]`` for any other callable, whose state
    is part of what it does (a partial's arguments, a bound method's object)."""
    if version is None and type(func) is types.FunctionType:
        try:
            return _FID_CACHE[func]  # functions compare by identity
        except KeyError:
            pass
    tf = type(func)
    if tf is types.FunctionType:
        fid: list[object] = [func.__module__ or "?", func.__qualname__, version]  # type: ignore[attr-defined]
        if version is None and len(_FID_CACHE) < 4096:
            _FID_CACHE[func] = fid  # never mutated: packed as it is
        return fid
    if isinstance(func, type):
        _named_class(func, func)
        return [func.__module__ or "?", func.__qualname__, version]
    if tf is types.MethodType or tf is functools.partial:
        return [version, _canon(func, ctx, 0)]
    owner = getattr(func, "__self__", None)
    if (
        (owner is None or type(owner) is types.ModuleType)
        and hasattr(func, "__qualname__")
        and hasattr(func, "__module__")
        and (tf is types.BuiltinFunctionType or _found_as(func, func.__module__, func.__qualname__))
    ):
        # C functions, ufuncs, lru_cache wrappers...: their name says which
        return [func.__module__ or "?", func.__qualname__, version]
    return [version, _canon(func, ctx, 0)]


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


def _ignored(task: Mapping[str, Any]) -> Any:
    ignore = task.get("ignore_for_cache") or ()
    if ignore and (type(ignore) is not list or not all(type(n) is str for n in ignore)):
        check_ignore(ignore, "task['ignore_for_cache']")
    return ignore


def _task_tree(task: Mapping[str, Any], hooks: Sequence[KeyHook] = ()) -> tuple[object, _Ctx]:
    """Canonical tree of a task, plus the out-of-band items to feed after it.

    Out-of-band items come in a fixed order: outputs, version, func, args,
    kwargs, each in the canonical order of its tree.
    """
    try:
        func = task["func"]
    except KeyError:
        raise TypeError("task has no 'func'") from None
    args = task.get("args", ())
    kwargs = task.get("kwargs") or {}
    if type(kwargs) is not dict and not isinstance(kwargs, Mapping):
        raise TypeError(f"task['kwargs'] must be a mapping, not {type(kwargs).__name__}")
    ignore = task.get("ignore_for_cache") or ()
    if ignore and type(ignore) is not list:  # inline: the hot path has []
        check_ignore(ignore, "task['ignore_for_cache']")
    ctx = _Ctx()
    if hooks:
        ctx.hooks = tuple(hooks)
    outputs: object = None
    if ignore or "outputs" in kwargs:
        if ignore and not all(type(n) is str for n in ignore):
            check_ignore(ignore, "task['ignore_for_cache']")
        kwargs = {k: v for k, v in kwargs.items() if k not in ignore}
        if "outputs" in kwargs:
            ctx.output_ref = True
            try:
                outputs = _canon(kwargs.pop("outputs"), ctx, 0)
            except _Unhashable as exc:
                raise _error(exc, "kwargs['outputs']") from None
            if outputs is None:  # given as None: not the same as not given
                outputs = _M_OUTPUTS_NONE
            ctx.output_ref = False
    try:
        version = task.get("version")
        cversion = None if version is None else _canon(version, ctx, 0)
    except _Unhashable as exc:
        raise _error(exc, "version") from None
    try:
        fid = _func_identity(func, cversion, ctx)
    except _Unhashable as exc:
        raise _error(exc, "func") from None
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
    tree: list[object] = [FORMAT_VERSION, fid, cargs, ckw, outputs]
    if task.get("track_code"):
        # the code fingerprint (aiomemo._fingerprint), its table read inline
        # (hot path). A plain function without version: the digest stands in
        # for [module, qualname] (it covers them), else it is a sixth item;
        # either way keys without it stay as they were
        try:
            e = _fingerprint._FAST.get(func)
        except TypeError:  # an unhashable callable object
            e = None
        if e is not None and e[0] is getattr(func, "__code__", None):
            digest = e[1]
        else:
            digest = _fingerprint.code_digest(func)
        if version is None and type(func) is types.FunctionType:
            tree[1] = digest
        else:
            tree.append(digest)
    return tree, ctx


def _file_parts_sync(ctx: _Ctx) -> Callable[[object], object]:
    cache: dict[int, bytes] = {}

    def part(item: object) -> object:
        if type(item) is not File:
            return item
        got = cache.get(id(item))
        if got is None:
            got = cache[id(item)] = _file_part_sync(item)
        return got

    return part


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


def hash_task(task: Mapping[str, Any], hooks: Sequence[KeyHook] = ()) -> bytes:
    """The task's key as 32 raw bytes (sync; reads Files with plain reads).

    ``hooks``: key hooks (see :data:`KeyHook`) for types nothing else covers.
    """
    tree, ctx = _task_tree(task, hooks)
    if not ctx.oob:
        return blake3.blake3(_packb(tree)).digest()
    part = _file_parts_sync(ctx)
    if ctx.pending:
        _resolve(ctx, part)
    h = blake3.blake3(_packb(tree))
    for leaf in _leaves(ctx.oob):
        h.update(part(leaf))  # type: ignore[arg-type]
    return h.digest()


def hash_task_now(task: Mapping[str, Any], hooks: Sequence[KeyHook] = ()) -> bytes | PendingKey:
    """The task's key as 32 raw bytes when making it needs no I/O, else a :class:`PendingKey`.

    The event loop's common path, with no coroutine in between: a task
    whose inputs hold no Files and no out-of-band buffers, and whose code
    fingerprint (``track_code``) is ready. Anything else comes back as a
    PendingKey, whose ``finish()`` makes the key without stalling the loop
    (the canonical tree is not built twice).
    """
    if task.get("track_code"):
        func = task.get("func")
        try:
            ready = func in _fingerprint._FAST
        except TypeError:  # an unhashable callable object
            ready = False
        if not ready and func is not None:
            return PendingKey(task, hooks, None)  # reads source: off the loop
    tree, ctx = _task_tree(task, hooks)
    if not ctx.oob:
        return blake3.blake3(_packb(tree)).digest()
    return PendingKey(task, hooks, (tree, ctx))


class PendingKey:
    """A key :func:`hash_task_now` could not make without I/O: ``await finish()``."""

    __slots__ = ("_built", "_hooks", "_task")

    def __init__(
        self,
        task: Mapping[str, Any],
        hooks: Sequence[KeyHook],
        built: tuple[object, _Ctx] | None,
    ) -> None:
        self._task = task
        self._hooks = hooks
        self._built = built

    async def finish(self) -> bytes:
        """The key; Files read with aiofiles, large buffers hashed in a worker thread."""
        if self._built is None:
            await _fingerprint.prepare(self._task.get("func"))
            self._built = _task_tree(self._task, self._hooks)
        tree, ctx = self._built  # with no out-of-band items, _finish hashes the tree alone
        files: dict[int, bytes] = {}
        for item in _all_items(ctx.oob):
            if type(item) is File and id(item) not in files:
                files[id(item)] = await _file_part_async(item)

        def part(item: object) -> object:
            return files[id(item)] if type(item) is File else item

        if ctx.oob_bytes >= THREAD_THRESHOLD:
            return await asyncio.to_thread(_finish, tree, ctx, part)
        return _finish(tree, ctx, part)


async def hash_task_async(task: Mapping[str, Any], hooks: Sequence[KeyHook] = ()) -> bytes:
    """The task's key as 32 raw bytes, without stalling the event loop.

    The canonical tree is built on the loop; Files are read with aiofiles;
    when the out-of-band buffers add up to ``THREAD_THRESHOLD`` or more they
    are hashed in a worker thread (blake3 releases the GIL).
    """
    raw = hash_task_now(task, hooks)
    return await raw.finish() if isinstance(raw, PendingKey) else raw


def _all_items(items: list[object]) -> Any:
    """Every out-of-band leaf, resolved or not (to read the Files first)."""
    for item in items:
        if type(item) is _Pending:
            for entry in item.entries:
                yield from _all_items(entry[2])
        else:
            yield item


def _finish(tree: object, ctx: _Ctx, part: Callable[[object], object]) -> bytes:
    if ctx.pending:
        _resolve(ctx, part)
    h = blake3.blake3(_packb(tree))
    for leaf in _leaves(ctx.oob):
        h.update(part(leaf))  # type: ignore[arg-type]
    return h.digest()


#: large buffers above this are sampled (head and tail) in per-argument digests
_DIGEST_SAMPLE: Final = 1 << 20
ARG_DIGEST_SIZE: Final = 8


_DIGEST_PAIR = struct.Struct("<II")
_CRC_SEED: Final = 0x9E3779B9


def _digest_part(item: object) -> object:
    if type(item) is File:
        return _packb([item.by, item.path])  # not re-read: path and mode only
    mv = memoryview(cast(Any, item)).cast("B")
    if mv.nbytes <= 2 * _DIGEST_SAMPLE:
        return mv
    return b"".join((mv[:_DIGEST_SAMPLE], mv[-_DIGEST_SAMPLE:]))


def _arg_digest(value: object, output_ref: bool = False, hooks: tuple[KeyHook, ...] = ()) -> bytes:
    t = type(value)
    if t is str or t is bool or value is None or (t is int and _INT_MIN <= value <= _INT_MAX):  # type: ignore[operator]
        head = _packb(value)  # already canonical: no walk
        return _DIGEST_PAIR.pack(zlib.crc32(head), zlib.crc32(head, _CRC_SEED))
    ctx = _Ctx()
    ctx.output_ref = output_ref
    ctx.hooks = hooks
    tree = _canon(value, ctx, 0)
    if ctx.oob is _Ctx.oob:
        # advisory only (explain): two CRC-32s are ~10x cheaper than a
        # blake3 object for the small arguments most tasks have
        head = _packb(tree)
        return _DIGEST_PAIR.pack(zlib.crc32(head), zlib.crc32(head, _CRC_SEED))
    if ctx.pending:
        _resolve(ctx, _digest_part)
    h = blake3.blake3(_packb(tree))
    for leaf in _leaves(ctx.oob):
        h.update(_digest_part(leaf))  # type: ignore[arg-type]
    return h.digest()[:ARG_DIGEST_SIZE]


def arg_digests(task: Mapping[str, Any], hooks: Sequence[KeyHook] = ()) -> bytes:
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
    ignore = _ignored(task)
    hk = tuple(hooks)
    pos: list[bytes] = []
    for a in args:
        try:
            pos.append(_arg_digest(a, False, hk))
        except (_Unhashable, TypeError, ValueError):
            pos.append(b"")
    kw: dict[str, bytes] = {}
    if kwargs:
        for name in sorted(kwargs):
            if name in ignore:
                continue
            try:
                kw[name] = _arg_digest(kwargs[name], name == "outputs", hk)
            except (_Unhashable, TypeError, ValueError):
                kw[name] = b""
    return _packb([pos, kw])


def make_hash(task: Mapping[str, Any], hooks: Sequence[KeyHook] = ()) -> str:
    """The key of a task: 64 hex characters of blake3-256.

    ``task`` is a mapping with ``func``, ``args``, ``kwargs`` and optionally
    ``ignore_for_cache`` (a list of kwarg names left out of the key, never a
    bare str; absent names are ignored) and ``version`` (separates functions that share a qualname).
    Parsl's TaskRecord dicts work as they are.

    Raises:
        UnhashableInputError: an input has no key; the message says where
            (``kwargs['cfg'][3]``), its type, and how to register one.
        TypeError: a malformed task (``ignore_for_cache="log"``...).
    """
    return hash_task(task, hooks).hex()


async def make_hash_async(task: Mapping[str, Any], hooks: Sequence[KeyHook] = ()) -> str:
    """:func:`make_hash` for coroutines: never stalls the event loop."""
    return (await hash_task_async(task, hooks)).hex()
