"""Parsl tasks as aiomemo keys them: the task's view, Parsl's id_for_memo bridge, key errors.

Part of :mod:`aiomemo.parsl` (which re-exports :class:`ParslUnhashableInputError`).
"""

from __future__ import annotations

import contextvars
import functools
import types
from typing import Any

import parsl.dataflow.memoization as _parsl_memoization
from parsl.dataflow.taskrecord import TaskRecord

from aiomemo import _hashing
from aiomemo._exceptions import UnhashableInputError

__all__ = [
    "KEY_HOOKS",
    "ParslUnhashableInputError",
    "hook_errors",
    "translate",
    "view_of",
]


class ParslUnhashableInputError(UnhashableInputError, ValueError):
    """An input that neither aiomemo nor Parsl's ``id_for_memo`` can key.

    Also a ``ValueError``, which is what Parsl's own memoizer raises for an
    unknown type, so code written against ``BasicMemoizer`` still catches it.
    """


# --------------------------------------------------------------------------
# keying through Parsl's id_for_memo registry
# --------------------------------------------------------------------------

_parsl_id_for_memo: Any = _parsl_memoization.id_for_memo

#: Parsl's own registrations (the default, str/int/float/None, list, tuple,
#: dict, functions): aiomemo keys these types itself, better (Parsl's raise
#: for subclasses of list/tuple/dict); only registrations made by users or
#: by other Parsl modules are bridged.
_PARSL_BUILTIN_IMPLS: frozenset[Any] = frozenset(
    _parsl_id_for_memo.dispatch(t)
    for t in (object, str, int, float, type(None), list, tuple, dict, types.FunctionType)
)

#: Errors raised by a Parsl registration while a key is being made, so that
#: the adapter can hand the task the very exception (as Parsl would) even if
#: hashing wrapped it. A list per check_memo call, shared across the threads
#: that hashing may use (contextvars are copied into them).
hook_errors: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar(
    "aiomemo_parsl_hook_errors", default=None
)


def _parsl_id_for_memo_hook(obj: object, output_ref: bool = False) -> object:
    """aiomemo fallback hook: key ``obj`` with Parsl's ``id_for_memo`` when Parsl has a registration.

    Returns Parsl's value (usually bytes) or :data:`aiomemo._hashing.NOT_HANDLED`.
    """
    impl = _parsl_id_for_memo.dispatch(type(obj))
    if impl in _PARSL_BUILTIN_IMPLS:
        return _hashing.NOT_HANDLED
    try:
        return impl(obj, output_ref=output_ref)
    except BaseException as exc:
        box = hook_errors.get()
        if box is not None:
            box.append(exc)
        raise


#: the key hooks of every ParslMemoizer (and of nothing else: importing this
#: module changes no other Memoizer's keys)
KEY_HOOKS: tuple[_hashing.KeyHook, ...] = (_parsl_id_for_memo_hook,)


# --------------------------------------------------------------------------
# the task as aiomemo sees it
# --------------------------------------------------------------------------

_BASH_VERSION_PREFIX = "parsl.bash_app:"


def _bash_app_version(func: object) -> str | None:
    """For a Parsl bash app, a ``version`` naming the user's function; else None.

    Parsl submits every bash app as the same wrapper
    (``functools.partial(remote_side_bash_executor, user_func)`` wrapped by
    ``wrap_error``), whose module and qualname are the same for all bash
    apps: aiomemo, which keys functions by module + qualname, would give two
    bash apps called with the same arguments the same key. The user's
    function goes into the task's ``version`` instead (the ``func`` itself is
    left alone so Parsl's own key, used for records imported from Parsl
    checkpoints, stays the same).
    """
    inner = getattr(func, "__wrapped__", None)
    if not isinstance(inner, functools.partial) or not inner.args:
        return None
    if getattr(inner.func, "__name__", None) != "remote_side_bash_executor":
        return None
    user = inner.args[0]
    mod = getattr(user, "__module__", None) or "?"
    qual = getattr(user, "__qualname__", None) or getattr(user, "__name__", None) or "?"
    return f"{_BASH_VERSION_PREFIX}{mod}.{qual}"


#: plain function -> its :func:`_bash_app_version` (the getattr that fails
#: for most apps costs more than this lookup; an app is called again and again)
_VERSIONS: dict[types.FunctionType, Any] = {}
_UNSEEN: Any = object()


def _ignore_names(ignore: Any) -> Any:
    return ignore if isinstance(ignore, str | bytes) else list(ignore or ())


def view_of(task: TaskRecord) -> dict[str, Any]:
    """The fields of a Parsl task record that make its key, as a plain dict."""
    t: Any = task
    view: dict[str, Any] = {
        "func": t["func"],
        "args": t.get("args", ()),
        "kwargs": t.get("kwargs") or {},
        # a bare str stays one, so that the key refuses it (not "l", "o", "g")
        "ignore_for_cache": _ignore_names(t.get("ignore_for_cache")),
        "memoize": t.get("memoize", True),
    }
    if "id" in t:
        view["id"] = t["id"]
    func = t["func"]
    if type(func) is types.FunctionType:  # compared by identity: a sound cache key
        version = _VERSIONS.get(func, _UNSEEN)
        if version is _UNSEEN:
            version = _bash_app_version(func)
            if len(_VERSIONS) < 4096:  # as aiomemo._hashing caches function identities
                _VERSIONS[func] = version
    else:
        version = _bash_app_version(func)
    if version is not None:
        view["version"] = version
    hashsum = t.get("hashsum")
    if isinstance(hashsum, str):
        view["hashsum"] = hashsum
    return view



def translate(exc: BaseException, errors: list[BaseException]) -> BaseException:
    """The error a task gets when its key cannot be made: Parsl's, where Parsl has one.

    An error raised by a Parsl ``id_for_memo`` registration reaches the task
    as itself (even if hashing wrapped it); an input nobody can key gives
    :class:`ParslUnhashableInputError`, a ValueError as with Parsl.
    """
    if errors and exc is not errors[0]:
        return errors[0]
    if isinstance(exc, UnhashableInputError) and not isinstance(exc, ValueError):
        err = ParslUnhashableInputError(str(exc), where=exc.where, type_name=exc.type_name)
        err.__cause__ = exc
        return err
    return exc
