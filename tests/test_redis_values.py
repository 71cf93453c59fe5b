"""Property tests of RedisStore's value format and event messages (no server needed)."""

from __future__ import annotations

import os

import pytest

if not os.environ.get("CI"):  # redis-py is the optional extra aiomemo[redis]
    pytest.importorskip("redis")

from hypothesis import given, settings
from hypothesis import strategies as st

from aiomemo.stores import Record
from aiomemo.stores._redis import decode_value, derive_key, encode_value
from aiomemo.stores._redis._values import key_list, parse_key_list

keys = st.binary(min_size=1, max_size=64)
records = st.builds(
    Record,
    key=keys,
    value=st.binary(max_size=2000),
    func=st.text(max_size=200),
    time=st.floats(allow_nan=False),
    digests=st.binary(max_size=100),
)
secrets = st.one_of(st.none(), st.binary(min_size=1, max_size=64), st.text(min_size=1))


@settings(max_examples=200, deadline=None)
@given(records, secrets)
def test_round_trip(r: Record, secret: bytes | str | None) -> None:
    mac = derive_key(secret) if secret is not None else None
    assert decode_value(r.key, encode_value(r, mac), mac) == r


@settings(max_examples=200, deadline=None)
@given(records, secrets, st.data())
def test_any_change_is_rejected(r: Record, secret: bytes | str | None, data: st.DataObject) -> None:
    mac = derive_key(secret) if secret is not None else None
    blob = encode_value(r, mac)
    i = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(blob)
    bad[i] ^= 1 << bit
    assert decode_value(r.key, bytes(bad), mac) is None
    cut = data.draw(st.integers(0, len(blob) - 1))
    assert decode_value(r.key, blob[:cut], mac) is None
    other = data.draw(keys.filter(lambda k: k != r.key))
    assert decode_value(other, blob, mac) is None


@settings(max_examples=300, deadline=None)
@given(keys, st.binary(max_size=300), secrets)
def test_arbitrary_bytes_never_raise(key: bytes, blob: bytes, secret: bytes | str | None) -> None:
    mac = derive_key(secret) if secret is not None else None
    for b in (blob, b"AMR\x01" + blob, b"AMR\x02" + blob):
        rec = decode_value(key, b, mac)
        assert rec is None or rec.key == key


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=70), max_size=50), st.sampled_from([b"p", b"r"]))
def test_event_messages_round_trip(ks: list[bytes], kind: bytes) -> None:
    msg = key_list(kind, ks)
    assert msg[:1] == kind and parse_key_list(msg) == ks


@given(st.binary(max_size=300))
def test_damaged_event_messages_never_raise(msg: bytes) -> None:
    assert all(isinstance(k, bytes) for k in parse_key_list(msg))
