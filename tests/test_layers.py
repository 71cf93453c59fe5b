"""The layers import one way: format -> stores -> memoizer -> adapters and the CLI.

Read from the source (``ast``), so a forbidden import fails here even when it
is made inside a function.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "aiomemo"

#: the bottom: what checkpoints hold, how they are named, framed, read, written
BASE = {"_exceptions", "_records", "_naming", "_rundir", "_codec"}
FORMAT = BASE | {"_paths", "_checkpoint", "_maintenance", "_gc"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(aiomemo module imported, names taken from it) for every import in ``path``."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "aiomemo":
                out += [(a.name, []) for a in node.names]
            elif node.module.startswith("aiomemo."):
                out.append((node.module[len("aiomemo.") :], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [
                (a.name[len("aiomemo.") :], []) for a in node.names if a.name.startswith("aiomemo.")
            ]
    return out


def _top(module: str) -> str:
    return module.split(".", 1)[0]


@pytest.mark.parametrize("name", sorted(FORMAT))
def test_format_layer_imports_nothing_above_it(name: str) -> None:
    """A format-layer module imports only other format-layer modules."""
    for module, _ in _imports(SRC / f"{name}.py"):
        assert _top(module) in FORMAT, f"{name} imports aiomemo.{module}"


@pytest.mark.parametrize("name", sorted(BASE - {"_codec"}))
def test_bottom_modules_import_nothing_of_aiomemo(name: str) -> None:
    """Records, names and errors sit at the very bottom."""
    mods = {_top(m) for m, _ in _imports(SRC / f"{name}.py")}
    assert mods <= {"_exceptions"}, (name, mods)


@pytest.mark.parametrize("path", sorted((SRC / "stores").glob("*.py")), ids=lambda p: p.name)
def test_stores_import_nothing_above_them(path: Path) -> None:
    """Stores build on the format layer, never on the Memoizer, adapters or CLI."""
    for module, _ in _imports(path):
        assert _top(module) in FORMAT | {"stores"}, f"stores/{path.name} imports aiomemo.{module}"


def test_cli_uses_only_package_public_functions_of_the_format_layer() -> None:
    """The CLI takes no private (underscore) name from the format layer."""
    for module, names in _imports(SRC / "_cli.py"):
        if _top(module) in FORMAT - {"_exceptions", "_codec"}:
            private = [n for n in names if n.startswith("_")]
            assert not private, f"_cli takes {private} from aiomemo.{module}"


@dataclasses.dataclass(frozen=True)
class _Callable:
    def __call__(self, x: int) -> int:
        return x

    def method(self, x: int) -> int:
        return x


def _plain(x: int) -> int:
    return x


@pytest.mark.parametrize(
    "func", [_plain, _Callable().method, _Callable(), functools.partial(_plain)], ids=repr
)
async def test_records_name_functions_by_the_one_rule(func: Any, tmp_path: Path) -> None:
    """The func a Memoizer records is _naming.func_name's, which explain matches against."""
    from aiomemo import Memoizer
    from aiomemo._naming import func_name
    from aiomemo.stores import MemoryStore

    store = MemoryStore()
    async with Memoizer(checkpoint_mode="task_exit", store=store, config_run_dir=tmp_path) as memo:
        task = {"func": func, "args": (1,), "kwargs": {}, "id": 0}
        assert await memo.check_memo(task) is None
        await memo.update_memo_result(task, 1)
    assert [r.func for r in store.records.values()] == [func_name(func)]


def test_record_types_are_one_class() -> None:
    """aiomemo.stores re-exports the format layer's record types (one class each)."""
    import aiomemo._records
    import aiomemo.stores

    assert aiomemo.stores.Record is aiomemo._records.Record
    assert aiomemo.stores.LoadReport is aiomemo._records.LoadReport


def test_retention_child_stands_on_the_format_layer() -> None:
    """The retention child plans and rewrites with the format layer alone (no Memoizer);
    the frames it speaks import nothing of aiomemo."""
    for module, _ in _imports(SRC / "_retention_child.py"):
        assert _top(module) in FORMAT | {"_retention_wire"}, f"_retention_child imports {module}"
    assert not _imports(SRC / "_retention_wire.py")
