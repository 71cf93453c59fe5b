"""The public surface: every name in __all__ exists and nothing private leaks."""

from __future__ import annotations

import pytest

import aiomemo
import aiomemo.stores
import aiomemo.testing


def test_all_names_exist() -> None:
    """Every name in aiomemo.__all__ and aiomemo.stores.__all__ resolves."""
    for mod in (aiomemo, aiomemo.stores, aiomemo.testing):
        for name in mod.__all__:
            assert getattr(mod, name) is not None, name


def test_public_names_are_listed() -> None:
    """Public attributes of aiomemo are exactly __all__ (plus dunders and submodules)."""
    public = {
        n
        for n in dir(aiomemo)
        if not n.startswith("_") and n not in {"stores", "parsl", "testing", "annotations"}
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


def test_user_visible_errors_are_in_the_tree() -> None:
    """Codec, path and maintenance errors derive from MemoError and keep their built-in bases."""
    from aiomemo import _codec, _explain, _paths

    for name, extra in [
        ("CodecError", ValueError),
        ("UnencodableResultError", TypeError),
        ("CheckpointPathError", ValueError),
    ]:
        cls = getattr(aiomemo, name)
        assert issubclass(cls, aiomemo.MemoError) and issubclass(cls, extra), name
    assert issubclass(aiomemo.CheckpointPathError, aiomemo.CheckpointError)
    assert issubclass(aiomemo.MaintenanceError, aiomemo.MemoError)
    # one class each, wherever it is imported from
    assert _codec.CodecError is aiomemo.CodecError
    assert _codec.UnencodableResultError is aiomemo.UnencodableResultError
    assert _explain.CheckpointPathError is _paths.CheckpointPathError is aiomemo.CheckpointPathError


def test_every_exception_class_in_the_package_is_in_the_tree() -> None:
    """No public exception class of aiomemo's modules stands outside MemoError."""
    import importlib
    import importlib.util
    import pkgutil

    skip = {"aiomemo.__main__"}
    if importlib.util.find_spec("parsl") is None:
        skip.add("aiomemo.parsl")  # the parsl extra is not installed
    no_redis = importlib.util.find_spec("redis") is None
    seen = []
    for info in pkgutil.walk_packages(aiomemo.__path__, "aiomemo."):
        if info.name in skip or (no_redis and "._redis" in info.name):
            continue
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__.startswith("aiomemo")
                and not obj.__name__.startswith("_")
            ):
                seen.append(obj)
                assert issubclass(obj, aiomemo.MemoError), obj
    assert aiomemo.CodecError in seen
    if "aiomemo.parsl" not in skip:
        assert importlib.import_module("aiomemo.parsl").ParslConfigurationError in seen


def test_parsl_errors_keep_parsl_and_builtin_bases() -> None:
    """ParslMemoizer's errors are MemoErrors and what Parsl's own code catches."""
    pytest.importorskip("parsl")
    from parsl.errors import ConfigurationError

    from aiomemo.parsl import ParslConfigurationError, ParslUnhashableInputError

    assert issubclass(ParslConfigurationError, aiomemo.MemoError)
    assert issubclass(ParslConfigurationError, ConfigurationError)
    assert issubclass(ParslConfigurationError, ValueError)
    assert issubclass(ParslUnhashableInputError, aiomemo.UnhashableInputError)
    assert issubclass(ParslUnhashableInputError, ValueError)
