"""OpenTelemetry metrics of every Memoizer in the process (``aiomemo[otel]``).

Meter ``"aiomemo"``; instruments (names and units per OpenTelemetry's
conventions, totals over every Memoizer of the process, no attributes unless
stated):

=================================  ===================  ===========  =====================
name                               kind                 unit         what
=================================  ===================  ===========  =====================
``aiomemo.hits``                   observable counter   ``{hit}``    lookups answered from the memo
``aiomemo.misses``                 observable counter   ``{miss}``   lookups that found nothing
``aiomemo.collapsed``              observable counter   ``{call}``   calls that joined an identical task in flight
``aiomemo.remote_hits``            observable counter   ``{hit}``    hits answered by a shared store
``aiomemo.store.errors``           observable counter   ``{error}``  failed shared-store lookups/publishes
``aiomemo.checkpoint.errors``      observable counter   ``{error}``  failed checkpoint writes (retried)
``aiomemo.checkpoint.records``     observable counter   ``{record}`` records written to the first store
``aiomemo.load.records``           observable counter   ``{record}`` records loaded from checkpoints
``aiomemo.load.errors``            observable counter   ``{error}``  damaged records / problems found loading
``aiomemo.expired``                observable counter   ``{entry}``  entries dropped because they expired
``aiomemo.forgotten``              observable counter   ``{entry}``  entries dropped by forget() or tombstones
``aiomemo.checkpoint.duration``    histogram            ``s``        one store write (``put_many``: write + fsync)
``aiomemo.checkpoint.size``        histogram            ``By``       encoded bytes of the records in that write
``aiomemo.load.duration``          histogram            ``s``        one load (at start, ``load_checkpoints``)
=================================  ===================  ===========  =====================

The two checkpoint histograms carry ``aiomemo.store`` (the store's class
name, e.g. ``LogStore``).

The counters cost nothing on the hit path: the Memoizer's parts already
count in :class:`~aiomemo._counters.Counters`, and the observable counters
read those when a reader collects (a Memoizer that is garbage collected
leaves its counts in the process totals, so they never go down). The
histograms are recorded once per store write and per load.

Without ``opentelemetry-api`` installed nothing here imports it and every
call returns at once; with the API but no SDK configured, the API's own
no-op (proxy) instruments take the calls, and they start reporting as soon
as the application sets a ``MeterProvider``.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

from aiomemo._counters import Counters
from aiomemo._records import Record

__all__ = ["COUNTERS", "active", "attach", "record_load", "record_write"]

#: (instrument name, Counters field, unit, description) of each observable counter
COUNTERS: tuple[tuple[str, str, str, str], ...] = (
    ("aiomemo.hits", "hits", "{hit}", "Lookups answered from the memo (memory, disk or a shared store)"),
    ("aiomemo.misses", "misses", "{miss}", "Lookups that found no result: the task must run"),
    ("aiomemo.collapsed", "collapsed", "{call}", "Calls that waited on an identical task in flight instead of running it"),
    ("aiomemo.remote_hits", "remote_hits", "{hit}", "Hits answered by a shared store (a result of another process)"),
    ("aiomemo.store.errors", "store_errors", "{error}", "Shared-store lookups or publishes that failed"),
    ("aiomemo.checkpoint.errors", "write_errors", "{error}", "Checkpoint writes that failed (their records stay queued and are retried)"),
    ("aiomemo.checkpoint.records", "checkpointed", "{record}", "Records written to the checkpoint (the first store)"),
    ("aiomemo.load.records", "records_loaded", "{record}", "Records loaded from checkpoints"),
    ("aiomemo.load.errors", "load_errors", "{error}", "Damaged records and other problems found while loading"),
    ("aiomemo.expired", "expired", "{entry}", "Entries dropped because they expired (at load or on a lookup)"),
    ("aiomemo.forgotten", "forgotten", "{entry}", "Entries dropped by forget() or by tombstones at load"),
)  # fmt: skip

_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # fmt: skip
_BYTES_BUCKETS = tuple(float(1 << s) for s in range(8, 34, 2))  # 256 B .. 4 GiB

_INT_FIELDS = frozenset(f.name for f in fields(Counters) if f.type in ("int", int))


class _Instruments:
    """The meter's instruments and the counters they observe."""

    def __init__(self, meter: Any, observation: Callable[[int], Any]) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, Counters] = {}  # a number per owner -> its counters
        self.retired = dict.fromkeys(_INT_FIELDS, 0)
        # owners gone: a finalizer only appends here (it may run inside a
        # callback that holds the lock), the next collection folds them in
        self.dead: list[int] = []
        self.numbers = itertools.count()
        self._observation = observation
        for name, attr, unit, desc in COUNTERS:
            meter.create_observable_counter(
                name, callbacks=[self._callback(attr)], unit=unit, description=desc
            )
        self.write_duration = _histogram(
            meter, "aiomemo.checkpoint.duration", "s",
            "Time one checkpoint write to a store took (write and fsync)", _SECONDS_BUCKETS,
        )  # fmt: skip
        self.write_size = _histogram(
            meter, "aiomemo.checkpoint.size", "By",
            "Encoded bytes of the records in one checkpoint write", _BYTES_BUCKETS,
        )  # fmt: skip
        self.load_duration = _histogram(
            meter, "aiomemo.load.duration", "s",
            "Time one load of checkpoints took", _SECONDS_BUCKETS,
        )  # fmt: skip

    def _callback(self, attr: str) -> Callable[[Any], Iterable[Any]]:
        def observe(_options: Any) -> Iterable[Any]:
            with self.lock:
                self._fold()
                total = self.retired[attr] + sum(getattr(c, attr) for c in self.live.values())
            return [self._observation(total)]

        return observe

    def add(self, counters: Counters) -> int:
        with self.lock:
            self._fold()
            key = next(self.numbers)
            self.live[key] = counters
        return key

    def _fold(self) -> None:
        while self.dead:
            c = self.live.pop(self.dead.pop(), None)
            if c is not None:
                for name in _INT_FIELDS:
                    self.retired[name] += getattr(c, name)


def _histogram(meter: Any, name: str, unit: str, desc: str, buckets: Sequence[float]) -> Any:
    try:
        return meter.create_histogram(
            name, unit=unit, description=desc, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:  # an API older than 1.23 has no bucket advice
        return meter.create_histogram(name, unit=unit, description=desc)


_lock = threading.Lock()
_instruments: _Instruments | None = None
_tried = False


def _get() -> _Instruments | None:
    """The instruments, made on first use; None when opentelemetry-api is missing."""
    global _instruments, _tried
    if _tried:
        return _instruments
    with _lock:
        if not _tried:
            try:
                from opentelemetry import metrics
            except ImportError:
                pass
            else:
                from aiomemo import __version__

                meter = metrics.get_meter("aiomemo", __version__)
                _instruments = _Instruments(meter, metrics.Observation)
            _tried = True
    return _instruments


def attach(owner: object, counters: Counters) -> None:
    """Report ``counters`` in the process totals while ``owner`` lives (then keep them)."""
    ins = _get()
    if ins is None:
        return
    weakref.finalize(owner, ins.dead.append, ins.add(counters))


def active() -> bool:
    """True once instruments exist (cheap: the drain asks before timing a write)."""
    return _instruments is not None


def record_write(store: object, seconds: float, records: Sequence[Record]) -> None:
    """One store write of ``records`` took ``seconds``."""
    ins = _instruments
    if ins is None:
        return
    nbytes = sum(len(r.key) + len(r.value) + len(r.func) + len(r.digests) for r in records)
    attrs = {"aiomemo.store": type(store).__name__}
    ins.write_duration.record(seconds, attrs)
    ins.write_size.record(nbytes, attrs)


def record_load(seconds: float) -> None:
    """One load of checkpoints took ``seconds``."""
    ins = _instruments
    if ins is not None:
        ins.load_duration.record(seconds)
