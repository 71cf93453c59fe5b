"""RedisStore: results shared by many processes and machines through Redis.

A :class:`RedisStore` keeps one Redis string per finished task and, for
cross-process collapse, one short-lived *lease* key per task being computed::

    {namespace}:r:{<hex key>}   the record (see _values.py), optional TTL
    {namespace}:l:{<hex key>}   lease: the random token of the holder's lease, PX expiry
    {namespace}:events          pub/sub channel: "results were put" / "leases were released"

The braces are a Redis Cluster hash tag: a task's result and lease keys live in
the same slot, so completing a lease (store the result, drop the lease) is one
atomic Lua call on one node, in a single server or a cluster alike.

Round trips
    Every operation (get, claim, renew, release, complete, put, wait check) is
    queued and sent with the others issued in the same event-loop iteration:
    one pipeline of up to ``batch_size`` operations per round trip, at most
    ``max_connections`` round trips in flight. A store therefore never uses
    more than ``max_connections`` connections (plus one for pub/sub), however
    many tasks call it, and N concurrent misses cost about N / batch_size
    round trips. An operation waits its turn rather than failing; each round
    trip is bounded by ``socket_timeout``.

Lease protocol (what a Memoizer does on a local miss)
    1. ``lease = await store.claim(key, ttl)``: atomic ``SET lease token NX PX ttl``
       (Lua; it also refuses when the result already exists) with a fresh random
       token. A :class:`RedisLease`: this process computes; None: somebody else does.
    2. While computing: ``await lease.renew()`` every ``ttl/3``; False means the
       lease was lost (expired), the result may be computed twice but stays correct.
    3. On success: ``await lease.complete(record)`` (stores it and drops the lease
       in one atomic call); on an exception or cancellation: ``await lease.release()``.
    4. A process whose claim returned None calls ``wait_for(key, timeout)``: it
       returns the result as soon as it is put (woken by pub/sub, no busy poll),
       or None when the lease is gone without a result (the holder failed, or
       died and its lease expired: noticed right at the expiry time, found with
       PTTL) or when ``timeout`` passed: then it claims again; exactly one wins.
       All the keys a process waits for are watched by one task: one pub/sub
       subscription, and the re-checks due together go in one batch.

Faults
    Every Redis failure surfaces as :class:`~aiomemo.StoreError` (chained to the
    redis-py error) within about ``connect_timeout``/``socket_timeout``: no long
    retry loops. ``open()`` does not raise when Redis is unreachable or refuses
    the credentials (it logs one warning and counts the error) so a workflow can
    start and degrade to local work; redis-py reconnects by itself once the
    server is back.
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised only without redis-py
    raise ImportError(
        "aiomemo's RedisStore needs redis-py: install the extra with `pip install 'aiomemo[redis]'`"
    ) from _exc

from aiomemo.stores._redis._store import RedisLease, RedisStore
from aiomemo.stores._redis._values import decode_value, derive_key, encode_value

__all__ = ["RedisLease", "RedisStore", "decode_value", "derive_key", "encode_value"]
