"""ParslMemoizer(track_code=True): an edited helper of a Parsl app is a miss, a comment is not."""

from __future__ import annotations

import importlib
import linecache
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

parsl = pytest.importorskip("parsl")

from parsl.config import Config  # noqa: E402
from parsl.executors.threads import ThreadPoolExecutor  # noqa: E402
from parsl.utils import get_all_checkpoints  # noqa: E402

from aiomemo import _fingerprint  # noqa: E402
from aiomemo.parsl import ParslMemoizer  # noqa: E402

MOD = "fp_parsl_app"

APP = """
    from parsl import python_app

    CALLS = []

    def helper(x):
        # a comment
        return x * 2

    @python_app(cache=True)
    def work(x):
        CALLS.append(x)
        return helper(x) + 1
"""


def _import(root: Path, text: str) -> Any:
    root.mkdir(parents=True)
    (root / f"{MOD}.py").write_text(textwrap.dedent(text))
    sys.modules.pop(MOD, None)
    _fingerprint._clear_cache()
    linecache.clearcache()
    importlib.invalidate_caches()
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(MOD)
    finally:
        sys.path.remove(str(root))


def _run(tmp_path: Path, mod: Any, track_code: bool = True) -> tuple[int, int]:
    """Run work(3) under a fresh DFK that loads every earlier checkpoint: (result, calls)."""
    memoizer = ParslMemoizer(
        checkpoint_mode="task_exit",
        checkpoint_files=get_all_checkpoints(str(tmp_path / "runinfo")),
        track_code=track_code,
    )
    config = Config(
        run_dir=str(tmp_path / "runinfo"),
        executors=[ThreadPoolExecutor(max_threads=2, label="fp_threads")],
        memoizer=memoizer,
    )
    with parsl.load(config):
        result = mod.work(3).result()
    return result, len(mod.CALLS)


def test_parsl_app_follows_its_code(tmp_path: Path) -> None:
    """With track_code an edited helper misses, a comment hits; without it both hit."""
    try:
        assert _run(tmp_path, _import(tmp_path / "v1", APP)) == (7, 1)
        assert _run(tmp_path, _import(tmp_path / "v2", APP.replace("# a comment", "# edited"))) == (
            7,
            0,
        )
        edited = APP.replace("x * 2", "x * 3")
        assert _run(tmp_path, _import(tmp_path / "v3", edited)) == (10, 1)
        assert _run(tmp_path, _import(tmp_path / "v4", edited)) == (10, 0)
        # the default (Parsl's semantics): the function's name only
        plain = tmp_path / "plain"
        plain.mkdir()
        assert _run(plain, _import(tmp_path / "v5", APP), track_code=False) == (7, 1)
        assert _run(plain, _import(tmp_path / "v6", edited), track_code=False) == (7, 0)
    finally:
        sys.modules.pop(MOD, None)
        _fingerprint._clear_cache()
