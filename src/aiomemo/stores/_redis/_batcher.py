"""The batcher: one pipelined round trip for the operations of an event-loop iteration.

Every RedisStore operation is a list of commands queued here; the queue is
sent in pipelines of up to ``batch_size`` operations, at most
``max_connections`` of them in flight, and each operation's future gets the
replies of its own commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aiomemo._exceptions import StoreError
from aiomemo.stores._redis._config import ERRORS
from aiomemo.stores._redis._lease import SCRIPTS, SHA
from aiomemo.stores._redis._values import key_list

if TYPE_CHECKING:
    from aiomemo.stores._redis._store import RedisStore

__all__ = ["PIPELINE_BYTES", "Batcher", "Cmd", "cmd_bytes"]

# One command of a batched operation: ("GET", key), ("PTTL", key), ("SET", ...),
# or ("script", name, keys, args).
Cmd = tuple[Any, ...]

#: The most bytes one pipelined round trip carries, of arguments and of the
#: replies its lookups are expected to bring back; operations beyond it go in
#: the next one (an operation bigger than this goes alone).
#: redis-py gives the whole write of a pipeline ``socket_timeout``: a batch of
#: large values written as one pipeline could time out every time it was
#: retried (a server fsyncing its AOF after each write takes ~50 MB slowly),
#: and its records would never be written. Replies likewise: the server
#: copies every reply of a pipeline into its output buffer before it sends
#: the first one, so the first reply of 64 GETs of 4 MB values took 130 ms
#: on a quiet machine and over 300 ms on a loaded one (past a 0.3 s timeout,
#: and every retry of it the same). 1 MiB takes a few ms on loopback.
PIPELINE_BYTES = 1 << 20

#: A value this large, written or read by a store, makes its lookups go as one
#: GET each instead of one MGET: redis-py reads an MGET's reply as one response
#: within ``socket_timeout``, and 100 lookups of 4 MB values (400 MB) took more
#: than 2 s on loopback, so every batch of them failed; GET replies are read
#: one at a time, each within it.
LARGE_REPLY = 64 << 10

#: How long the namespace's size hint (see Batcher._set_hint) lives: a store that
#: writes large values sets it again when it is older than half this.
HINT_TTL = 24 * 3600.0


def cmd_bytes(cmds: Sequence[Cmd]) -> int:
    """The bytes of the arguments of ``cmds`` (what makes a pipeline long to send)."""
    n = 0
    for cmd in cmds:
        name = cmd[0]
        if name == "GET" or name == "PTTL":  # a key alone: small
            continue
        args = cmd[3] if name == "script" else cmd
        for a in args:
            if type(a) is bytes:
                n += len(a)
    return n


class _Op:
    """One queued operation: its commands, the future of their replies, the keys to announce."""

    __slots__ = ("cmds", "fut", "nbytes", "on_orphan", "wake", "weight")

    def __init__(
        self,
        cmds: list[Cmd],
        fut: asyncio.Future[list[Any]],
        wake: Sequence[bytes],
        on_orphan: Callable[[list[Any]], None] | None,
        weight: int = 1,
        nbytes: int | None = None,
    ) -> None:
        self.cmds = cmds
        self.fut = fut
        self.wake = wake
        self.on_orphan = on_orphan
        self.weight = weight  # operations it counts for in a batch (bulk ops: their records)
        # bytes it adds to a pipeline (see PIPELINE_BYTES)
        self.nbytes = cmd_bytes(cmds) if nbytes is None else nbytes


class Batcher:
    """The queue of a store's operations, and the round trips that carry them.

    It uses the store's client, loop check and error accounting; it owns the
    queue, the in-flight count and the flush tasks.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._own_loop = store._own_loop
        self._counts = store._counts
        self._batch_size = store.batch_size
        self._max_connections = store.max_connections
        self._cluster = store.cluster
        self._channel = store.channel
        self._queue: deque[_Op] = deque()
        self._kick_scheduled = False
        #: lookups of one batch go as one MGET (until values turn out large)
        self.mget = not self._cluster
        #: the bytes one GET is expected to bring back, once values turn out
        #: large (0: small); it counts toward PIPELINE_BYTES like arguments
        self.get_bytes = 0
        self._hinted = -math.inf  # when this store last set the namespace's size hint
        self._in_flight = 0
        #: the flushes under way, each with the operations it carries
        self._flushes: dict[asyncio.Task[None], list[_Op]] = {}
        self._bg: set[asyncio.Future[Any]] = set()

    def take_tasks(self) -> list[asyncio.Task[None]]:
        """The flushes and background tasks under way (for aclose to cancel)."""
        return [*self._flushes, *(f for f in self._bg if isinstance(f, asyncio.Task))]

    def fail_queued(self, err: StoreError) -> None:
        """Fail every operation still queued with ``err``."""
        while self._queue:
            op = self._queue.popleft()
            if not op.fut.done():
                op.fut.set_exception(err)

    def reset(self) -> None:
        """Forget the queue and the flushes (after aclose)."""
        self._queue.clear()
        self._flushes.clear()
        self._in_flight = 0
        self._kick_scheduled = False

    def submit(
        self,
        cmds: list[Cmd],
        *,
        wake: bytes | Sequence[bytes] = (),
        on_orphan: Callable[[list[Any]], None] | None = None,
        urgent: bool = False,
        weight: int = 1,
        nbytes: int | None = None,
    ) -> asyncio.Future[list[Any]]:
        """Queue one operation; it goes out with the others of this loop iteration.

        ``urgent`` (lease renewals) jumps the queue: a deep backlog of lookups
        must not let a live holder's lease expire. ``nbytes``: ``cmd_bytes(cmds)``
        when the caller has it already.
        """
        loop = self._own_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        op = _Op(cmds, fut, (wake,) if isinstance(wake, bytes) else wake, on_orphan, weight, nbytes)
        if op.nbytes >= LARGE_REPLY and op.nbytes >= LARGE_REPLY * op.weight:
            self._large(op.nbytes // op.weight)  # values of this size are read back too
            self._set_hint(loop)
        if urgent:
            self._queue.appendleft(op)
        else:
            self._queue.append(op)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return fut

    async def get_blobs(self, keys: Sequence[bytes]) -> list[Any]:
        """Each key's GET reply (``[blob]``), or the error of its round trip.

        One MGET operation per ``batch_size`` keys; in a cluster (keys in many
        slots) one GET per key, batched all the same.
        """
        value_key = self._store.value_key
        if not self.mget:  # a cluster, or large values
            return await self._get_each(keys)
        size = self._batch_size
        chunks = [keys[i : i + size] for i in range(0, len(keys), size)]
        futs = [self.submit([("MGET", *(value_key(k) for k in c))], weight=len(c)) for c in chunks]
        replies: list[Any] = []
        for c, got in zip(chunks, await asyncio.gather(*futs, return_exceptions=True), strict=True):
            if isinstance(got, BaseException):
                # a reply too large to read in time turns MGET off: one GET each
                replies += await self._get_each(c) if not self.mget else [got] * len(c)
            else:
                values = got[0]
                self._saw_values(values)
                replies += [[v] for v in values]
        return replies

    async def _get_each(self, keys: Sequence[bytes]) -> list[Any]:
        value_key = self._store.value_key
        futs = [self.submit([("GET", value_key(k))]) for k in keys]
        each: list[Any] = await asyncio.gather(*futs, return_exceptions=True)
        return each

    def _saw_values(self, values: list[Any]) -> None:
        """An MGET's reply: if its values are large, lookups go one GET each from now on."""
        if self.mget:
            size = sum(len(v) for v in values if v is not None)
            if size > PIPELINE_BYTES and size >= LARGE_REPLY * len(values):
                self._large(size // len(values))

    def _saw_gets(self, cmds: Iterable[Cmd], replies: Iterable[Any]) -> None:
        """A round trip's replies: what its GETs brought tells what the next ones will."""
        got = count = 0
        for cmd, v in zip(cmds, replies, strict=False):  # (replies may go on: a PUBLISH)
            if cmd[0] == "GET" and type(v) is bytes:
                got += len(v)
                count += 1
        if count and (self.get_bytes or got >= LARGE_REPLY * count):
            self._expect(got // count)

    def _large(self, size: int) -> None:
        """Values of ``size`` bytes are about: lookups go one GET each, counted at that size."""
        self.mget = False
        self._expect(size)

    def _set_hint(self, loop: asyncio.AbstractEventLoop) -> None:
        """Tell the stores that open later that this namespace holds large values.

        One small key (``hint_key``, the size of the values, expiring after
        ``HINT_TTL``): a store that opens reads it and looks keys up one GET
        each from its first lookup, instead of finding out by an MGET too
        large to read in time (one ``socket_timeout`` lost, and on a loaded
        machine its lookups re-sent as GETs behind a server still busy with
        that reply could time out too).
        """
        now = loop.time()
        if now - self._hinted < HINT_TTL / 2:
            return
        self._hinted = now
        store = self._store
        size = str(self.get_bytes).encode()

        async def set_hint() -> None:
            # not batched: a user whose ACL does not cover the key goes
            # without it, with no error counted against the store
            client = store._client
            if client is not None and not store._closed:
                with contextlib.suppress(*ERRORS):
                    await client.set(store.hint_key, size, px=int(HINT_TTL * 1000))

        self.background(asyncio.ensure_future(set_hint()))

    def take_hint(self, size: int) -> None:
        """The namespace's size hint, read when the store opened: values of ``size`` bytes."""
        if size >= LARGE_REPLY:
            self._large(size)

    def _expect(self, size: int) -> None:
        """GET replies of ``size`` bytes each were seen: what the next ones are expected to bring.

        A larger size counts at once (a pipeline of large replies is what
        must not happen); a smaller one brings the estimate down by halves.
        """
        cur = self.get_bytes
        self.get_bytes = size if size >= cur else (cur + size) // 2

    def _kick(self) -> None:
        self._kick_scheduled = False
        while self._queue and self._in_flight < self._max_connections and not self._store._closed:
            ops: list[_Op] = []
            weight = nbytes = 0
            queue = self._queue
            get_bytes = self.get_bytes  # (a lookup queued before it was known counts it too)
            while queue:
                op = queue[0]
                if get_bytes and op.nbytes < get_bytes:
                    gets = sum(1 for cmd in op.cmds if cmd[0] == "GET")
                    if gets:
                        op.nbytes = get_bytes * gets
                if ops and (
                    weight + op.weight > self._batch_size or nbytes + op.nbytes > PIPELINE_BYTES
                ):
                    break
                queue.popleft()
                ops.append(op)
                weight += op.weight
                nbytes += op.nbytes
            self._in_flight += 1
            if self._in_flight > self._counts["in_flight_max"]:
                self._counts["in_flight_max"] = self._in_flight
            task = asyncio.ensure_future(self._flush(ops))
            self._flushes[task] = ops
            task.add_done_callback(self._flush_done)

    def _fill(self, pipe: Any, cmds: Iterable[Cmd], *, use_eval: bool) -> None:
        for cmd in cmds:
            if cmd[0] == "script":
                _, name, keys, args = cmd
                if use_eval:
                    pipe.execute_command("EVAL", SCRIPTS[name], len(keys), *keys, *args)
                else:
                    pipe.execute_command("EVALSHA", SHA[name], len(keys), *keys, *args)
            else:
                pipe.execute_command(*cmd)

    async def _send(
        self, ops: Sequence[_Op], gets: list[int], *, use_eval: bool
    ) -> list[list[Any]]:
        """One round trip for ``ops`` (one server): the replies of each op's commands, in order.

        ``gets``: the lookups among them that go as one MGET (see _mget_ops).
        """
        client = self._store._client
        pipe = client.pipeline(transaction=False)
        # plain lookups go as one MGET: far less client work than N GETs
        # (a cluster cannot: its keys are in many slots)
        if gets:
            pipe.execute_command("MGET", *(ops[i].cmds[0][1] for i in gets))
        in_mget = set(gets)
        rest = [i for i in range(len(ops)) if i not in in_mget]
        rest_cmds = [cmd for i in rest for cmd in ops[i].cmds]
        self._fill(pipe, rest_cmds, use_eval=use_eval)
        wake = [k for op in ops for k in op.wake]
        if wake:
            # same connection, after the writes: a woken waiter sees them
            pipe.execute_command("PUBLISH", self._channel, key_list(b"p", wake))
        self._counts["round_trips"] += 1
        results: list[Any] = await pipe.execute(raise_on_error=False)
        out: list[list[Any]] = [[] for _ in ops]
        pos = 0
        if gets:
            values = results[0]
            pos = 1
            for j, i in enumerate(gets):
                out[i] = [values if isinstance(values, Exception) else values[j]]
            if not isinstance(values, Exception):
                self._saw_values(values)
        if rest_cmds:
            self._saw_gets(rest_cmds, itertools.islice(results, pos, None))
        for i in rest:
            n = len(ops[i].cmds)
            out[i] = results[pos : pos + n]
            pos += n
        return out

    def _mget_ops(self, ops: Sequence[_Op]) -> list[int]:
        """The lookups among ``ops`` that go as one MGET (none: fewer than two, or no MGET)."""
        if not self.mget:
            return []
        gets = [i for i, op in enumerate(ops) if len(op.cmds) == 1 and op.cmds[0][0] == "GET"]
        return gets if len(gets) > 1 else []

    async def _round_trip(self, ops: list[_Op], *, use_eval: bool) -> list[_Op]:
        """Send ``ops`` and settle them; return those that met NOSCRIPT (only without EVAL)."""
        if self._cluster:
            return await self._cluster_round_trip(ops, use_eval=use_eval)
        merged = self._mget_ops(ops)
        try:
            replies = await self._send(ops, merged, use_eval=use_eval)
        except ERRORS as exc:
            err = self._store._error(f"pipeline of {len(ops)} operations", exc)
            mget = merged or any(op.cmds[0][0] == "MGET" for op in ops)
            if mget and self.mget and isinstance(exc, RedisTimeoutError):
                # Perhaps the MGET's reply was too large to read in time (values
                # nobody here wrote): the lookups go again at once, one GET
                # each (get_blobs retries its MGETs so); the other operations
                # fail as after any timeout. A hung server fails them on the
                # next try, as below.
                # their size is not known yet: one lookup per round trip until
                # their replies tell
                self._large(PIPELINE_BYTES)
                again = set(merged)
                for i in reversed(merged):
                    self._queue.appendleft(ops[i])
                for i, op in enumerate(ops):
                    if i not in again:
                        self._settle(op, err)
                return []
            for op in ops:
                self._settle(op, err)
            # Redis is down or hung (redis-py already retried a broken
            # connection once): what is queued behind this round trip
            # fails now too, rather than one socket_timeout per batch
            while self._queue:
                self._settle(self._queue.popleft(), err)
            return []
        self._store._answered()
        retry: list[_Op] = []
        for op, res in zip(ops, replies, strict=True):
            self._finish(op, res, retry, use_eval=use_eval)
        return retry

    def _finish(self, op: _Op, res: list[Any], retry: list[_Op], *, use_eval: bool) -> None:
        """Settle ``op`` with the replies of its commands (or queue it in ``retry`` for EVAL)."""
        failed = next((r for r in res if isinstance(r, Exception)), None)
        if isinstance(failed, StoreError):  # its node's round trip failed (counted there)
            self._settle(op, failed)
        elif isinstance(failed, NoScriptError) and not use_eval:
            retry.append(op)
        elif failed is not None:
            self._settle(op, self._store._error("batched command", failed))
        else:
            self._settle(op, res)

    # -- a cluster: one pipeline per master ------------------------------------
    #
    # A batch's commands are split by the master that holds their slot, and each
    # master's share goes as a pipeline of its own, settled when that master
    # answers. redis-py's cluster pipeline raises for the whole pipeline when one
    # of its nodes is unreachable (and drops the replies the other nodes gave),
    # so one pipeline for the batch failed every claim, lookup and completion in
    # it, including those on healthy masters whose leases were in fact taken:
    # the callers then ran those tasks unclaimed, and the other processes ran
    # them again when the orphaned leases expired. Now a down master costs only
    # the operations on its own slots.

    def _node_of(self, cmd: Cmd) -> str | None:
        """The name of the master serving ``cmd``'s key now (None: not known yet)."""
        key = cmd[2][0] if cmd[0] == "script" else cmd[1]
        try:
            node = self._store._client.get_node_from_key(key)
        except Exception:  # no topology yet, or the slot is not covered
            return None
        return None if node is None else str(node.name)

    async def _cluster_round_trip(self, ops: list[_Op], *, use_eval: bool) -> list[_Op]:
        """Send ``ops``, one pipeline per master, and settle each op when its masters answered."""
        replies: list[list[Any]] = [[None] * len(op.cmds) for op in ops]
        left = [len(op.cmds) for op in ops]  # commands not answered yet, per op
        groups: dict[str | None, list[tuple[int, int]]] = {}
        for i, op in enumerate(ops):
            for j, cmd in enumerate(op.cmds):
                groups.setdefault(self._node_of(cmd), []).append((i, j))
        retry: list[_Op] = []
        wake: list[bytes] = []
        failures = 0

        async def one(node: str | None, members: list[tuple[int, int]]) -> None:
            nonlocal failures
            cmds = [ops[i].cmds[j] for i, j in members]
            try:
                got = await self._send_cluster(cmds, use_eval=use_eval)
            except ERRORS as exc:
                failures += 1
                where = f" to {node}" if node is not None else ""
                err = self._store._error(f"pipeline of {len(cmds)} commands{where}", exc)
                got = [err] * len(cmds)
                self._fail_queued(node, err)
            for (i, j), reply in zip(members, got, strict=True):
                replies[i][j] = reply
                left[i] -= 1
                if not left[i]:
                    op = ops[i]
                    if op.wake and not any(isinstance(r, StoreError) for r in replies[i]):
                        wake.extend(op.wake)
                    self._finish(op, replies[i], retry, use_eval=use_eval)

        await asyncio.gather(*(one(node, members) for node, members in groups.items()))
        if not failures:
            self._store._answered()
        if wake:
            # after the writes (they may be on several masters): one more round
            # trip, once per batch (a connection per master and batch, as before)
            await self._publish(wake)
        return retry

    async def _send_cluster(self, cmds: list[Cmd], *, use_eval: bool) -> list[Any]:
        """One pipeline (to one master, as far as the client's slot map knows) of ``cmds``."""
        pipe = self._store._client.pipeline(transaction=False)
        self._fill(pipe, cmds, use_eval=use_eval)
        self._counts["round_trips"] += 1
        results: list[Any] = await pipe.execute(raise_on_error=False)
        self._saw_gets(cmds, results)
        return results

    async def _publish(self, wake: list[bytes]) -> None:
        """Wake the waiters on ``wake`` (sharded pub/sub; a failure only delays them)."""
        with contextlib.suppress(*ERRORS):
            await self._store._client.execute_command(
                "SPUBLISH", self._channel, key_list(b"p", wake)
            )
            self._counts["round_trips"] += 1

    def _fail_queued(self, node: str | None, err: StoreError) -> None:
        """Fail now the queued operations bound for ``node`` (None: the slots of no known master).

        The master is down or hung (redis-py already retried once): they would
        each wait for it in vain; the other masters' operations stay queued.
        """
        queue = self._queue
        keep: list[_Op] = []
        while queue:
            op = queue.popleft()
            if any(self._node_of(cmd) == node for cmd in op.cmds):
                self._settle(op, err)
            else:
                keep.append(op)
        queue.extend(keep)

    async def _flush(self, ops: list[_Op]) -> None:
        try:
            size = sum(op.weight for op in ops)
            self._counts["batched_ops"] += size
            if size > self._counts["batch_max"]:
                self._counts["batch_max"] = size
            # EVALSHA first; the operations whose script the server lost (a
            # restart) go again with EVAL, once
            retry = await self._round_trip(ops, use_eval=False)
            if retry:
                await self._round_trip(retry, use_eval=True)
        except asyncio.CancelledError:
            # only aclose() cancels a flush: its callers learn the store closed
            closed = StoreError(f"{self._store!r} was closed before Redis answered")
            for op in ops:
                if not op.fut.done():
                    op.fut.set_exception(closed)
            raise
        finally:
            self._in_flight -= 1
            if self._queue and not self._store._closed:
                self._kick()

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        ops = self._flushes.pop(task, ())
        if task.cancelled():
            # aclose() may cancel a flush before it ever ran (created by the
            # last _kick): its own handler never saw the cancellation, and
            # its callers would wait for ever
            closed = StoreError(f"{self._store!r} was closed before Redis answered")
            for op in ops:
                if not op.fut.done():
                    op.fut.set_exception(closed)

    def _settle(self, op: _Op, res: list[Any] | StoreError) -> None:
        if op.fut.done():
            # the caller gave up (cancelled): undo what it can no longer use
            if op.on_orphan is not None and not isinstance(res, StoreError):
                op.on_orphan(res)
            return
        if isinstance(res, StoreError):
            op.fut.set_exception(res)
        else:
            op.fut.set_result(res)

    def background(self, fut: asyncio.Future[Any]) -> None:
        self._bg.add(fut)
        fut.add_done_callback(self._bg.discard)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
