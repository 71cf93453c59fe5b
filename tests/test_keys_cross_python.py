"""Keys and checkpoints are the same on every supported Python.

For each other supported interpreter found on the machine (on PATH or under
pyenv), a venv with aiomemo's core dependencies and numpy is made on demand
next to the project (``.venv-py3.12``, ...; kept for the next run), and in it:
the golden key vectors (``tests/golden/keys_cases.py``) must give
``tests/golden/keys.json``, and a checkpoint written by this interpreter
must load with the same keys and the same results. An interpreter that is
absent is skipped with a reason (also with CI set); anything else fails.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from helpers import find_python, venv_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
OTHER_VERSIONS = [
    v for v in ("3.11", "3.12", "3.13") if v != f"{sys.version_info[0]}.{sys.version_info[1]}"
]


def run(py: pathlib.Path | str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("PYTHONHASHSEED", None)
    res = subprocess.run([str(py), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def checkpoint_here(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A checkpoint written by this interpreter."""
    run_dir = tmp_path_factory.mktemp("xpy") / "000"
    out = json.loads(
        run(sys.executable, str(GOLDEN / "checkpoint_cases.py"), "write", str(run_dir))
    )
    assert out["written"] > 5
    return run_dir


@pytest.mark.parametrize("version", OTHER_VERSIONS)
def test_same_keys_and_checkpoints(version: str, checkpoint_here: pathlib.Path) -> None:
    """Golden keys hold, and this interpreter's checkpoint loads with equal results."""
    exe = find_python(version)
    if exe is None:
        pytest.skip(f"no python{version} on PATH or under pyenv")
    py = venv_for(version, exe)
    got = json.loads(run(py, str(GOLDEN / "keys_cases.py")))
    want = json.loads((GOLDEN / "keys.json").read_text())
    assert got == want
    out = json.loads(run(py, str(GOLDEN / "checkpoint_cases.py"), "check", str(checkpoint_here)))
    assert out["bad"] == []
    assert out["hits"] > 5


def test_this_interpreter_loads_its_own(checkpoint_here: pathlib.Path) -> None:
    """The check itself works here (so a failure elsewhere is that Python's)."""
    out = json.loads(
        run(sys.executable, str(GOLDEN / "checkpoint_cases.py"), "check", str(checkpoint_here))
    )
    assert out == {"hits": out["hits"], "bad": []}
    assert out["hits"] > 5
