"""Code fingerprints: a digest of what a task function runs, followed transitively.

``code_fingerprint(func)`` walks from ``func`` through everything its code
reaches in the user's code and digests each piece:

* **functions**: their own source, normalised from the tokens (comments,
  blank lines, the amount of indentation, line continuations and docstrings
  do not count; any other change does), plus their default values and
  closure variables (keyed like task inputs, see :mod:`aiomemo._hashing`)
  and what each global name they use is bound to. A function without source
  (a REPL, ``exec``, some notebooks) is digested from its code object
  (bytecode, constants, names): that digest is specific to the Python
  version.
* **classes**: their own source without the methods, the values of the
  class attributes the body assigns, their bases, and every method,
  property, static/class method and nested class as a piece of its own.
* **module-level values** a function reads by a global name or as an
  attribute of a module (``CONST``, ``cfg.SCALE``): keyed like inputs.
  Objects aiomemo cannot key (a logger, a lock) count by their type.
* **installed distributions** (site-packages) count by their version, the
  standard library and aiomemo itself not at all.

References are found in the code objects' ``co_names`` (recursively through
nested code: comprehensions, lambdas, inner functions), the names every
``LOAD_GLOBAL``/``LOAD_ATTR``/``IMPORT_NAME`` uses; that is the same across
Python versions, where the opcodes are not. A name is followed when it is a
global of the function, or an attribute of a user module the function
refers to (``helpers.scale``, ``pkg.sub.f``, also through local imports).
``functools.wraps`` chains (``__wrapped__``), ``functools.partial`` and
memoized wrappers are seen through. Pieces are named by module + qualname,
never by path, so moving a checkout keeps every digest.

Not followed: names built at run time (``getattr(mod, name)``, ``eval``),
methods called on objects that arrive as arguments (unless their class is
referred to by name). Module-level values the module's own code assigns or
changes in place (``global n``, ``cache[k] = v``, ``seen.append(x)``) are
state and count by name only; anything else is read when the fingerprint is
made, once per function per process, on first use.
"""

from __future__ import annotations

import ast
import asyncio
import bisect
import contextlib
import dis
import functools
import importlib.metadata
import importlib.util
import io
import linecache
import os
import site
import sys
import sysconfig
import threading
import token
import tokenize
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import blake3
import msgpack

from aiomemo._exceptions import UnhashableInputError

__all__ = [
    "DEP_DIGEST_SIZE",
    "KEY_DIGEST_SIZE",
    "PIECE_ID_SIZE",
    "CodeFingerprint",
    "cached_fingerprint",
    "code_digest",
    "code_fingerprint",
    "is_ready",
    "piece_id",
    "prepare",
    "split_record",
    "with_code_digests",
]

#: bytes of each per-piece digest kept in a record (for explain), and of the
#: id naming the piece there (the first bytes of blake3 of its name)
DEP_DIGEST_SIZE: Final = 4
PIECE_ID_SIZE: Final = 4
#: bytes of the digest a key holds (128 bits: it keeps the key's head within
#: one blake3 block for small tasks, so tracking costs next to nothing)
KEY_DIGEST_SIZE: Final = 16
#: bump when what goes into a fingerprint changes
_FP_VERSION: Final = 1
#: how deep and how wide containers (dispatch tables...) are searched for functions
_SCAN_DEPTH: Final = 3
_SCAN_ITEMS: Final = 2000


@dataclass(frozen=True, slots=True)
class CodeFingerprint:
    """What a function runs, digested.

    Attributes:
        name: ``module.qualname`` of the function.
        digest: 32 bytes over every piece below (what a key includes).
        deps: piece name (``"mypkg.helpers.scale"``, ``"numpy"``) -> its own
            32-byte digest; the function itself is one of them.
        from_bytecode: pieces digested from their code object (no source
            found): those digests are specific to the Python version.
        record: what a checkpoint record keeps of it: per piece, a 4-byte
            id of its name and 4 bytes of its digest, sorted (8 bytes a
            piece, so records stay small; the key itself uses ``digest``).
    """

    name: str
    digest: bytes
    deps: Mapping[str, bytes]
    from_bytecode: tuple[str, ...] = ()
    record: bytes = b""

    def pieces_by_id(self) -> dict[bytes, tuple[str, bytes]]:
        """Piece id (as in ``record``) -> (piece name, short digest)."""
        return {piece_id(k): (k, v[:DEP_DIGEST_SIZE]) for k, v in self.deps.items()}


def piece_id(name: str) -> bytes:
    """The id of a piece in a record: the first bytes of blake3 of its name."""
    return blake3.blake3(name.encode()).digest()[:PIECE_ID_SIZE]


def split_record(raw: bytes) -> dict[bytes, bytes]:
    """``CodeFingerprint.record`` back into piece id -> short digest."""
    step = PIECE_ID_SIZE + DEP_DIGEST_SIZE
    return {
        raw[i : i + PIECE_ID_SIZE]: raw[i + PIECE_ID_SIZE : i + step]
        for i in range(0, len(raw) - step + 1, step)
    }


# --------------------------------------------------------------------------
# the cache: once per function per process
# --------------------------------------------------------------------------

# id(func) -> (fingerprint, weak ref to func, func.__code__ when computed);
# the weak ref's callback drops the entry before the id can be reused
_CACHE: dict[int, tuple[CodeFingerprint, Callable[[], object] | None, object]] = {}
_STRONG: dict[object, CodeFingerprint] = {}  # callables without weak refs (partials...)
# the hot path's table: func -> (its __code__ then, digest); strong references,
# so bounded (functions made per call beyond it use the weak table)
_FAST: dict[object, tuple[object, bytes]] = {}
_FAST_MAX: Final = 4096
_LOCK = threading.RLock()


def cached_fingerprint(func: object) -> CodeFingerprint | None:
    """The fingerprint of ``func`` if this process made it already (never computes)."""
    e = _CACHE.get(id(func))
    if e is not None:
        ref = e[1]
        if ref is not None and ref() is func and e[2] is getattr(func, "__code__", None):
            return e[0]
        return None
    try:
        return _STRONG.get(func)
    except TypeError:
        return None


def code_digest(func: object) -> bytes:
    """What a key holds of :func:`code_fingerprint`: its digest's first
    :data:`KEY_DIGEST_SIZE` bytes (the hot path: one dict lookup)."""
    try:
        e = _FAST.get(func)
    except TypeError:  # an unhashable callable object
        e = None
    if e is not None and e[0] is getattr(func, "__code__", None):
        return e[1]
    return code_fingerprint(func).digest[:KEY_DIGEST_SIZE]


def is_ready(func: object) -> bool:
    """True when ``code_digest(func)`` is a lookup (the fingerprint is made)."""
    try:
        e = _FAST.get(func)
    except TypeError:
        e = None
    if e is not None and e[0] is getattr(func, "__code__", None):
        return True
    return cached_fingerprint(func) is not None


# (id(loop), id(func)) -> the worker computing it: concurrent first calls share one
_INFLIGHT: dict[tuple[int, int], asyncio.Future[CodeFingerprint]] = {}


async def prepare(func: object) -> None:
    """Make ``func``'s fingerprint in a worker thread (it reads source files).

    Concurrent first calls of one function on a loop wait for the same
    computation. Raises what :func:`code_fingerprint` raises.
    """
    if is_ready(func):
        return
    loop = asyncio.get_running_loop()
    k = (id(loop), id(func))
    fut = _INFLIGHT.get(k)
    if fut is None:
        fut = loop.run_in_executor(None, code_fingerprint, func)
        _INFLIGHT[k] = fut

        def done(f: asyncio.Future[CodeFingerprint]) -> None:
            _INFLIGHT.pop(k, None)
            if not f.cancelled():
                f.exception()  # every waiter got it; none left: not "never retrieved"

        fut.add_done_callback(done)
    await asyncio.shield(fut)


def code_fingerprint(func: object) -> CodeFingerprint:
    """The code fingerprint of ``func``, made once per function per process.

    Raises:
        UnhashableInputError: a default value or closure variable cannot be
            keyed; the message says where (``closure of mypkg.f: 'cfg'``).
    """
    fp = cached_fingerprint(func)
    if fp is not None:
        return fp
    with _LOCK:
        fp = cached_fingerprint(func)
        if fp is not None:
            return fp
        fp = _Walker().run(func)
        _remember(func, fp)
        return fp


def _remember(func: object, fp: CodeFingerprint) -> None:
    key = id(func)
    if len(_FAST) < _FAST_MAX:
        with contextlib.suppress(TypeError):
            _FAST[func] = (getattr(func, "__code__", None), fp.digest[:KEY_DIGEST_SIZE])

    def drop(ref: object, key: int = key) -> None:
        e = _CACHE.get(key)
        if e is not None and e[1] is ref:
            del _CACHE[key]

    try:
        ref = weakref.ref(func, drop)
    except TypeError:
        try:
            if len(_STRONG) < 4096:
                _STRONG[func] = fp
        except TypeError:
            pass
        return
    _CACHE[key] = (fp, ref, getattr(func, "__code__", None))


def _clear_cache() -> None:
    """Forget every fingerprint (tests; a process that reloads code)."""
    with _LOCK:
        _CACHE.clear()
        _STRONG.clear()
        _FAST.clear()
        _STATE.clear()
        _SOURCES.clear()


# --------------------------------------------------------------------------
# where code lives: user code, the standard library, installed distributions
# --------------------------------------------------------------------------

_USER = "user"
_STD = "std"
_DIST = "dist"


@functools.cache
def _site_dirs() -> tuple[str, ...]:
    dirs: set[str] = set()
    for k in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(k)
        if p:
            dirs.add(p)
    with contextlib.suppress(AttributeError):  # some virtualenv builds lack it
        dirs.update(site.getsitepackages())
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user:
        dirs.add(user)
    for p in sys.path:
        if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages"):
            dirs.add(p)
    return tuple(sorted({os.path.realpath(d) + os.sep for d in dirs}))


@functools.cache
def _std_dirs() -> tuple[str, ...]:
    dirs = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib")}
    return tuple(sorted({os.path.realpath(d) + os.sep for d in dirs if d}))


@functools.cache
def _classify_path(path: str) -> str:
    real = os.path.realpath(path)
    if any(real.startswith(d) for d in _site_dirs()):
        return _DIST
    if any(real.startswith(d) for d in _std_dirs()):
        return _STD
    return _USER


def _module_kind(modname: str | None) -> str:
    """Whether module ``modname`` is user code, the standard library or installed."""
    if not modname:
        return _USER
    top = modname.partition(".")[0]
    if top == "aiomemo":
        return _STD  # memoized wrappers are seen through; aiomemo itself never counts
    mod = sys.modules.get(modname)
    path = getattr(mod, "__file__", None) if mod is not None else None
    if not isinstance(path, str) or not path:
        paths = list(getattr(mod, "__path__", None) or ())  # a namespace package
        path = paths[0] if paths and isinstance(paths[0], str) else None
    if not path:
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            return _STD
        return _USER  # made at run time, a REPL's __main__: the user's
    return _classify_path(path)


def _code_kind(code: types.CodeType, modname: str | None) -> str:
    fn = code.co_filename
    if fn.startswith("<") or not fn or (modname or "").partition(".")[0] == "aiomemo":
        return _module_kind(modname)
    return _classify_path(fn)


@functools.cache
def _dist_map() -> Mapping[str, list[str]]:
    try:
        return importlib.metadata.packages_distributions()
    except Exception:  # a broken installation must not break keys
        return {}


@functools.cache
def _dist_of(modname: str) -> tuple[str, str]:
    """(distribution name, version) of an installed module."""
    top = modname.partition(".")[0]
    names = sorted(set(_dist_map().get(top, [])))
    if names:
        versions = []
        for n in names:
            try:
                versions.append(f"{n}=={importlib.metadata.version(n)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(n)
        return names[0], ",".join(versions)
    mod = sys.modules.get(top)
    v = getattr(mod, "__version__", None)
    return top, f"{top}=={v}" if isinstance(v, str) else top


# --------------------------------------------------------------------------
# source: tokens per file, normalised
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _Source:
    lines: list[str]
    tokens: list[tokenize.TokenInfo]
    rows: list[int]  # start row of each token (for bisect)
    defs: dict[int, list[tuple[str, int, int]]]  # first line -> (name, first, end)
    classes: dict[str, list[tuple[int, int, list[tuple[str, int, int]]]]]  # qualname ->
    stmts: list[tuple[int, int]]  # every statement's (first, end) line
    docs: list[tuple[tuple[int, int], tuple[int, int]]]  # docstring (start, end) positions
    doc_starts: set[tuple[int, int]] = field(default_factory=set)


_SOURCES: dict[str, _Source | None] = {}


def _first_line(node: ast.stmt) -> int:
    decos: list[ast.expr] = getattr(node, "decorator_list", None) or []
    return min([node.lineno, *(d.lineno for d in decos)])


def _load_source(filename: str, module_globals: Mapping[str, Any] | None) -> _Source | None:
    if filename in _SOURCES:
        return _SOURCES[filename]
    src: _Source | None = None
    try:
        lines = linecache.getlines(filename, dict(module_globals) if module_globals else None)
        if lines:
            src = _parse_source(lines)
    except (SyntaxError, ValueError, tokenize.TokenError, OSError, RecursionError):
        src = None
    _SOURCES[filename] = src
    return src


def _parse_source(lines: list[str]) -> _Source:
    text = "".join(lines)
    tree = ast.parse(text)
    toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    defs: dict[int, list[tuple[str, int, int]]] = {}
    classes: dict[str, list[tuple[int, int, list[tuple[str, int, int]]]]] = {}
    stmts: list[tuple[int, int]] = []
    docs: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def doc_of(node: ast.AST) -> None:
        body = getattr(node, "body", None)
        if body and isinstance(body[0], ast.Expr):
            c = body[0].value
            if isinstance(c, ast.Constant) and isinstance(c.value, str):
                end = (c.end_lineno or c.lineno, c.end_col_offset or 0)
                docs.append(((c.lineno, c.col_offset), end))

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                stmts.append((_first_line(child), child.end_lineno or child.lineno))
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                first = _first_line(child)
                end = child.end_lineno or child.lineno
                defs.setdefault(first, []).append((child.name, first, end))
                doc_of(child)
                q = prefix + child.name
                if isinstance(child, ast.ClassDef):
                    inner = [
                        (c.name, _first_line(c), c.end_lineno or c.lineno)
                        for c in child.body
                        if isinstance(c, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                    ]
                    classes.setdefault(q, []).append((first, end, inner))
                    walk(child, q + ".")
                else:
                    walk(child, q + ".<locals>.")
            else:
                walk(child, prefix)

    doc_of(tree)
    walk(tree, "")
    src = _Source(lines, toks, [t.start[0] for t in toks], defs, classes, stmts, docs)
    src.doc_starts = {d[0] for d in docs}
    return src


_DROP: Final = frozenset(
    {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER, token.TYPE_COMMENT}
)
_EDGE: Final = frozenset({tokenize.INDENT, tokenize.DEDENT})
_FSTART: Final = frozenset(
    getattr(token, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(token, n)
)
_FEND: Final = frozenset(
    getattr(token, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(token, n)
)


def _slice(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    parts = [lines[r0 - 1][c0:], *lines[r0 : r1 - 1], lines[r1 - 1][:c1]]
    return "".join(parts)


def _normal_tokens(
    src: _Source, first: int, end: int, skip: list[tuple[str, int, int]] | None = None
) -> list[str]:
    """The normalised tokens of lines ``first..end``, the ``skip`` spans as placeholders."""

    i = bisect.bisect_left(src.rows, first)
    j = bisect.bisect_right(src.rows, end)
    out: list[str] = []
    skip_at = {s[1]: s for s in skip or ()}
    toks = src.tokens
    in_doc_end: tuple[int, int] | None = None
    drop_newline = False
    k = i
    while k < j:
        t = toks[k]
        k += 1
        row = t.start[0]
        span = skip_at.get(row)
        if span is not None and t.type not in _EDGE:
            out.append(f"<def {span[0]}>")
            while k < j and toks[k].start[0] <= span[2]:
                k += 1
            skip_at.pop(row)
            continue
        tt = t.type
        if tt in _DROP:
            continue
        if in_doc_end is not None:
            if t.start < in_doc_end or (tt == tokenize.STRING and t.start <= in_doc_end):
                continue
            in_doc_end = None
        if tt == tokenize.STRING and t.start in src.doc_starts:
            for s, e in src.docs:
                if s == t.start:
                    in_doc_end = e
            drop_newline = True
            continue
        if drop_newline:
            drop_newline = False
            if tt == tokenize.NEWLINE or (tt == tokenize.OP and t.string == ";"):
                continue
        if tt in _FSTART:
            # Python 3.12+ splits f-strings into pieces: join them back into
            # the one STRING token older versions give
            depth = 1
            start = t.start
            while k < j and depth:
                t2 = toks[k]
                k += 1
                if t2.type in _FSTART:
                    depth += 1
                elif t2.type in _FEND:
                    depth -= 1
                    last = t2
            out.append(_slice(src.lines, start, last.end))
            continue
        if tt == tokenize.NEWLINE:
            out.append("<NL>")
        elif tt == tokenize.INDENT:
            out.append("<IN>")
        elif tt == tokenize.DEDENT:
            out.append("<DE>")
        else:
            out.append(t.string)
    if skip:
        # the indentation around a method or nested class belongs to it
        kept: list[str] = []
        for tok in out:
            if tok.startswith("<def ") and kept and kept[-1] in ("<IN>", "<DE>"):
                while kept and kept[-1] in ("<IN>", "<DE>"):
                    kept.pop()
            if tok in ("<IN>", "<DE>") and kept and kept[-1].startswith("<def "):
                continue
            kept.append(tok)
        out = kept
    while out and out[0] in ("<IN>", "<DE>"):
        out.pop(0)
    while out and out[-1] in ("<IN>", "<DE>"):
        out.pop()
    return out


def _function_tokens(func: types.FunctionType) -> list[str] | None:
    code = func.__code__
    src = _load_source(code.co_filename, func.__globals__)
    if src is None:
        return None
    first = code.co_firstlineno
    if code.co_name == "<lambda>":
        best: tuple[int, int] | None = None
        for s, e in src.stmts:
            if s <= first <= e and (best is None or e - s < best[1] - best[0]):
                best = (s, e)
        if best is None:
            return None
        return ["<lambda>", *_normal_tokens(src, best[0], best[1])]
    for name, s, e in src.defs.get(first, ()):
        if name == code.co_name:
            return _normal_tokens(src, s, e)
    return None  # the file changed since it was loaded, or code made at run time


def _class_source(cls: type) -> tuple[list[str], set[str]] | None:
    """Normalised tokens of the class body (methods and nested classes as placeholders)."""
    mod = sys.modules.get(cls.__module__)
    path = getattr(mod, "__file__", None)
    if not isinstance(path, str):
        return None
    src = _load_source(path, vars(mod) if mod is not None else None)
    if src is None:
        return None
    cands = src.classes.get(cls.__qualname__, [])
    if not cands:
        return None
    chosen = cands[0]
    if len(cands) > 1:
        line = getattr(cls, "__firstlineno__", None)
        lines = [line] if isinstance(line, int) else _method_lines(cls)
        inside = [c for c in cands if any(c[0] <= ln <= c[1] for ln in lines)]
        if len(inside) != 1:
            return None
        chosen = inside[0]
    first, end, inner = chosen
    toks = _normal_tokens(src, first, end, inner)
    return toks, {t for t in toks if t.isidentifier()}


def _method_lines(cls: type) -> list[int]:
    out = []
    for v in vars(cls).values():
        f = _underlying(v)
        code = getattr(f, "__code__", None)
        if isinstance(code, types.CodeType):
            out.append(code.co_firstlineno)
    return out


def _underlying(v: object) -> object:
    if isinstance(v, staticmethod | classmethod):
        return v.__func__
    if isinstance(v, property):
        return v.fget
    if isinstance(v, functools.cached_property):
        return v.func
    return v


# --------------------------------------------------------------------------
# code objects (no source)
# --------------------------------------------------------------------------


def _code_form(code: types.CodeType, doc: object = None) -> list[object]:
    consts: list[object] = []
    for i, c in enumerate(code.co_consts):
        if i == 0 and doc is not None and c == doc:
            consts.append(["<doc>"])
        else:
            consts.append(_const_form(c))
    return [
        "code",
        f"{sys.version_info[0]}.{sys.version_info[1]}",
        code.co_code,
        consts,
        list(code.co_names),
        list(code.co_varnames),
        list(code.co_freevars),
        list(code.co_cellvars),
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
    ]


def _const_form(c: object) -> object:
    if isinstance(c, types.CodeType):
        return _code_form(c)
    if c is None or type(c) in (str, bool, bytes):
        return [type(c).__name__, c]
    if type(c) in (int, float, complex):
        return [type(c).__name__, repr(c)]
    if type(c) is tuple:
        return ["tuple", [_const_form(x) for x in c]]
    if type(c) is frozenset:
        forms = [_const_form(x) for x in c]
        return ["frozenset", sorted(forms, key=_packb)]
    return [type(c).__name__, repr(c)]


# --------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------


def _packb(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)  # type: ignore[no-any-return]


def _value_digest(value: object) -> bytes:
    """The digest of a value keyed as a task input would be."""
    from aiomemo import _hashing

    return _hashing.hash_task({"func": _value_digest, "args": (value,), "kwargs": {}})


def _all_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _all_names(c)
    return names


_IMMUTABLE: Final = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)
_MUTATORS: Final = frozenset(
    {
        *("append", "extend", "insert", "remove", "pop", "popitem", "clear", "update"),
        *("setdefault", "add", "discard", "sort", "reverse", "appendleft", "extendleft"),
        *("rotate", "__setitem__", "__delitem__"),
    }
)
_STATE: dict[str, frozenset[str]] = {}


def _module_state(mod: types.ModuleType) -> frozenset[str]:
    """Globals of ``mod`` that its own functions and methods assign or change in place."""
    name = mod.__name__
    found = _STATE.get(name)
    if found is not None:
        return found
    out: set[str] = set()
    codes: list[types.CodeType] = []
    for v in list(vars(mod).values()):
        objs = list(vars(v).values()) if isinstance(v, type) else [v]
        for o in objs:
            f = inspect_unwrap(_underlying(o))
            if isinstance(f, types.FunctionType) and f.__globals__ is vars(mod):
                codes.append(f.__code__)
    while codes:
        code = codes.pop()
        ins = list(dis.get_instructions(code))
        for i, x in enumerate(ins):
            if x.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                out.add(str(x.argval))
            elif x.opname == "LOAD_GLOBAL" and i + 1 < len(ins):
                nxt = ins[i + 1]
                if nxt.opname in ("LOAD_ATTR", "LOAD_METHOD") and nxt.argval in _MUTATORS:
                    out.add(str(x.argval))
                    continue
                # ``g[key] = v`` / ``del g[key]``: the subscript store follows the key's loads
                for y in ins[i + 1 : i + 6]:
                    if y.opname in ("STORE_SUBSCR", "DELETE_SUBSCR"):
                        out.add(str(x.argval))
                        break
                    if y.opname.startswith(("CALL", "LOAD_GLOBAL", "STORE", "RETURN")):
                        break
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    result = frozenset(out)
    _STATE[name] = result
    return result


def _local_imports(code: types.CodeType, package: str) -> set[str]:
    """Modules a function imports in its body (``import a.b``, ``from . import c``)."""
    out: set[str] = set()
    consts: list[object] = []
    last = ""
    for ins in dis.get_instructions(code):
        if ins.opname == "LOAD_CONST":
            consts.append(ins.argval)
        elif ins.opname == "IMPORT_NAME":
            level = consts[-2] if len(consts) >= 2 and isinstance(consts[-2], int) else 0
            name = str(ins.argval)
            try:
                last = importlib.util.resolve_name("." * level + name, package) if level else name
            except (ImportError, ValueError):
                last = ""
                continue
            out.add(last)
        elif ins.opname == "IMPORT_FROM" and last:
            out.add(f"{last}.{ins.argval}")  # maybe a submodule: ``from pkg import mod``
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _local_imports(c, package)
    return out


def _user_module(name: str) -> types.ModuleType | None:
    """The user module ``name``, imported now when it is user code not imported yet.

    (The function imports it when it runs; its code must count from the first call.)
    """
    mod = sys.modules.get(name)
    if mod is not None:
        return mod if _module_kind(name) == _USER else None
    if name.partition(".")[0] in sys.stdlib_module_names:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    origin = getattr(spec, "origin", None)
    if spec is None or not isinstance(origin, str) or _classify_path(origin) != _USER:
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # it fails when the function runs too; nothing to follow
        return None


def _func_name(func: types.FunctionType) -> str:
    mod = func.__globals__.get("__name__") or func.__module__ or "?"
    return f"{mod}.{func.__code__.co_qualname}"


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


class _Walker:
    """One fingerprint computation (single-threaded; the caller holds _LOCK)."""

    def __init__(self) -> None:
        self.pieces: dict[str, bytes] = {}
        self.names: dict[int, str] = {}  # id(obj) -> its piece name (visited)
        self.keep: list[object] = []  # visited objects stay alive while ids are used
        self.bytecode: list[str] = []
        self.todo: list[tuple[str, object]] = []
        self.values: dict[str, object] = {}  # module-level value pieces, by name

    def run(self, func: object) -> CodeFingerprint:
        root = self.ref(func)
        while self.todo:
            kind, obj = self.todo.pop()
            if kind == "func":
                self.do_function(obj)  # type: ignore[arg-type]
            else:
                self.do_class(obj)  # type: ignore[arg-type]
        self.drop_state()
        items = sorted(self.pieces.items())
        digest = blake3.blake3(_packb([_FP_VERSION, root, items])).digest()
        record = b"".join(sorted(piece_id(k) + v[:DEP_DIGEST_SIZE] for k, v in items))
        return CodeFingerprint(
            name=self.display_name(func),
            digest=digest,
            deps=dict(items),
            from_bytecode=tuple(sorted(self.bytecode)),
            record=record,
        )

    def drop_state(self) -> None:
        """Module-level values the code changes (``global x; x = ...``, ``_cache[k] = v``,
        ``items.append(...)``) are state, not code: they count by name only, so a
        fingerprint does not depend on when it is made."""
        if not self.values:
            return
        modules = {n.rpartition(".")[0] for n in self.pieces} | {
            n.rpartition(".")[0] for n in self.values
        }
        state_ids: set[int] = set()
        state_names: set[str] = set()
        for mname in sorted(modules):
            mod = sys.modules.get(mname)
            if mod is None or _module_kind(mname) != _USER:
                continue
            mdict = vars(mod)
            for n in _module_state(mod):
                state_names.add(f"{mname}.{n}")
                if n in mdict and not isinstance(mdict[n], _IMMUTABLE):
                    state_ids.add(id(mdict[n]))
        state = blake3.blake3(_packb(["state"])).digest()
        for name, v in self.values.items():
            if name in state_names or (not isinstance(v, _IMMUTABLE) and id(v) in state_ids):
                self.pieces[name] = state

    @staticmethod
    def display_name(func: object) -> str:
        inner = inspect_unwrap(func)
        mod = getattr(inner, "__module__", None) or "?"
        qn = getattr(inner, "__qualname__", None) or type(inner).__qualname__
        return f"{mod}.{qn}"

    # ---------------------------------------------------------- pieces
    def claim(self, obj: object, name: str) -> str:
        """Reserve a unique piece name for ``obj`` (lambdas may share one)."""
        base, n = name, 1
        while name in self.pieces:
            n += 1
            name = f"{base}#{n}"
        self.pieces[name] = b""
        self.names[id(obj)] = name
        self.keep.append(obj)
        return name

    def dist(self, modname: str) -> str:
        name, version = _dist_of(modname)
        if name not in self.pieces:
            self.pieces[name] = blake3.blake3(_packb(["dist", version])).digest()
        return f"dist:{name}"

    def lib(self, modname: str | None, what: str) -> str:
        """Token for something in the standard library or an installed distribution."""
        kind = _module_kind(modname)
        if kind == _DIST and modname:
            return f"{self.dist(modname)}:{what}"
        return f"std:{what}"

    # ---------------------------------------------------------- references
    def ref(self, obj: object, where: str = "") -> str:
        """A token naming what ``obj`` is; schedules user code it reaches."""
        seen = self.names.get(id(obj))
        if seen is not None:
            return f"@{seen}"
        if isinstance(obj, types.FunctionType):
            modname = obj.__globals__.get("__name__")
            wrapped = getattr(obj, "__wrapped__", None)
            if _code_kind(obj.__code__, modname) != _USER:
                tok = self.lib(modname, f"{modname}.{obj.__code__.co_qualname}")
                if wrapped is not None and wrapped is not obj:
                    tok += " wraps " + self.ref(wrapped)
                return tok
            name = self.claim(obj, _func_name(obj))
            self.todo.append(("func", obj))
            return f"@{name}"
        if isinstance(obj, type):
            if _module_kind(obj.__module__) != _USER:
                return self.lib(obj.__module__, _type_name(obj))
            name = self.claim(obj, _type_name(obj))
            self.todo.append(("class", obj))
            return f"@{name}"
        if isinstance(obj, types.ModuleType):
            kind = _module_kind(obj.__name__)
            if kind == _USER:
                return f"module:{obj.__name__}"
            return self.lib(obj.__name__, f"module:{obj.__name__}")
        if isinstance(obj, types.MethodType):
            owner = obj.__self__
            return f"method {self.ref(obj.__func__)} of {self.ref(owner if isinstance(owner, type) else type(owner))}"
        if isinstance(obj, functools.partial):
            parts = [self.ref(obj.func)]
            parts += [self.value(a, f"{where}.args[{i}]") for i, a in enumerate(obj.args)]
            for k in sorted(obj.keywords):
                parts.append(f"{k}={self.value(obj.keywords[k], f'{where}.keywords[{k!r}]')}")
            return "partial(" + ", ".join(parts) + ")"
        if isinstance(obj, staticmethod | classmethod | property | functools.cached_property):
            return f"{type(obj).__name__}({self.ref(_underlying(obj))})"
        if isinstance(obj, types.BuiltinFunctionType | types.BuiltinMethodType):
            modname = getattr(obj, "__module__", None)
            self_ = getattr(obj, "__self__", None)
            if modname is None and self_ is not None and not isinstance(self_, types.ModuleType):
                modname = type(self_).__module__
            tok = self.lib(modname, f"{modname}.{getattr(obj, '__qualname__', obj.__name__)}")
            wrapped = getattr(obj, "__wrapped__", None)
            return tok + (" wraps " + self.ref(wrapped) if wrapped is not None else "")
        wrapped = getattr(obj, "__wrapped__", None)  # lru_cache and other wrapper objects
        if callable(wrapped):
            return f"{self.ref(type(obj))} wraps {self.ref(wrapped)}"
        return ""

    def value(self, obj: object, where: str, strict: bool = True) -> str:
        """A token for a default, closure variable or module-level value.

        Functions, classes and modules are references; anything else is keyed
        like a task input. With ``strict`` a value aiomemo cannot key raises
        :class:`UnhashableInputError` naming ``where``; without, it counts by
        its type.
        """
        tok = self.ref(obj, where)
        if tok:
            return tok
        try:
            digest = _value_digest(obj)
        except UnhashableInputError as exc:
            if strict:
                inner = exc.where.removeprefix("args[0]")
                raise UnhashableInputError(
                    f"{where}{inner}: aiomemo cannot key a value of type {exc.type_name} "
                    f"for the code fingerprint ({exc}); register a stand-in with "
                    "aiomemo.id_for_memo, or turn track_code off for this function",
                    where=f"{where}{inner}",
                    type_name=exc.type_name,
                ) from None
            t = type(obj)
            if _module_kind(t.__module__) == _STD:
                # by qualname only: the standard library moves private types
                # between modules across versions (_collections._tuplegetter)
                return f"instance of std:{t.__qualname__}"
            return f"instance of {self.ref(t)}"
        t = type(obj)
        extra = ""
        if _module_kind(t.__module__) == _USER and not isinstance(obj, type):
            extra = " of " + self.ref(t)  # a user dataclass, an enum member...
        self.scan(obj, 0, [0])
        return "value:" + digest.hex() + extra

    def scan(self, obj: object, depth: int, count: list[int]) -> None:
        """Follow functions and classes held in containers (dispatch tables)."""
        if depth > _SCAN_DEPTH or count[0] > _SCAN_ITEMS:
            return
        items: Iterator[object]
        if isinstance(obj, dict):
            items = iter([*obj.keys(), *obj.values()])
        elif isinstance(obj, list | tuple | set | frozenset):
            items = iter(obj)
        else:
            return
        for x in items:
            count[0] += 1
            if count[0] > _SCAN_ITEMS:
                return
            if isinstance(x, types.FunctionType | type | functools.partial):
                self.ref(x)
            else:
                self.scan(x, depth + 1, count)

    # ---------------------------------------------------------- functions
    def do_function(self, func: types.FunctionType) -> None:
        name = self.names[id(func)]
        code = func.__code__
        own: object = _function_tokens(func)
        if own is None:
            own = _code_form(code, func.__doc__)
            self.bytecode.append(name)
        defaults: list[object] = []
        pos = code.co_varnames[: code.co_argcount]
        for pname, v in zip(
            pos[len(pos) - len(func.__defaults__ or ()) :], func.__defaults__ or (), strict=True
        ):
            defaults.append([pname, self.value(v, f"default of {name}: {pname!r}")])
        for pname in sorted(func.__kwdefaults__ or {}):
            v = (func.__kwdefaults__ or {})[pname]
            defaults.append([pname, self.value(v, f"default of {name}: {pname!r}")])
        closure: list[object] = []
        for var, cell in zip(code.co_freevars, func.__closure__ or (), strict=True):
            try:
                v = cell.cell_contents
            except ValueError:  # not assigned yet
                closure.append([var, "<empty>"])
                continue
            closure.append([var, self.value(v, f"closure of {name}: {var!r}")])
        bindings = self.bindings(func, code)
        wrapped = getattr(func, "__wrapped__", None)
        if wrapped is not None:
            bindings.append(["__wrapped__", self.ref(wrapped)])
        self.pieces[name] = blake3.blake3(
            _packb(["function", own, defaults, closure, bindings])
        ).digest()

    def bindings(self, func: types.FunctionType, code: types.CodeType) -> list[object]:
        g = func.__globals__
        modname = g.get("__name__")
        names = _all_names(code)
        out: list[object] = []
        modules: dict[str, types.ModuleType] = {}
        for n in sorted(names):
            if n in g:
                v = g[n]
                if isinstance(v, types.ModuleType):
                    if _module_kind(v.__name__) == _USER:
                        modules[v.__name__] = v
                    out.append([n, self.ref(v)])
                else:
                    out.append([n, self.global_value(v, f"{modname}.{n}")])
        # local imports: ``import pkg.mod`` / ``from . import mod`` inside the function
        for cand in sorted(_local_imports(code, g.get("__package__") or "")):
            m = _user_module(cand)
            if m is not None and cand not in modules:
                modules[cand] = m
                out.append([f"import {cand}", f"module:{cand}"])
        # attributes of user modules: helpers.scale, pkg.sub.CONST
        done: set[str] = set()
        while len(done) < len(modules):
            for mname in sorted(set(modules) - done):
                done.add(mname)
                mdict = vars(modules[mname])
                for n in sorted(names):
                    if n not in mdict:
                        continue
                    v = mdict[n]
                    if isinstance(v, types.ModuleType):
                        if _module_kind(v.__name__) == _USER and v.__name__ not in modules:
                            modules[v.__name__] = v
                        out.append([f"{mname}.{n}", self.ref(v)])
                    else:
                        out.append([f"{mname}.{n}", self.global_value(v, f"{mname}.{n}")])
        return out

    def global_value(self, v: object, name: str) -> str:
        """A module-level name's value: a reference, or a constant piece of its own."""
        tok = self.ref(v, name)
        if tok:
            return tok
        if name not in self.pieces:
            self.pieces[name] = b""
            self.values[name] = v
            tok = self.value(v, name, strict=False)
            self.pieces[name] = blake3.blake3(_packb(["value", tok])).digest()
        return f"@{name}"

    # ---------------------------------------------------------- classes
    @staticmethod
    def written(obj: object, cls: type) -> bool:
        """Whether ``obj`` (a class member) is user code with source: a ``def`` or nested class."""
        if isinstance(obj, types.FunctionType):
            modname = obj.__globals__.get("__name__")
            return _code_kind(obj.__code__, modname) == _USER and _function_tokens(obj) is not None
        if isinstance(obj, type):
            return _module_kind(obj.__module__) == _USER
        return False

    def do_class(self, cls: type) -> None:
        name = self.names[id(cls)]
        src = _class_source(cls)
        own: object
        assigned: set[str] | None
        if src is None:
            own, assigned = ["<no source>"], None
            self.bytecode.append(name)
        else:
            own, assigned = src
        bases = [self.ref(b) or _type_name(b) for b in cls.__bases__ if b is not object]
        meta = type(cls)
        members: list[object] = []
        for k in sorted(vars(cls)):
            v = vars(cls)[k]
            inner = inspect_unwrap(_underlying(v))
            if assigned is not None and k not in assigned and not self.written(inner, cls):
                # not in the class body: made from it by a decorator or the
                # metaclass (dataclass, NamedTuple, enum, abc), which differs
                # between Python versions; the body's tokens hold what counts
                continue
            if (
                assigned is None
                and k.startswith("__")
                and k.endswith("__")
                and not isinstance(inner, types.FunctionType | type)
            ):
                continue  # bookkeeping Python adds (__module__, __dict__, __doc__, ...)
            if isinstance(v, type):
                members.append([k, self.ref(v)])
            else:
                members.append([k, self.value(v, f"{name}.{k}", strict=False)])
        self.pieces[name] = blake3.blake3(
            _packb(["class", own, bases, self.ref(meta) if meta is not type else "", members])
        ).digest()


def inspect_unwrap(func: object) -> object:
    """``func`` with ``__wrapped__`` chains followed (for display names)."""
    seen = set()
    while True:
        w = getattr(func, "__wrapped__", None)
        if w is None or id(w) in seen:
            return func
        seen.add(id(func))
        func = w


def with_code_digests(digests: bytes, func: object) -> bytes:
    """Per-argument digests (``packb([pos, kw])``) extended with the code pieces.

    Gives ``packb([pos, kw, CodeFingerprint.record])``: readers that know only the
    two-item form (and records written before code tracking) stay readable
    by :mod:`aiomemo._explain`, which takes a missing third item as "no code
    digests recorded".
    """
    fp = cached_fingerprint(func) or code_fingerprint(func)
    code = _packb(fp.record)
    if digests[:1] == b"\x92":  # a fixarray of two: make it three, append the map
        return b"\x93" + digests[1:] + code
    pos, kw = msgpack.unpackb(digests, raw=False, strict_map_key=False)[:2]
    return _packb([pos, kw, fp.record])
