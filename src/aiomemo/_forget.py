"""``memo.forget()``: drop results from a memo and make later runs miss them too.

``forget(task)`` drops the task's entry; ``forget(func=f)`` drops every entry
of function ``f`` (a function, or its ``"module.qualname"``): this run's
results (:class:`ByFunc` keeps their keys per function, one list slot per
result) and the loaded ones (found by reading the loaded checkpoints' index
in a worker thread, values untouched). A tombstone (see
:mod:`aiomemo._records`) then goes through the drain to every store and is
flushed before ``forget`` returns, so a later run loading the same
checkpoints, another process, or a shared store misses them too. A task of
that key still running is not stopped: its result, recorded after the
tombstone, is a new result and stays.
"""

from __future__ import annotations

import asyncio
import difflib
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiomemo import _expiry
from aiomemo._checkpoint import keys_of_funcs
from aiomemo._exceptions import UnknownFunctionError
from aiomemo._naming import func_name
from aiomemo._records import Record, func_tombstone, key_tombstone

if TYPE_CHECKING:
    from aiomemo._memoizer import Memoizer

__all__ = ["ByFunc", "forget", "unknown_function"]


class ByFunc:
    """This run's result keys per function name (duplicates harmless)."""

    __slots__ = ("keys",)

    def __init__(self) -> None:
        self.keys: dict[str, list[str]] = {}

    def note(self, name: str, key: str) -> None:
        # one atomic step: engine threads note their results concurrently
        self.keys.setdefault(name, []).append(key)

    def pop(self, name: str) -> list[str]:
        return self.keys.pop(name, [])


def unknown_function(name: str, known: set[str], where: str) -> UnknownFunctionError:
    """``no records of mymod.sim; did you mean mymod.simulate?`` (or without the guess)."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if not close:  # "sim" for "mymod.simulate": compare the last part of dotted names too
        tails = {k.rsplit(".", 1)[-1]: k for k in known}
        hit = difflib.get_close_matches(name.rsplit(".", 1)[-1], sorted(tails), n=1, cutoff=0.6)
        close = [tails[hit[0]]] if hit else []
    guess = f"; did you mean {close[0]}?" if close else f" ({where})"
    return UnknownFunctionError(f"no records of {name}{guess}")


def _name_of(func: object) -> str:
    if isinstance(func, str):
        if not func.strip():
            raise ValueError("forget(func=...): the function name is empty")
        return func
    if not callable(func):
        raise TypeError(
            f"forget(func=...) takes a function or its 'module.qualname', not {type(func).__name__}"
        )
    return func_name(func)


async def forget(
    memo: Memoizer,
    task: Mapping[str, Any] | None,
    func: Callable[..., Any] | str | None,
) -> int:
    """See :meth:`aiomemo.Memoizer.forget`."""
    if (task is None) == (func is None):
        raise TypeError("forget() takes a task, or func=..., (exactly one of them)")
    await memo._ensure_started()
    table = memo._table
    when = _expiry.now()
    tomb: Record
    if task is not None:
        t = dict(task)
        key = await memo.make_hash(t)
        raw = bytes.fromhex(key)
        removed = int(table.remove(key, raw))
        tomb = key_tombstone(raw, func_name(t.get("func")), when)
    else:
        name = _name_of(func)
        keys = memo._by_func.pop(name)
        paths = [*memo._loaded_paths, *([os.fspath(memo.run_dir)] if memo.run_dir else [])]
        found, names = await asyncio.to_thread(keys_of_funcs, paths, {name})
        raws = {bytes.fromhex(k) for k in keys} | found[name]
        for sink in memo._drain.sinks:  # stores that hold records in memory (MemoryStore)
            held = getattr(sink.store, "records", None)
            if isinstance(held, Mapping):
                raws |= {k for k, r in held.items() if getattr(r, "func", None) == name}
        if not raws and name not in names:
            known = names | set(memo._by_func.keys)
            raise unknown_function(name, known, "in this memo or the checkpoints it loaded")
        removed = sum(table.remove(r.hex(), r) for r in raws)
        tomb = func_tombstone(name, when)
    memo._counters.forgotten += removed
    if memo.checkpoint_mode is not None or memo._drain.sinks:
        # durable before we return, in every store (a shared one too)
        memo._completion.queue(tomb, "forget:" + tomb.key.hex())
        await memo.checkpoint_queue()
    return removed
