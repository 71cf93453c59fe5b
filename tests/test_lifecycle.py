"""Lifecycle: start and close under races, event-loop binding, configuration checks."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import pathlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiomemo import Memoizer, MemoizerClosedError, MemoizerUsageError
from aiomemo._checkpoint import load_paths
from aiomemo._memoizer import MIN_PERIOD, parse_period
from helpers import (
    HeldElsewhereStore,
    SlowOpenStore,
    mk,
    run,
    spin,
    spin_until,
)


async def test_close_during_start_stays_closed(tmp_path: pathlib.Path) -> None:
    """A close() that lands while start() is still opening stores leaves the Memoizer closed."""
    store = SlowOpenStore()
    memo = Memoizer(run_dir=tmp_path, checkpoint_mode="dfk_exit", store=store)
    starting = asyncio.create_task(memo.start())
    await spin_until(lambda: store.opening)
    await memo.close()
    store.gate.set()
    with contextlib.suppress(MemoizerClosedError):
        await starting
    try:
        assert memo.closed
        with pytest.raises(MemoizerClosedError):
            await memo.check_memo(mk(1))
    finally:
        if not memo.closed:
            await memo.close()  # cleanup: the memo came back to life


async def test_close_does_not_wait_for_remote_followers(tmp_path: pathlib.Path) -> None:
    """close() fails local followers of a remote leader at once instead of waiting on them."""
    store = HeldElsewhereStore()
    memo = Memoizer(run_dir=tmp_path, store=store)
    await memo.start()
    follower = await memo.check_memo(mk(1))
    assert follower is not None
    await spin_until(lambda: store.waiting == 1)
    closing = asyncio.create_task(memo.close())
    await spin(200)
    try:
        assert closing.done()
    finally:
        await closing
        with pytest.raises(MemoizerClosedError):
            await follower


async def test_load_checkpoints_mapping_consistent_without_memoize(tmp_path: pathlib.Path) -> None:
    """The mapping from load_checkpoints can be read for every key it lists, even with memoize=False."""
    async with Memoizer(run_dir=tmp_path / "a", checkpoint_mode="dfk_exit") as memo:
        await run(memo, mk(1), "one")
    async with Memoizer(run_dir=tmp_path / "b", memoize=False) as memo:
        table = await memo.load_checkpoints([str(tmp_path / "a")])
        items = dict(table.items())
        assert len(items) == len(table)


# ---------------------------------------------------------------- one event loop per Memoizer


def test_a_second_asyncio_run_gets_a_clear_error(tmp_path: pathlib.Path) -> None:
    """Used from a second asyncio.run(), every call raises 'bound to another event loop'."""
    memo = Memoizer(run_dir=tmp_path)

    async def first() -> None:
        await memo.start()
        await run(memo, mk(1), 1)

    async def second() -> None:
        for call in (
            memo.check_memo(mk(1)),
            memo.update_memo_result(mk(2), 2),
            memo.update_memo_exception(mk(2), ValueError()),
            memo.checkpoint(),
            memo.start(),
        ):
            with pytest.raises(MemoizerUsageError, match="bound to another event loop"):
                await call
        await memo.close()

    asyncio.run(first())
    asyncio.run(second())
    assert memo.closed


def test_another_thread_gets_a_clear_error_and_close_is_delegated(tmp_path: pathlib.Path) -> None:
    """From another thread's loop: calls raise clearly; close() runs on the Memoizer's own loop."""
    errors: list[BaseException] = []
    closed_on: list[str] = []

    async def main() -> None:
        memo = Memoizer(run_dir=tmp_path, checkpoint_mode="dfk_exit")
        await memo.start()
        await run(memo, mk(1), "one")

        def other_thread() -> None:
            async def use() -> None:
                try:
                    await memo.check_memo(mk(1))
                except MemoizerUsageError as exc:
                    errors.append(exc)
                await memo.close()
                closed_on.append("done")

            asyncio.run(use())

        await asyncio.to_thread(other_thread)
        assert memo.closed

    asyncio.run(main())
    assert len(errors) == 1 and closed_on == ["done"]
    assert len(load_paths([tmp_path]).table) == 1  # the final checkpoint was made


@pytest.mark.parametrize("mode", ["periodic", "dfk_exit", "manual"])
def test_close_from_a_new_loop_keeps_every_accepted_record(
    tmp_path: pathlib.Path, mode: str
) -> None:
    """Records accepted under a loop that has ended are written by close() from a new loop."""
    memo = Memoizer(
        run_dir=tmp_path / "r",
        checkpoint_mode=mode,  # type: ignore[arg-type]
        checkpoint_period=3600 if mode == "periodic" else None,
    )

    async def first() -> None:
        await memo.start()
        for i in range(50):
            await run(memo, mk(i), i)

    asyncio.run(first())  # the drain task dies with this loop; 50 records wait
    asyncio.run(memo.close())
    table = load_paths([tmp_path / "r"]).table
    assert len(table) == 50


# ---------------------------------------------------------------- configuration is checked, strictly


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"memoize": "no"}, TypeError),
        ({"memoize": 0}, TypeError),
        ({"collapse": "yes"}, TypeError),
        ({"parsl_keys": 1}, TypeError),
        ({"explain": None}, TypeError),
        ({"max_pending": True}, TypeError),
        ({"max_pending": 1.5}, TypeError),
        ({"lease_ttl": "30"}, TypeError),
        ({"lease_ttl": float("inf")}, ValueError),
        ({"store": "redis://x"}, TypeError),
        ({"checkpoint_files": "runinfo"}, TypeError),
        ({"checkpoint_files": [3]}, TypeError),
        ({"key_hooks": [42]}, TypeError),
    ],
)
def test_bad_types_fail_at_construction(kwargs: dict[str, Any], error: type) -> None:
    """Flags are bools, counts ints, paths paths: anything else fails at once, saying which."""
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        Memoizer(**kwargs)


@pytest.mark.parametrize(
    ("period", "match"),
    [
        ("²:00:00", "HH:MM:SS"),
        ("٣:00:00", "HH:MM:SS"),
        ("00:00:1e3", "HH:MM:SS"),
        (1e-9, "shorter than 0.01"),
        ("00:00:00", "positive"),
        (dt.timedelta(microseconds=10), "shorter than 0.01"),
        (float("inf"), "finite"),
        (float("nan"), "positive"),
    ],
)
def test_bad_periods_say_what_is_wrong(period: Any, match: str) -> None:
    """Unicode digits, tiny or endless periods get a message naming checkpoint_period."""
    with pytest.raises(ValueError, match=match) as info:
        Memoizer(checkpoint_mode="periodic", checkpoint_period=period)
    assert "checkpoint_period" in str(info.value)


@given(st.text(max_size=12))
def test_any_period_text_parses_or_says_why(text: str) -> None:
    """Any string is a period of at least 0.01 s or a ValueError naming checkpoint_period."""
    try:
        seconds = parse_period(text)
    except ValueError as exc:
        assert "checkpoint_period" in str(exc)
    else:
        assert seconds >= MIN_PERIOD
        assert text.count(":") == 2


def test_shortest_period_is_accepted() -> None:
    """0.01 s is the lower bound and is accepted."""
    assert Memoizer(checkpoint_mode="periodic", checkpoint_period=0.01).checkpoint_period == 0.01


async def test_empty_checkpoint_dir_warns(tmp_path: pathlib.Path) -> None:
    """checkpoint_files naming a directory without checkpoints warns instead of loading nothing silently."""
    (tmp_path / "empty").mkdir()
    memo = Memoizer(checkpoint_files=[tmp_path / "empty"], run_dir=tmp_path / "r")
    with pytest.warns(RuntimeWarning, match=r"checkpoint_files\[0\].*holds no checkpoints"):
        await memo.start()
    await memo.close()


async def test_load_warnings_point_at_the_callers_line(tmp_path: pathlib.Path) -> None:
    """A loading warning names the user's line: start(), async with, load_checkpoints()."""
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad" / "checkpoint"
    bad.mkdir(parents=True)
    (bad / "seg-20200101T000000.000000Z-1-00000000.amlog").write_bytes(b"not a segment" * 4)
    memo = Memoizer(checkpoint_files=[tmp_path / "empty"], run_dir=tmp_path / "r1")
    with pytest.warns(RuntimeWarning) as started:
        await memo.start()
    with pytest.warns(RuntimeWarning) as loaded:
        await memo.load_checkpoints([bad])
    await memo.close()
    with pytest.warns(RuntimeWarning) as entered:
        async with Memoizer(checkpoint_files=[tmp_path / "empty"], run_dir=tmp_path / "r2"):
            pass
    for record in (*started, *loaded, *entered):
        assert record.filename == __file__, (record.filename, str(record.message))
