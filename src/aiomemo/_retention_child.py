"""The process ``Memoizer(retention=...)`` runs ``aiomemo gc``'s policy in.

``python -m aiomemo._retention_child``, started by :mod:`aiomemo._retention`.
Planning and rewriting a large store allocates millions of objects; in the
Memoizer's own process (even in a worker thread) those allocations set off
full garbage collections that walk the memo's table while the event loop
waits for the GIL. Here they cost the loop nothing.

The conversation, over the child's stdin and stdout (no pickle):

1. parent -> child: one JSON line, the request: ``paths``, ``max_bytes``
   (bytes or null), ``max_age`` (seconds or null), ``pinned`` (segment paths
   to leave alone);
2. child -> parent: frames of 1 tag byte + 4-byte big-endian length +
   payload. ``K``: evicted raw keys, each a 2-byte big-endian length and
   the key; then ``P`` (JSON ``{"changed": bool, "evicted": n}``): the plan
   is made;
3. parent -> child, once it has dropped every evicted key from its memo:
   the line ``apply``; anything else (or end of input) and the child exits
   having changed nothing;
4. child -> parent: ``S`` (JSON: ``aiomemo gc --json``'s summary) and exit 0,
   or ``E`` (JSON ``{"error": message}``) and exit 1 at any step.

A kill at any point leaves what a killed ``aiomemo gc`` leaves: a loadable,
correct checkpoint (the rewrite is crash-safe).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, BinaryIO

from aiomemo._gc import apply_gc, plan_gc
from aiomemo._retention_wire import HEADER, KEYS_PER_FRAME, pack_keys

__all__ = ["main", "run"]

def _send(out: BinaryIO, tag: bytes, payload: bytes) -> None:
    out.write(HEADER.pack(tag, len(payload)) + payload)


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def run(inp: BinaryIO, out: BinaryIO) -> int:
    """One retention run: read the request from ``inp``, talk on ``out``; the exit status."""
    try:
        req = json.loads(inp.readline())
        plan = plan_gc(
            [str(p) for p in req["paths"]],
            max_bytes=req.get("max_bytes"),
            max_age=req.get("max_age"),
            held="skip",
            pinned=[str(p) for p in req.get("pinned", ())],
            verify=False,  # batch digests, as loading trusts them
        )
        changed = any(d.changed for d in plan.dirs)
        if not changed:
            _send(out, b"P", _json({"changed": False, "evicted": 0}))
            _send(out, b"S", _json(plan.summary(dry_run=False, bytes_out=plan.bytes_in)))
            out.flush()
            return 0
        keys = list(plan.evicted)
        plan.evicted = set()
        for i in range(0, len(keys), KEYS_PER_FRAME):
            _send(out, b"K", pack_keys(keys[i : i + KEYS_PER_FRAME]))
        _send(out, b"P", _json({"changed": True, "evicted": len(keys)}))
        out.flush()
        del keys
        if inp.readline().strip() != b"apply":
            return 0  # stopped before changing anything
        left = apply_gc(plan, held="skip")
        _send(out, b"S", _json(plan.summary(dry_run=False, bytes_out=left)))
        out.flush()
        return 0
    except Exception as exc:
        try:
            _send(out, b"E", _json({"error": str(exc) or type(exc).__name__}))
            out.flush()
        except OSError:
            pass  # the parent is gone
        return 1


def main() -> int:
    # the frames get a private copy of stdout; anything printed goes to stderr
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        return run(sys.stdin.buffer, out)
    finally:
        with contextlib.suppress(OSError):
            out.close()


if __name__ == "__main__":
    sys.exit(main())
