"""The public surface: every name in __all__ exists and nothing private leaks."""

from __future__ import annotations

import aiomemo
import aiomemo.stores


def test_all_names_exist() -> None:
    """Every name in aiomemo.__all__ and aiomemo.stores.__all__ resolves."""
    for mod in (aiomemo, aiomemo.stores):
        for name in mod.__all__:
            assert getattr(mod, name) is not None, name


def test_public_names_are_listed() -> None:
    """Public attributes of aiomemo are exactly __all__ (plus dunders and submodules)."""
    public = {
        n
        for n in dir(aiomemo)
        if not n.startswith("_") and n not in {"stores", "parsl", "annotations"}
    }
    assert public == set(aiomemo.__all__)


def test_exported_objects_belong_to_aiomemo() -> None:
    """Exported classes and functions are aiomemo's own and documented."""
    for name in aiomemo.__all__:
        obj = getattr(aiomemo, name)
        if name in {"CheckpointMode", "Task"}:  # type aliases
            continue
        module = getattr(obj, "__module__", "aiomemo")
        assert module.startswith("aiomemo"), (name, module)
        assert obj.__doc__, name


def test_error_tree() -> None:
    """Every error derives from MemoError, with the documented extra bases."""
    assert issubclass(aiomemo.UnhashableInputError, aiomemo.MemoError)
    assert issubclass(aiomemo.UnhashableInputError, TypeError)
    assert issubclass(aiomemo.CorruptCheckpointError, aiomemo.CheckpointError)
    assert issubclass(aiomemo.MemoizerClosedError, RuntimeError)
    for name in ("CheckpointError", "LeaderCancelledError", "StoreError"):
        assert issubclass(getattr(aiomemo, name), aiomemo.MemoError)
