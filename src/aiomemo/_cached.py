"""``memo.cached``: memoize a plain ``async def`` function, on the Memoizer's public calls only.

The wrapper plays the engine: ``check_memo``, run on a miss, then
``update_memo_result`` / ``update_memo_exception``. If the identical call it
followed is cancelled, it resubmits (one of the waiting callers leads).

A call that would wait for itself (``f(1)`` awaiting ``f(1)``, directly or
through ``f -> g -> f``, in the same task or in tasks it awaits) would hang
forever as its own follower. The calls each task leads are kept in a
context variable, which asyncio copies into the tasks it starts; following
one of them raises :class:`~aiomemo.MemoizerUsageError` instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from aiomemo._exceptions import LeaderCancelledError, MemoizerUsageError
from aiomemo._expiry import ttl_of
from aiomemo._hashing import IgnoreNames, check_ignore

if TYPE_CHECKING:
    from aiomemo._memoizer import Memoizer

__all__ = ["cached", "cached_or_decorator"]

P = ParamSpec("P")
R = TypeVar("R")

#: (id of the Memoizer, key, qualname) of every call led on this stack
_leading: contextvars.ContextVar[tuple[tuple[int, str, str], ...]] = contextvars.ContextVar(
    "aiomemo_leading", default=()
)


def _cycle_error(
    chain: tuple[tuple[int, str, str], ...], memo_id: int, key: str
) -> MemoizerUsageError:
    start = next(i for i, (m, k, _) in enumerate(chain) if m == memo_id and k == key)
    names = [name for _, _, name in chain[start:]] + [chain[start][2]]
    return MemoizerUsageError(
        f"{names[0]} awaits itself with the same arguments ({' -> '.join(names)}, "
        f"key {key[:12]}…): it would wait for its own result forever"
    )


def cached(
    memo: Memoizer,
    fn: Callable[P, Awaitable[R]],
    *,
    ignore: IgnoreNames,
    version: object,
    track_code: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> Callable[P, Awaitable[R]]:
    """The wrapper ``memo.cached(fn, ...)`` returns (see :meth:`Memoizer.cached`)."""
    if not asyncio.iscoroutinefunction(fn):
        raise TypeError(f"memo.cached needs an async def function, got {fn!r}")
    func = fn
    ignore_list = check_ignore(ignore)  # a bare str would be read letter by letter
    memo_id = id(memo)
    name = getattr(func, "__qualname__", repr(func))

    # the parts of a call's task that never change, built once: a call
    # copies them and adds its arguments (a fresh dict: check_memo writes to it)
    fixed: dict[str, Any] = {"func": func, "ignore_for_cache": ignore_list, "version": version}
    if track_code is not None:
        fixed["track_code"] = track_code
    if extra:
        fixed.update(extra)  # ttl, refresh: task fields

    def _task(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**fixed, "args": args, "kwargs": kwargs}

    async def _lead(task: dict[str, Any], args: Any, kwargs: Any) -> R:
        key = task.get("hashsum")
        token = None
        if isinstance(key, str):
            token = _leading.set((*_leading.get(), (memo_id, key, name)))
        try:
            result = await func(*args, **kwargs)
        except BaseException as exc:
            if not memo.closed:
                await memo.update_memo_exception(task, exc)
            raise
        finally:
            if token is not None:
                _leading.reset(token)
        if not memo.closed:
            await memo.update_memo_result(task, result)
        return result

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        task = {**fixed, "args": args, "kwargs": kwargs}  # _task, inline on the hot path
        while True:
            fut = await memo.check_memo(task)
            if fut is None:
                return await _lead(task, args, kwargs)
            if fut.done():  # a memoized outcome (a hit): no await, no chain check
                return fut.result()  # type: ignore[no-any-return]
            chain = _leading.get()  # following an identical call in flight
            if chain:
                key = task.get("hashsum")
                if any(m == memo_id and k == key for m, k, _ in chain):
                    fut.cancel()  # our own follower Future only: the leader goes on
                    raise _cycle_error(chain, memo_id, str(key))
            try:
                return await fut  # type: ignore[no-any-return]
            except LeaderCancelledError:
                continue  # the leader was cancelled: resubmit, one of us leads

    async def key(*args: P.args, **kwargs: P.kwargs) -> str:
        return await memo.make_hash(_task(args, kwargs))

    wrapper.key = key  # type: ignore[attr-defined]
    wrapper._aiomemo_func = func  # type: ignore[attr-defined]  # for ``aiomemo explain``
    return wrapper


def cached_or_decorator(
    memo: Memoizer,
    fn: Callable[P, Awaitable[R]] | None,
    *,
    ignore: IgnoreNames,
    version: object,
    track_code: bool | None,
    ttl: Any = None,
    refresh: bool = False,
) -> Any:
    """``memo.cached(fn, ...)``, or without ``fn`` the decorator ``memo.cached(...)`` is."""
    ignore = check_ignore(ignore)  # at once: a bare str would be read letter by letter
    extra: dict[str, Any] = {}  # task fields every call carries
    if ttl is not None:
        extra["ttl"] = ttl_of(ttl)
    if not isinstance(refresh, bool):
        raise TypeError(f"refresh must be True or False, not {refresh!r}")
    if refresh:
        extra["refresh"] = True
    opts: dict[str, Any] = {
        "ignore": ignore, "version": version, "track_code": track_code, "extra": extra
    }
    if fn is None:
        return lambda f: cached(memo, f, **opts)
    return cached(memo, fn, **opts)
