"""track_code end to end: a package in a temp dir, a workflow run in a subprocess, edits.

Each case writes the package and a workflow script, runs the workflow (a
miss: it computes and checkpoints), edits the package and runs again, and
checks the second run's hits and misses, and what ``memo.explain`` says.
The same runs under other Python versions (3.12, 3.13) when their
interpreters are installed: a virtual env with aiomemo's dependencies is
made on demand (``.venv-py3.12``..., shared with the cross-Python key
tests); without the interpreter those cases are skipped with the reason.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from helpers import find_python, venv_for

SRC = Path(__file__).resolve().parent.parent / "src"

PACKAGE: dict[str, str] = {
    "mypkg/__init__.py": "",
    "mypkg/config.py": """
        THRESHOLD = 10
    """,
    "mypkg/helpers.py": '''
        """Helpers of the workflow."""
        from mypkg import config

        def clamp(x):
            return min(x, config.THRESHOLD)

        def scale(x):
            """Scale a value."""
            # two calls away from the task: task -> scale -> clamp
            return clamp(x) * 2

        def unused(x):
            return x
    ''',
    "mypkg/model.py": """
        class Model:
            def __init__(self, k):
                self.k = k

            def predict(self, x):
                return x + self.k
    """,
    "mypkg/kinds.py": """
        # what Python generates differently across versions: the fingerprint
        # must see only the source (the cross-version test depends on it)
        import abc, dataclasses, enum, functools, typing

        class Mode(enum.Enum):
            FAST = 1
            SLOW = 2

        @dataclasses.dataclass(frozen=True)
        class Settings:
            gain: int = 1
            label: str = "x"

            def boost(self):
                return self.gain * 2

        class Point(typing.NamedTuple):
            x: int
            y: int = 0

        class Shape(abc.ABC):
            __slots__ = ()

            @abc.abstractmethod
            def area(self): ...

            @functools.cached_property
            def unit(self):
                return 1

        class Square(Shape):
            def area(self):
                return 4

        DEFAULTS = Settings()
    """,
    "mypkg/tasks.py": """
        from mypkg import helpers
        from mypkg.kinds import DEFAULTS, Mode, Point, Square
        from mypkg.model import Model

        OFFSET = 1

        async def compute(x, mode=Mode.FAST):
            m = Model(3)
            extra = DEFAULTS.boost() + Point(1).x + Square().area() + mode.value
            return m.predict(helpers.scale(x)) + OFFSET + len(f"{x!r:>{2}}") + extra
    """,
    "workflow.py": """
        import asyncio, json, sys
        from aiomemo import Memoizer
        from mypkg.tasks import compute

        async def main():
            async with Memoizer(checkpoint_mode="task_exit", config_run_dir="runinfo",
                                track_code=True) as memo:
                task = {"func": compute, "args": (7,), "kwargs": {}, "ignore_for_cache": [],
                        "version": None, "track_code": True}
                why = str(await memo.explain(dict(task)))
                f = memo.cached(compute)
                result = await f(7)
                s = memo.stats()
                print(json.dumps({"result": result, "hits": s.hits, "misses": s.misses,
                                  "explain": why, "python": sys.version_info[:2]}))

        asyncio.run(main())
    """,
}

EDITS: dict[str, tuple[str, str, str, str | None]] = {
    # name: (file, old, new, piece named by explain, or None for a hit)
    "task body": ("mypkg/tasks.py", "+ OFFSET", "- OFFSET", "mypkg.tasks.compute"),
    "helper two calls away": ("mypkg/helpers.py", "min(x, ", "max(x, ", "mypkg.helpers.clamp"),
    "method of a class": (
        "mypkg/model.py",
        "x + self.k",
        "x * self.k",
        "mypkg.model.Model.predict",
    ),
    "module constant": (
        "mypkg/config.py",
        "THRESHOLD = 10",
        "THRESHOLD = 5",
        "mypkg.config.THRESHOLD",
    ),
    "enum value": ("mypkg/kinds.py", "FAST = 1", "FAST = 3", "mypkg.kinds.Mode"),
    "dataclass decorator": (
        "mypkg/kinds.py",
        "dataclass(frozen=True)",
        "dataclass(frozen=False)",
        "mypkg.kinds.Settings",
    ),
    "subclass method": ("mypkg/kinds.py", "return 4", "return 5", "mypkg.kinds.Square.area"),
    "comment": ("mypkg/helpers.py", "# two calls away", "# an edited comment", None),
    "docstring": ("mypkg/helpers.py", '"""Scale a value."""', '"""Scale it (new words)."""', None),
    "whitespace": ("mypkg/helpers.py", "return clamp(x) * 2", "return   clamp( x )*2\n\n", None),
    "unreached function": ("mypkg/helpers.py", "return x\n", "return x + 100\n", None),
}


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip("\n"))


def apply_edit(root: Path, file: str, old: str, new: str) -> None:
    p = root / file
    text = p.read_text()
    assert old in text, (file, old)
    p.write_text(text.replace(old, new))
    # a stale .pyc must not decide: Python checks mtimes at 1 s resolution
    for pyc in glob.glob(str(root / "**" / "__pycache__"), recursive=True):
        shutil.rmtree(pyc)


def run(python: str, root: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(root)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run(
        [python, "workflow.py"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- interpreters


def _venv_python(version: str) -> str:
    """An interpreter of ``version`` with aiomemo's dependencies (a cached venv), or skip."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    exe = find_python(version)
    if exe is None:
        pytest.skip(f"no python{version} on PATH or under pyenv")
    return str(venv_for(version, exe))


VERSIONS = ["3.11", "3.12", "3.13"]


@pytest.fixture(scope="module", params=VERSIONS)
def python(request: pytest.FixtureRequest) -> str:
    """The interpreter of one Python version."""
    return _venv_python(request.param)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The package and workflow, written fresh."""
    root = tmp_path / "checkout"
    write(root, PACKAGE)
    return root


class TestEdits:
    @pytest.mark.parametrize("case", sorted(EDITS))
    def test_edit_then_rerun(self, python: str, checkout: Path, case: str) -> None:
        """Edits to what runs miss and name the piece; other edits hit."""
        first = run(python, checkout)
        assert (first["hits"], first["misses"]) == (0, 1)
        assert "no recorded call" in first["explain"]
        file, old, new, piece = EDITS[case]
        apply_edit(checkout, file, old, new)
        second = run(python, checkout)
        if piece is None:
            assert (second["hits"], second["misses"]) == (1, 0), second
            assert second["result"] == first["result"]
            assert second["explain"].startswith("hit:")
        else:
            assert (second["hits"], second["misses"]) == (0, 1), second
            assert f"{piece} changed since the recorded call" in second["explain"]
            # and the new result is recorded: a third run hits
            third = run(python, checkout)
            assert (third["hits"], third["misses"]) == (1, 0)

    def test_moving_the_checkout_is_a_hit(
        self, python: str, checkout: Path, tmp_path: Path
    ) -> None:
        """Paths are not in the fingerprint: a moved checkout (runinfo and all) still hits."""
        first = run(python, checkout)
        assert first["misses"] == 1
        moved = tmp_path / "elsewhere" / "deeper" / "checkout"
        moved.parent.mkdir(parents=True)
        shutil.move(str(checkout), str(moved))
        second = run(python, moved)
        assert (second["hits"], second["misses"]) == (1, 0)


class TestAcrossVersions:
    @pytest.mark.parametrize("other", ["3.12", "3.13"])
    def test_a_result_recorded_by_311_hits_in_another_version(
        self, checkout: Path, other: str
    ) -> None:
        """Fingerprints come from source tokens: another Python version gets the same key."""
        if sys.version_info[:2] != (3, 11):
            pytest.skip("the suite's own interpreter is not 3.11")
        py = _venv_python(other)
        # f-strings are tokenized differently from 3.12 on: the fingerprint must not see it
        apply_edit(
            checkout,
            "mypkg/helpers.py",
            "return clamp(x) * 2",
            'return clamp(x) * len(f"{x!r:>{2}}ab")',
        )
        first = run(sys.executable, checkout)
        assert first["misses"] == 1 and first["python"] == [3, 11]
        second = run(py, checkout)
        assert second["python"] == [int(p) for p in other.split(".")]
        assert (second["hits"], second["misses"]) == (1, 0), second


class TestCli:
    def test_aiomemo_explain_track_code(self, checkout: Path) -> None:
        """``aiomemo explain --track-code`` imports the task and names the edited helper."""
        run(sys.executable, checkout)
        apply_edit(checkout, *EDITS["helper two calls away"][:3])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["PYTHONPATH"] = str(SRC)  # the checkout itself comes from the current dir
        cmd = [
            sys.executable,
            "-m",
            "aiomemo",
            "explain",
            "runinfo",
            "--func",
            "mypkg.tasks.compute",
        ]
        proc = subprocess.run(
            [*cmd, "--args", "[7]", "--track-code"],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("mypkg.helpers.clamp changed since the recorded call"), (
            proc.stdout
        )
        assert "mypkg.helpers.clamp" in proc.stdout.splitlines()[-1]
        # without --track-code the key cannot match, and the inputs do: it says so
        plain = subprocess.run(
            [*cmd, "--args", "[7]"], cwd=checkout, env=env, capture_output=True, text=True
        )
        assert plain.returncode == 0 and "all 1 inputs match" in plain.stdout
        bad = subprocess.run(
            [*cmd[:-1], "nosuchmod.f", "--track-code"],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and "no importable module" in bad.stderr
