"""How aiomemo names a task's function in records: ``"module.qualname"``.

One rule for the whole package (the Memoizer writing records, ``explain``
matching them, the CLI showing them); it imports nothing of aiomemo's.
"""

from __future__ import annotations

__all__ = ["func_name"]


def func_name(func: object) -> str:
    """``"module.qualname"`` of ``func``; a string is taken as already a name.

    Missing attributes read as ``"?"`` (a callable object without
    ``__qualname__``, say), so this never raises.
    """
    if isinstance(func, str):
        return func
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
