"""Code fingerprints (aiomemo._fingerprint): what counts as a change, what does not.

Each test writes a small package to a temp dir, imports it, fingerprints a
function, then writes an edited copy under the same module names (in
another dir), imports that fresh, and compares.
"""

from __future__ import annotations

import importlib
import linecache
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiomemo
from aiomemo import _fingerprint
from aiomemo._fingerprint import CodeFingerprint, code_digest, code_fingerprint

PKG = "fpkg"

BASE: dict[str, str] = {
    "__init__.py": "",
    "config.py": """
        SCALE = 3
        OFFSETS = {"a": 1, "b": 2}
    """,
    "helpers.py": '''
        """Helpers."""
        import math
        from fpkg import config

        LIMIT = 10

        def deep(x):
            return x + config.SCALE

        def scale(x):
            """Scale x."""
            # a comment
            return deep(x) * 2 + math.floor(0.5)

        def never_called(x):
            return x - 1
    ''',
    "model.py": """
        class Base:
            def describe(self):
                return "base"

        class Scaler(Base):
            \"\"\"Multiplies.\"\"\"
            factor = 2

            def __init__(self, k):
                self.k = k

            def apply(self, x):
                return x * self.k * self.factor

            @property
            def doubled(self):
                return self.k * 2

            @staticmethod
            def unit():
                return 1

            @classmethod
            def make(cls):
                return cls(1)

            class Inner:
                def go(self):
                    return 0
    """,
    "tasks.py": """
        from fpkg import helpers
        from fpkg.helpers import LIMIT
        from fpkg.model import Scaler

        def task(x, n=3):
            total = helpers.scale(x) + LIMIT + n
            return Scaler(2).apply(total)

        def other(x):
            return helpers.never_called(x)
    """,
}


def write_pkg(root: Path, files: Mapping[str, str]) -> None:
    pkg = root / PKG
    pkg.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text).lstrip("\n"))


def purge() -> None:
    for name in list(sys.modules):
        if name == PKG or name.startswith(PKG + "."):
            del sys.modules[name]
    _fingerprint._clear_cache()
    linecache.clearcache()
    importlib.invalidate_caches()


@pytest.fixture
def load(tmp_path: Path) -> Iterator[Any]:
    """load(files, attr="task") -> the fingerprint of fpkg.tasks.<attr>, freshly imported."""
    n = [0]
    added: list[str] = []

    def _load(
        files: Mapping[str, str] | None = None, attr: str = "task", module: str = "tasks"
    ) -> CodeFingerprint:
        n[0] += 1
        root = tmp_path / f"v{n[0]}"
        write_pkg(root, files if files is not None else BASE)
        purge()
        sys.path.insert(0, str(root))
        added.append(str(root))
        try:
            mod = importlib.import_module(f"{PKG}.{module}")
        finally:
            sys.path.remove(str(root))
        return code_fingerprint(getattr(mod, attr))

    yield _load
    purge()


def edit(file: str, old: str, new: str, files: Mapping[str, str] = BASE) -> dict[str, str]:
    out = dict(files)
    src = textwrap.dedent(out[file])
    assert old in src, old
    out[file] = src.replace(old, new)
    return out


def changed(a: CodeFingerprint, b: CodeFingerprint) -> set[str]:
    names = set(a.deps) | set(b.deps)
    return {n for n in names if a.deps.get(n) != b.deps.get(n)}


class TestWhatCounts:
    def test_reaches_helpers_classes_constants_not_unreached(self, load: Any) -> None:
        """The fingerprint holds everything the task reaches in user code, and nothing else."""
        fp = load()
        assert set(fp.deps) == {
            "fpkg.tasks.task",
            "fpkg.tasks.LIMIT",
            # also an attribute of a module the task uses, with the same name:
            # references are found by name, so it is included (never too few)
            "fpkg.helpers.LIMIT",
            "fpkg.helpers.scale",
            "fpkg.helpers.deep",
            "fpkg.config.SCALE",
            "fpkg.model.Scaler",
            "fpkg.model.Scaler.__init__",
            "fpkg.model.Scaler.apply",
            "fpkg.model.Scaler.doubled",
            "fpkg.model.Scaler.unit",
            "fpkg.model.Scaler.make",
            "fpkg.model.Scaler.Inner",
            "fpkg.model.Scaler.Inner.go",
            "fpkg.model.Base",
            "fpkg.model.Base.describe",
        }
        assert fp.name == "fpkg.tasks.task"
        assert len(fp.digest) == 32
        assert fp.from_bytecode == ()

    @pytest.mark.parametrize(
        ("file", "old", "new", "piece"),
        [
            ("tasks.py", "LIMIT + n", "LIMIT - n", "fpkg.tasks.task"),
            ("tasks.py", "Scaler(2)", "Scaler(3)", "fpkg.tasks.task"),
            ("helpers.py", "deep(x) * 2", "deep(x) * 3", "fpkg.helpers.scale"),
            ("helpers.py", "x + config.SCALE", "x - config.SCALE", "fpkg.helpers.deep"),
            ("config.py", "SCALE = 3", "SCALE = 4", "fpkg.config.SCALE"),
            ("helpers.py", "LIMIT = 10", "LIMIT = 11", "fpkg.tasks.LIMIT fpkg.helpers.LIMIT"),
            (
                "model.py",
                "x * self.k * self.factor",
                "x * self.k + self.factor",
                "fpkg.model.Scaler.apply",
            ),
            ("model.py", "factor = 2", "factor = 5", "fpkg.model.Scaler"),
            ("model.py", "return self.k * 2", "return self.k * 4", "fpkg.model.Scaler.doubled"),
            ("model.py", "return 1\n", "return 2\n", "fpkg.model.Scaler.unit"),
            ("model.py", "return cls(1)", "return cls(2)", "fpkg.model.Scaler.make"),
            ("model.py", "return 0", "return 9", "fpkg.model.Scaler.Inner.go"),
            ("model.py", 'return "base"', 'return "BASE"', "fpkg.model.Base.describe"),
            ("tasks.py", "def task(x, n=3):", "def task(x, n=4):", "fpkg.tasks.task"),
        ],
    )
    def test_a_change_to_what_runs_is_named(
        self, load: Any, file: str, old: str, new: str, piece: str
    ) -> None:
        """Editing the task, a helper two calls away, a method or a constant changes exactly that piece."""
        a = load()
        b = load(edit(file, old, new))
        assert a.digest != b.digest
        assert changed(a, b) == set(piece.split())

    @pytest.mark.parametrize(
        ("file", "old", "new"),
        [
            ("helpers.py", "# a comment", "# another comment\n    # and more"),
            (
                "helpers.py",
                '"""Scale x."""',
                '"""Scale x, a longer docstring.\n\n    More.\n    """',
            ),
            ("helpers.py", '    """Scale x."""\n', ""),
            ("model.py", '"""Multiplies."""', '"""Multiplies, documented."""'),
            (
                "helpers.py",
                "return deep(x) * 2 + math.floor(0.5)",
                "return  deep( x )*2+math.floor( 0.5 )  # why",
            ),
            ("helpers.py", "def deep(x):\n", "\n\ndef deep(x):\n\n"),
            ("helpers.py", "    return x - 1", "    return x - 2"),  # never reached
            ("tasks.py", "return helpers.never_called(x)", "return 0"),  # never reached
            ("tasks.py", "    total = ", "    # comment\n    total = "),
            ("helpers.py", "math.floor(0.5)", "math.floor(\n        0.5\n    )"),
        ],
    )
    def test_no_change_to_what_runs_is_a_hit(
        self, load: Any, file: str, old: str, new: str
    ) -> None:
        """Comments, docstrings, whitespace, line breaks in brackets and unreached code do not count."""
        a = load()
        b = load(edit(file, old, new))
        assert changed(a, b) == set()
        assert a.digest == b.digest

    def test_indentation_width_does_not_count(self, load: Any) -> None:
        """Re-indenting a module with 2 spaces instead of 4 keeps every digest."""
        a = load()
        files = dict(BASE)
        for f in ("model.py", "helpers.py", "tasks.py"):
            src = textwrap.dedent(files[f])
            files[f] = "\n".join(
                " " * ((len(line) - len(line.lstrip(" "))) // 2) + line.lstrip(" ")
                for line in src.splitlines()
            )
        b = load(files)
        assert a.digest == b.digest

    def test_moving_the_checkout_keeps_the_digest(self, load: Any) -> None:
        """Pieces are named by module and qualname, never by path."""
        a = load()
        b = load()  # the same files under another directory
        assert a.digest == b.digest and a.deps == b.deps

    def test_adding_a_reached_helper_is_a_new_piece(self, load: Any) -> None:
        """A task that starts calling another helper gets its piece (and a new digest)."""
        a = load()
        b = load(
            edit(
                "tasks.py",
                "return Scaler(2).apply(total)",
                "return Scaler(2).apply(total) + helpers.never_called(1)",
            )
        )
        assert "fpkg.helpers.never_called" in b.deps
        assert "fpkg.helpers.never_called" not in a.deps

    def test_rebinding_an_import_counts(self, load: Any) -> None:
        """``from x import a`` becoming ``from x import b as a`` changes the task's piece."""
        files = edit(
            "tasks.py", "from fpkg.helpers import LIMIT", "import math\nfrom math import floor as f"
        )
        files = edit("tasks.py", "LIMIT + n", "f(0.5) + n", files)
        a = load(files)
        b = load(
            edit("tasks.py", "from math import floor as f", "from math import ceil as f", files)
        )
        assert changed(a, b) == {"fpkg.tasks.task"}


class TestValues:
    def test_defaults_and_closures_are_keyed(self, load: Any) -> None:
        """A changed default value or closure variable changes the function's piece."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                def make(k):
                    def task(x, y={"a": (1, 2)}, *, z=None):
                        return x * k
                    return task
                task = make(2)
            """,
        }
        a = load(files)
        b = load(edit("tasks.py", "make(2)", "make(3)", files))
        c = load(edit("tasks.py", '"a": (1, 2)', '"a": (1, 3)', files))
        d = load(edit("tasks.py", "z=None", "z=0", files))
        name = "fpkg.tasks.make.<locals>.task"
        assert changed(a, b) == {name} == changed(a, c) == changed(a, d)

    def test_unkeyable_closure_names_where(self, load: Any) -> None:
        """A closure variable aiomemo cannot key raises UnhashableInputError naming it."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                import threading
                def make():
                    cfg = [1, threading.Lock()]
                    def task(x):
                        return cfg
                    return task
                task = make()
            """,
        }
        with pytest.raises(aiomemo.UnhashableInputError) as ei:
            load(files)
        assert ei.value.where == "closure of fpkg.tasks.make.<locals>.task: 'cfg'[1]"
        assert "closure of fpkg.tasks.make.<locals>.task: 'cfg'[1]" in str(ei.value)
        assert "_thread.lock" in str(ei.value)

    def test_unkeyable_default_names_where(self, load: Any) -> None:
        """A default value aiomemo cannot key raises UnhashableInputError naming the parameter."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                import threading
                def task(x, lock=threading.Lock()):
                    return x
            """,
        }
        with pytest.raises(
            aiomemo.UnhashableInputError, match=r"default of fpkg\.tasks\.task: 'lock'"
        ):
            load(files)

    def test_unkeyable_module_value_counts_by_type(self, load: Any) -> None:
        """A module-level object aiomemo cannot key (a logger) counts by its type, no error."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                import logging
                log = logging.getLogger("x")
                def task(x):
                    log.info("hi")
                    return x
            """,
        }
        fp = load(files)
        assert "fpkg.tasks.log" in fp.deps
        assert load(files).digest == fp.digest

    def test_functions_in_a_dispatch_table_are_followed(self, load: Any) -> None:
        """Functions held in a module-level dict (a dispatch table) are pieces too."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                def double(x):
                    return 2 * x
                OPS = {"double": double}
                def task(x, op="double"):
                    return OPS[op](x)
            """,
        }
        a = load(files)
        b = load(edit("tasks.py", "return 2 * x", "return 3 * x", files))
        assert changed(a, b) == {"fpkg.tasks.double"}


class TestStructure:
    def test_recursion_and_cycles_terminate(self, load: Any) -> None:
        """Recursive functions and modules that import each other are walked once."""
        files = {
            "__init__.py": "",
            "a.py": """
                from fpkg import b
                def ping(n):
                    return 0 if n == 0 else b.pong(n - 1)
            """,
            "b.py": """
                from fpkg import a
                def pong(n):
                    return a.ping(n) if n else 1
            """,
            "tasks.py": """
                from fpkg import a
                def task(n):
                    return task(n - 1) if n > 5 else a.ping(n)
            """,
        }
        fp = load(files)
        assert {"fpkg.a.ping", "fpkg.b.pong", "fpkg.tasks.task"} <= set(fp.deps)
        g = load(edit("b.py", "else 1", "else 2", files))
        assert changed(fp, g) == {"fpkg.b.pong"}

    def test_decorators_are_seen_through(self, load: Any) -> None:
        """functools.wraps chains: both the user's wrapper and the wrapped function count."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                import functools
                def deco(f):
                    @functools.wraps(f)
                    def wrapper(*a, **k):
                        return f(*a, **k)
                    return wrapper
                @deco
                @functools.lru_cache
                def task(x):
                    return x + 1
            """,
        }
        a = load(files)
        assert {"fpkg.tasks.task", "fpkg.tasks.deco.<locals>.wrapper"} <= set(a.deps)
        b = load(edit("tasks.py", "return x + 1", "return x + 2", files))
        assert changed(a, b) == {"fpkg.tasks.task"}
        c = load(edit("tasks.py", "return f(*a, **k)", "return f(*a, **k) or 0", files))
        assert changed(a, c) == {"fpkg.tasks.deco.<locals>.wrapper"}

    async def test_cached_functions_calling_each_other(self, load: Any, tmp_path: Path) -> None:
        """A task calling another memo.cached function reaches the user function behind the wrapper."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                from aiomemo import Memoizer
                memo = Memoizer()
                @memo.cached(track_code=True)
                async def helper(x):
                    return x * 2
                @memo.cached(track_code=True)
                async def task(x):
                    return await helper(x) + 1
            """,
        }
        a = load(files)
        assert "fpkg.tasks.helper" in a.deps
        b = load(edit("tasks.py", "return x * 2", "return x * 3", files))
        assert changed(a, b) == {"fpkg.tasks.helper"}

    def test_local_imports_are_followed(self, load: Any) -> None:
        """``from pkg import mod`` inside the function body is followed like a global import."""
        files = {
            "__init__.py": "",
            "helpers.py": """
                def scale(x):
                    return x * 2
            """,
            "tasks.py": """
                def task(x):
                    from fpkg import helpers
                    return helpers.scale(x)
            """,
        }
        a = load(files)
        assert "fpkg.helpers.scale" in a.deps
        b = load(edit("helpers.py", "x * 2", "x * 4", files))
        assert changed(a, b) == {"fpkg.helpers.scale"}

    def test_lambdas_comprehensions_and_nested_code(self, load: Any) -> None:
        """Names used inside comprehensions, lambdas and inner functions are followed."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                K = 2
                def inner_helper(v):
                    return v + K
                square = lambda v: v * v
                def task(xs):
                    def go(v):
                        return inner_helper(v)
                    return [square(go(x)) for x in xs]
            """,
        }
        a = load(files)
        assert {"fpkg.tasks.inner_helper", "fpkg.tasks.K", "fpkg.tasks.<lambda>"} <= set(a.deps)
        b = load(edit("tasks.py", "v * v", "v * v * v", files))
        assert changed(a, b) == {"fpkg.tasks.<lambda>"}

    def test_installed_distributions_count_by_version(self, load: Any) -> None:
        """An installed distribution the task uses is one piece (its version); the stdlib is none."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                import json
                import msgpack
                def task(x):
                    return msgpack.packb(json.dumps(x))
            """,
        }
        fp = load(files)
        assert set(fp.deps) == {"fpkg.tasks.task", "msgpack"}
        import importlib.metadata

        import blake3

        want = blake3.blake3(
            _fingerprint._packb(["dist", f"msgpack=={importlib.metadata.version('msgpack')}"])
        ).digest()
        assert fp.deps["msgpack"] == want

    def test_no_source_falls_back_to_the_code_object(self) -> None:
        """Functions made by exec (a REPL, a notebook) are digested from bytecode, docstring aside."""

        def make(src: str) -> Any:
            ns: dict[str, Any] = {"__name__": "replmod"}
            exec(compile(src, "<stdin>", "exec"), ns)
            return ns["f"]

        base = 'def f(x):\n    "doc"\n    return x + 1\n'
        a = code_fingerprint(make(base))
        assert a.from_bytecode == ("replmod.f",)
        same = code_fingerprint(make(base.replace('"doc"', '"other doc"  # comment')))
        other = code_fingerprint(make(base.replace("x + 1", "x + 2")))
        assert a.digest == same.digest
        assert a.digest != other.digest

    def test_computed_once_per_function(self, load: Any) -> None:
        """The fingerprint is cached per function; the digest lookup is the hot path."""
        fp = load()
        task = sys.modules[f"{PKG}.tasks"].task
        assert code_fingerprint(task) is fp
        assert code_digest(task) == fp.digest[: _fingerprint.KEY_DIGEST_SIZE]
        assert _fingerprint.is_ready(task)


class TestFormattingProperty:
    SRC = """
        def task(x, y):
            total = 0
            for i in range(x):
                if i % 2:
                    total += i * y
                else:
                    total -= {k: v for k, v in [(1, 2)]}[1]
            return total
    """

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        width=st.integers(1, 8),
        blanks=st.lists(st.integers(0, 8), max_size=4),
        comments=st.lists(st.integers(0, 8), max_size=4),
    )
    def test_formatting_never_counts(
        self, load: Any, width: int, blanks: list[int], comments: list[int]
    ) -> None:
        """Any indentation width, blank lines and comments give the same digest."""
        base = textwrap.dedent(self.SRC).lstrip("\n")
        lines = []
        for n, line in enumerate(base.splitlines()):
            depth = (len(line) - len(line.lstrip())) // 4
            text = " " * (width * depth) + line.lstrip()
            if n in comments:
                text += "  # note"
            lines.append(text)
            if n in blanks:
                lines.append("")
        a = load({"__init__.py": "", "tasks.py": base})
        b = load({"__init__.py": "", "tasks.py": "\n".join(lines) + "\n"})
        assert a.digest == b.digest

    @settings(
        max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        const=st.integers(0, 50).filter(lambda c: c != 2),
        op=st.sampled_from(["+", "-", "*", "//", "<<"]),
    )
    def test_constants_and_operators_count(self, load: Any, const: int, op: str) -> None:
        """Changing any constant or operator in the body changes the digest."""
        base = textwrap.dedent(self.SRC).lstrip("\n")
        a = load({"__init__.py": "", "tasks.py": base})
        b = load({"__init__.py": "", "tasks.py": base.replace("i % 2", f"i % {const}")})
        c = load(
            {"__init__.py": "", "tasks.py": base.replace("total += i * y", f"total += i {op} y")}
        )
        assert a.digest != b.digest
        assert (a.digest == c.digest) == (op == "*")


def _record(t: dict[str, Any], *, code: bool, when: float = 1.7e9) -> Any:
    from aiomemo import _codec
    from aiomemo._explain import func_name
    from aiomemo._hashing import arg_digests, hash_task
    from aiomemo.stores import Record

    digests = arg_digests(t)
    if code:
        digests = _fingerprint.with_code_digests(digests, t["func"])
    return Record(hash_task(t), _codec.encode(1), func_name(t["func"]), when, digests)


def _write(d: Path, records: list[Any], name: str = "seg-1.amlog") -> None:
    from aiomemo import _checkpoint as ck

    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(ck.file_header() + ck.encode_batch(records))


class TestKeysAndExplain:
    def test_key_includes_the_digest_only_when_tracked(self, load: Any) -> None:
        """track_code adds the code digest to the key; untracked keys stay as they were."""
        load()
        f = sys.modules[f"{PKG}.tasks"].task
        plain = {"func": f, "args": (1,), "kwargs": {}}
        tracked = {**plain, "track_code": True}
        assert aiomemo.make_hash(plain) == aiomemo.make_hash({**plain, "track_code": False})
        assert aiomemo.make_hash(tracked) != aiomemo.make_hash(plain)
        assert aiomemo.make_hash(tracked) == aiomemo.make_hash(dict(tracked))
        load(edit("helpers.py", "deep(x) * 2", "deep(x) * 3"))
        g = sys.modules[f"{PKG}.tasks"].task
        assert aiomemo.make_hash({**plain, "func": g}) == aiomemo.make_hash(plain)
        assert aiomemo.make_hash({**tracked, "func": g}) != aiomemo.make_hash(tracked)

    def test_record_digests_extend_the_two_item_form(self, load: Any) -> None:
        """Records keep [pos, kw, {piece: 8-byte digest}]."""
        import msgpack

        from aiomemo._hashing import arg_digests

        fp = load()
        f = sys.modules[f"{PKG}.tasks"].task
        t = {"func": f, "args": (1,), "kwargs": {"n": 2}, "track_code": True}
        raw = _fingerprint.with_code_digests(arg_digests(t), f)
        pos, kw, code = msgpack.unpackb(raw, raw=False)
        assert [pos, kw] == msgpack.unpackb(arg_digests(t), raw=False)
        assert code == fp.record and len(code) == 8 * len(fp.deps)  # 8 bytes a piece
        assert _fingerprint.split_record(code) == {
            pid: d for pid, (_, d) in fp.pieces_by_id().items()
        }
        assert {n for n, _ in fp.pieces_by_id().values()} == set(fp.deps)

    def test_explain_names_the_changed_helper(self, load: Any, tmp_path: Path) -> None:
        """explain says which piece changed since the recorded call."""
        from aiomemo._explain import explain

        load()
        f = sys.modules[f"{PKG}.tasks"].task
        _write(
            tmp_path / "ck",
            [_record({"func": f, "args": (1,), "kwargs": {}, "track_code": True}, code=True)],
        )
        load(edit("helpers.py", "x + config.SCALE", "x * config.SCALE"))
        g = sys.modules[f"{PKG}.tasks"].task
        ex = explain({"func": g, "args": (1,), "kwargs": {}, "track_code": True}, [tmp_path / "ck"])
        assert not ex.hit and ex.code_changed == ("fpkg.helpers.deep",)
        assert str(ex).startswith("fpkg.helpers.deep changed since the recorded call")
        assert ex.to_dict()["code"] == [{"name": i.name, "status": i.status} for i in ex.code]
        # an input changed too: both are said
        ex2 = explain(
            {"func": g, "args": (2,), "kwargs": {}, "track_code": True}, [tmp_path / "ck"]
        )
        assert "args[0] differs" in str(ex2) and "fpkg.helpers.deep changed" in str(ex2)
        # a newly reached piece
        load(
            edit(
                "tasks.py",
                "return Scaler(2).apply(total)",
                "return Scaler(2).apply(total) + helpers.never_called(0)",
            )
        )
        h = sys.modules[f"{PKG}.tasks"].task
        ex3 = explain(
            {"func": h, "args": (1,), "kwargs": {}, "track_code": True}, [tmp_path / "ck"]
        )
        assert "fpkg.helpers.never_called is newly reached" in str(ex3)
        # a piece no longer reached (records keep its id only)
        load(edit("tasks.py", "return Scaler(2).apply(total)", "return total"))
        k = sys.modules[f"{PKG}.tasks"].task
        ex4 = explain(
            {"func": k, "args": (1,), "kwargs": {}, "track_code": True}, [tmp_path / "ck"]
        )
        assert "fpkg.tasks.task changed since the recorded call" in str(ex4)
        gone = 10  # Scaler, its 6 members, Inner.go, Base and describe: only the task reached them
        assert f"{gone} recorded pieces of code are no longer reached" in str(ex4), str(ex4)

    def test_old_records_still_explain(self, load: Any, tmp_path: Path) -> None:
        """Records without code digests (older, or untracked) still compare inputs."""
        from aiomemo._explain import explain

        load()
        f = sys.modules[f"{PKG}.tasks"].task
        _write(tmp_path / "ck", [_record({"func": f, "args": (1,), "kwargs": {}}, code=False)])
        ex = explain({"func": f, "args": (2,), "kwargs": {}, "track_code": True}, [tmp_path / "ck"])
        assert ex.records_with_digests == 1 and ex.code == ()
        assert str(ex).startswith("args[0] differs from the nearest recorded call")

    async def test_memoizer_default_and_task_override(self, load: Any, tmp_path: Path) -> None:
        """Memoizer(track_code=True) keys tasks by code unless the task or decorator says no."""
        load()
        f = sys.modules[f"{PKG}.tasks"].task

        async def job(x: int) -> int:
            return x

        async with aiomemo.Memoizer(
            track_code=True, checkpoint_mode="task_exit", run_dir=tmp_path / "r"
        ) as memo:
            t: dict[str, Any] = {"func": f, "args": (1,), "kwargs": {}}
            key = await memo.make_hash(t)
            assert t["track_code"] is True
            assert key == aiomemo.make_hash(
                {"func": f, "args": (1,), "kwargs": {}, "track_code": True}
            )
            off = {"func": f, "args": (1,), "kwargs": {}, "track_code": False}
            assert await memo.make_hash(off) == aiomemo.make_hash(
                {"func": f, "args": (1,), "kwargs": {}}
            )
            cached = memo.cached(job)
            plain = memo.cached(track_code=False)(job)
            assert await cached.key(1) != await plain.key(1)  # type: ignore[attr-defined]
            assert await cached(5) == 5 and await cached(5) == 5
            assert memo.stats().hits == 1


class TestModuleState:
    def test_state_the_code_changes_counts_by_name_only(self, load: Any) -> None:
        """Globals the module's code assigns or mutates do not make the fingerprint depend on when."""
        files = {
            "__init__.py": "",
            "tasks.py": """
                _CACHE = {}
                SEEN = []
                CALLS = 0
                CONFIG = {"gain": 2}
                def remember(k, v):
                    _CACHE[(k, 1)] = v
                def note(x):
                    global CALLS
                    CALLS += 1
                    SEEN.append(x)
                def task(x):
                    note(x)
                    remember(x, x)
                    return _CACHE.get(x), len(SEEN), CALLS, CONFIG["gain"]
            """,
        }
        a = load(files)
        mod = sys.modules[f"{PKG}.tasks"]
        _fingerprint._clear_cache()
        for i in range(3):  # the process runs: state changes
            mod.task(i)
        b = code_fingerprint(mod.task)
        assert a.digest == b.digest
        # a constant the code only reads still counts
        c = load(edit("tasks.py", '"gain": 2', '"gain": 3', files))
        assert changed(a, c) == {"fpkg.tasks.CONFIG"}


class TestOtherCallables:
    def test_methods_partials_and_classes_as_the_task(self, load: Any) -> None:
        """A bound method, a classmethod, a partial or a class as the task function are followed."""
        import functools

        load()
        model = sys.modules[f"{PKG}.model"]
        helpers = sys.modules[f"{PKG}.helpers"]
        bound = code_fingerprint(model.Scaler(2).apply)
        assert {"fpkg.model.Scaler.apply", "fpkg.model.Scaler"} <= set(bound.deps)
        made = code_fingerprint(model.Scaler.make)
        assert "fpkg.model.Scaler.make" in made.deps
        part = code_fingerprint(functools.partial(helpers.scale, 3))
        assert {"fpkg.helpers.scale", "fpkg.helpers.deep"} <= set(part.deps)
        assert code_fingerprint(functools.partial(helpers.scale, 4)).digest != part.digest
        cls = code_fingerprint(model.Scaler)
        assert "fpkg.model.Scaler.apply" in cls.deps
        # library functions: no user pieces, but a stable digest
        assert code_fingerprint(print).deps == {}
        assert code_digest(print) == code_fingerprint(print).digest[:16]


class TestKeyIdentity:
    def test_tracked_keys_still_tell_functions_apart(self) -> None:
        """The digest stands in for module + qualname: same code under two names, two keys;
        closures of one qualname with different closure values, two keys (untracked: one)."""

        def f(x: int) -> int:
            return x + 1

        def g(x: int) -> int:
            return x + 1

        def make(k: int) -> Any:
            def h(x: int) -> int:
                return x + k

            return h

        def key(fn: Any, track: bool) -> str:
            return aiomemo.make_hash({"func": fn, "args": (1,), "kwargs": {}, "track_code": track})

        assert key(f, True) != key(g, True)
        h1, h2 = make(1), make(2)
        assert key(h1, False) == key(h2, False)
        assert key(h1, True) != key(h2, True)
        assert key(make(1), True) == key(h1, True)
        # with a version, or a callable that is not a plain function, the digest is a sixth item
        v1 = aiomemo.make_hash(
            {"func": f, "args": (1,), "kwargs": {}, "track_code": True, "version": 1}
        )
        assert v1 != key(f, True)


class TestConcurrency:
    async def test_concurrent_first_calls_share_one_computation(
        self, load: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """200 concurrent first keys of one tracked function compute its fingerprint once, off the loop."""
        import asyncio
        import threading

        load()
        f = sys.modules[f"{PKG}.tasks"].task
        _fingerprint._clear_cache()
        runs: list[str] = []
        real = _fingerprint._Walker.run

        def counted(self: Any, func: object) -> CodeFingerprint:
            runs.append(threading.current_thread().name)
            return real(self, func)

        monkeypatch.setattr(_fingerprint._Walker, "run", counted)
        task = {"func": f, "args": (1,), "kwargs": {}, "track_code": True}
        keys = await asyncio.gather(
            *(aiomemo._hashing.make_hash_async(dict(task)) for _ in range(200))
        )
        assert len(set(keys)) == 1 and len(runs) == 1
        assert runs[0] != threading.main_thread().name
        assert not _fingerprint._INFLIGHT

    async def test_an_unkeyable_closure_fails_every_waiter(self, load: Any) -> None:
        """The error reaches each concurrent caller, and the next call tries again."""
        import asyncio

        files = {
            "__init__.py": "",
            "tasks.py": """
                import threading
                def make():
                    lock = threading.Lock()
                    def task(x):
                        return lock
                    return task
                task = make()
            """,
        }
        with pytest.raises(aiomemo.UnhashableInputError):
            load(files)
        f = sys.modules[f"{PKG}.tasks"].task
        task = {"func": f, "args": (1,), "kwargs": {}, "track_code": True}
        res = await asyncio.gather(
            *(aiomemo._hashing.make_hash_async(dict(task)) for _ in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(r, aiomemo.UnhashableInputError) for r in res)
        assert "closure of fpkg.tasks.make.<locals>.task: 'lock'" in str(res[0])
        with pytest.raises(aiomemo.UnhashableInputError):
            await aiomemo._hashing.make_hash_async(dict(task))


class TestDamagedDigests:
    @pytest.mark.parametrize(
        ("third", "want"),
        [
            ("junk", None),
            (b"\x01\x02\x03", {}),
            (b"abcdefgh" + b"xyz", {b"abcd": b"efgh"}),
            (None, None),
        ],
    )
    def test_a_bad_code_item_is_no_code_digests(self, third: object, want: object) -> None:
        """A record whose code item is damaged or foreign still explains its inputs."""
        import msgpack

        from aiomemo._explain import _unpack_digests

        got = _unpack_digests(msgpack.packb([[b"d" * 8], {}, third], use_bin_type=True))
        assert got is not None
        assert got[0] == [b"d" * 8] and got[2] == want
        assert _unpack_digests(msgpack.packb([[], {}, b"", 4])) is None  # four items: not ours
