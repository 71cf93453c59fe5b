"""``aiomemo demo``: a small async workflow run twice against one runinfo directory.

The workflow is a DAG of a few hundred tasks: ``fetch(i)`` (sources, some
fetched by several pipelines), ``clean(xs)``, ``score(xs, weight=w)`` and one
``report(scores)`` that joins them all. Each task simulates work with an
``asyncio.sleep`` of a few milliseconds on a pool of a few "workers" (an
``asyncio.Semaphore``). Several pipelines share a source and a few are
submitted twice at once, so duplicates show up as collapsed calls (an
identical task was still running: the caller waits for it instead of running
it again); a second pass re-checks some pipelines, which shows up as hits
(an identical task already finished).

Run 1 computes everything; its Memoizer (``checkpoint_mode="periodic"``)
writes checkpoints on a short timer while the workflow runs, and the rest at
close. Run 2 uses a new Memoizer on the same runinfo directory: it loads run
1's checkpoints and finishes from the memo without running a task.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiomemo._explain import explain
from aiomemo._memoizer import Memoizer
from aiomemo._rundir import get_all_checkpoints

__all__ = ["format_report", "run_demo"]

# The simulated worker pool and per-task cost of the run in progress.
_pool: contextvars.ContextVar[asyncio.Semaphore] = contextvars.ContextVar("aiomemo_demo_pool")
_cost: contextvars.ContextVar[float] = contextvars.ContextVar("aiomemo_demo_cost", default=0.005)
_ran: contextvars.ContextVar[list[str]] = contextvars.ContextVar("aiomemo_demo_ran")


async def _work(seed: int) -> None:
    """Hold a worker for a few ms (deterministic jitter, so runs are comparable)."""
    _ran.get().append("x")
    base = _cost.get()
    async with _pool.get():
        await asyncio.sleep(base * (0.5 + (seed * 37 % 11) / 10))


def _source(i: int) -> list[int]:
    return [(i * 7919 + k * 104729) % 1000 for k in range(16)]


def _clean(xs: list[int]) -> list[int]:
    return sorted(x for x in xs if x % 3)


async def fetch(i: int) -> list[int]:
    """A source: 16 pseudo-random numbers derived from ``i``."""
    await _work(i)
    return _source(i)


async def clean(xs: list[int]) -> list[int]:
    """Drop multiples of 3 and sort."""
    await _work(sum(xs))
    return _clean(xs)


async def score(xs: list[int], *, weight: int) -> float:
    """A weighted mean."""
    await _work(sum(xs) + weight)
    return round(weight * sum(xs) / max(1, len(xs)), 6)


async def report(scores: list[float]) -> dict[str, float]:
    """The join: summary numbers over every pipeline's score."""
    await _work(len(scores))
    return {"n": len(scores), "total": round(sum(scores), 6), "max": max(scores, default=0.0)}


async def _one_run(directory: str, pipelines: int, sources: int, period: float) -> dict[str, Any]:
    counted = 0
    t0 = time.perf_counter()
    memo = Memoizer(checkpoint_mode="periodic", checkpoint_period=period, config_run_dir=directory)
    async with memo:
        c_fetch = memo.cached(fetch)
        c_clean = memo.cached(clean)
        c_score = memo.cached(score)
        c_report = memo.cached(report)

        async def pipeline(p: int) -> float:
            nonlocal counted
            counted += 3
            xs = await c_fetch(p % sources)
            ys = await c_clean(xs)
            return await c_score(ys, weight=p % 3 + 1)

        # every 8th pipeline is submitted twice at once: the twin collapses onto it
        order = [p for p in range(pipelines) for _ in range(2 if p % 8 == 0 else 1)]
        scores = await asyncio.gather(*(pipeline(p) for p in order))
        # a second pass re-checks every 4th pipeline: identical tasks, all hits
        await asyncio.gather(*(pipeline(p) for p in range(0, pipelines, 4)))
        counted += 1
        summary = await c_report(list(scores))
        on_timer = memo.stats().checkpointed
    seconds = time.perf_counter() - t0
    st = memo.stats()
    run_dir = memo.run_dir
    return {
        "run": run_dir.name if run_dir is not None else "?",
        "run_dir": os.fspath(run_dir) if run_dir is not None else None,
        "tasks": counted,
        "hits": st.hits,
        "misses": st.misses,
        "collapsed": st.collapsed,
        "checkpointed": st.checkpointed,
        "checkpointed_on_timer": on_timer,
        "seconds": round(seconds, 3),
        "summary": summary,
    }


async def run_demo(
    directory: str | os.PathLike[str],
    tasks: int = 300,
    *,
    period: float = 0.2,
    workers: int = 4,
    cost: float = 0.02,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the demo workflow twice against the runinfo directory ``directory``.

    Args:
        directory: the runinfo root (``config_run_dir``); run dirs ``000``,
            ``001``... are created in it. Earlier runs there are loaded too.
        tasks: about how many task calls each run makes (at least 4).
        period: ``checkpoint_period`` in seconds (``'periodic'`` mode).
        workers: how many tasks run at once (the simulated worker pool).
        cost: mean simulated work per task, in seconds.
        on_run: called with each run's row as soon as the run ends.

    Returns:
        ``{"directory", "checkpoint_period", "runs": [row, row],
        "same_result", "explain"}``; each row has ``run`` (its run dir name),
        ``tasks``, ``hits``, ``misses``, ``collapsed``, ``checkpointed``
        (records written, of which ``checkpointed_on_timer`` before close),
        ``executed`` (task bodies that really ran) and ``seconds``.
        ``explain`` is what :func:`aiomemo._explain.explain` says about a
        call whose keyword argument changed.
    """
    if tasks < 4:
        raise ValueError(f"tasks must be at least 4, not {tasks}")
    directory = os.fspath(directory)
    # 3 calls per pipeline; 1 in 8 submitted twice, 1 in 4 re-checked: ~4.1 calls each
    pipelines = max(1, (tasks - 1) * 8 // 33)
    sources = max(1, pipelines * 2 // 5)
    rows: list[dict[str, Any]] = []
    for _ in range(2):
        ran: list[str] = []
        ctx = contextvars.copy_context()
        ctx.run(_pool.set, asyncio.Semaphore(workers))
        ctx.run(_cost.set, cost)
        ctx.run(_ran.set, ran)
        row = await asyncio.create_task(
            _one_run(directory, pipelines, sources, period), context=ctx
        )
        row["executed"] = len(ran)
        rows.append(row)
        if on_run is not None:
            on_run(row)
    # What would explain say about score() called with a weight no run used?
    probe = {"func": score, "args": (_clean(_source(0)),), "kwargs": {"weight": 7}}
    paths = await asyncio.to_thread(get_all_checkpoints, directory)
    why = await asyncio.to_thread(explain, probe, paths)
    return {
        "directory": directory,
        "checkpoint_period": period,
        "runs": rows,
        "same_result": rows[0]["summary"] == rows[1]["summary"],
        "explain": str(why),
    }


def format_report(result: dict[str, Any]) -> str:
    """The demo's result as a short table plus a few lines of commentary."""
    cols = ("run", "tasks", "hits", "misses", "collapsed", "checkpointed", "seconds")
    rows: Sequence[dict[str, Any]] = result["runs"]
    cells = [[str(r[c]) if c != "seconds" else f"{r[c]:.2f}" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    first, last = rows[0], rows[-1]
    lines.append("")
    lines.append(
        f"run {first['run']} ran {first['executed']} task bodies and checkpointed "
        f"{first['checkpointed_on_timer']} records on the {result['checkpoint_period']:g} s "
        f"timer, {first['checkpointed'] - first['checkpointed_on_timer']} at close"
    )
    lines.append(
        f"run {last['run']} ran {last['executed']} task bodies: "
        f"{last['hits']} of {last['tasks']} calls came from the checkpoints"
        + (" (same result)" if result["same_result"] else " (RESULTS DIFFER)")
    )
    lines.append(f"explain score(..., weight=7): {result['explain']}")
    return "\n".join(lines)
