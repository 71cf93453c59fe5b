"""The lease on one key (RedisLease) and the Lua scripts that keep leases atomic."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from aiomemo.stores._base import Lease, Record
from aiomemo.stores._redis._values import encode_value

if TYPE_CHECKING:
    from aiomemo.stores._redis._store import RedisStore

__all__ = ["SCRIPTS", "SHA", "RedisLease", "ms"]

# KEYS[1] lease, KEYS[2] value; ARGV[1] token, ARGV[2] ttl ms, ARGV[3] magic,
# ARGV[4] the magic of a value that expires.
# 1: taken; 0: held by another or a result (a value with our header) exists.
_CLAIM_LUA = """
local head = redis.call('getrange', KEYS[2], 0, 3)
if head == ARGV[3] or head == ARGV[4] then return 0 end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS[1] lease; ARGV[1] token, ARGV[2] ttl ms.
_RENEW_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lease; ARGV[1] token.
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# KEYS[1] value; ARGV[1] the bad value read: delete it only if still the same.
_DROP_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# KEYS[1] value, KEYS[2] lease; ARGV[1] blob, ARGV[2] ttl ms (0: none), ARGV[3] token.
# Returns 1 when the lease was ours (and is now released).
_COMPLETE_LUA = """
if tonumber(ARGV[2]) > 0 then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('set', KEYS[1], ARGV[1])
end
if redis.call('get', KEYS[2]) == ARGV[3] then
  redis.call('del', KEYS[2])
  return 1
end
return 0
"""

SCRIPTS = {
    "claim": _CLAIM_LUA,
    "renew": _RENEW_LUA,
    "release": _RELEASE_LUA,
    "drop": _DROP_LUA,
    "complete": _COMPLETE_LUA,
}
SHA = {name: hashlib.sha1(lua.encode()).hexdigest() for name, lua in SCRIPTS.items()}


def ms(seconds: float) -> int:
    """Seconds as whole milliseconds (at least 1), for PX and PEXPIRE."""
    return max(1, round(seconds * 1000))


def _px_arg(px: int | None) -> int:
    """The complete script's ttl argument: 0 for none, 1 ms for a record already expired."""
    return 0 if px is None else max(1, px)


class RedisLease(Lease):
    """A lease on one key in a :class:`RedisStore`, held under a random token.

    Only this object (its token) can renew, release or complete it; another
    holder's lease on the same key is never touched.
    """

    __slots__ = ("_released", "_store")

    def __init__(self, store: RedisStore, key: bytes, token: str, ttl: float) -> None:
        super().__init__(key, token, ttl)
        self._store = store
        self._released = False

    def __repr__(self) -> str:
        return f"RedisLease({self.key.hex()[:12]}…, ttl={self.ttl})"

    async def renew(self) -> bool:
        """Extend the lease by ``ttl``; False when it was lost (expired or taken)."""
        if self._released:
            return False
        store = self._store
        (got,) = await store._submit(
            [("script", "renew", [store.lease_key(self.key)], [self.token, ms(self.ttl)])],
            urgent=True,
        )
        if not got:
            store._counts["renewals_lost"] += 1
        return bool(got)

    async def release(self) -> None:
        """Give the lease up and wake the waiters. Idempotent."""
        if self._released:
            return
        store = self._store
        (got,) = await store._submit(
            [("script", "release", [store.lease_key(self.key)], [self.token])], wake=self.key
        )
        if got:
            store._counts["releases"] += 1
        self._released = True

    async def complete(self, record: Record) -> bool:
        """Store ``record``, drop the lease and wake waiters: one atomic call.

        Waiters never see the lease gone without the result. Returns whether
        the lease was still held.
        """
        if record.key != self.key:
            raise ValueError(
                f"RedisLease.complete: the record's key {record.key.hex()[:12]}… is not "
                f"the lease's key {self.key.hex()[:12]}…"
            )
        store = self._store
        cmd = (
            "script",
            "complete",
            [store.value_key(record.key), store.lease_key(record.key)],
            [encode_value(record, store._mac_key), _px_arg(store._writes.px(record)), self.token],
        )
        (got,) = await store._submit([cmd], wake=record.key)
        self._released = True
        store._counts["puts"] += 1
        if got:
            store._counts["releases"] += 1
        return bool(got)
