"""Script calls in one round trip: replies in order, unknown scripts loaded, errors raised like a pipeline's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from consumer.redis_scripts import run_scripts

_INCR_AND_ECHO = "return {redis.call('INCR', KEYS[1]), ARGV[1]}"
_FAIL = "return redis.call('INCR', KEYS[1])"  # on a key holding a hash: WRONGTYPE


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        c.close()


def test_replies_come_back_in_call_order(client: redis.Redis) -> None:
    script = client.register_script(_INCR_AND_ECHO)
    key = f"rs-{uuid.uuid4().hex}"
    replies = run_scripts(client, [(script, [key], [f"arg-{i}"]) for i in range(300)])
    assert replies == [[i + 1, f"arg-{i}".encode()] for i in range(300)]
    assert run_scripts(client, []) == []


def test_scripts_unknown_to_redis_are_loaded_and_their_calls_redone_in_order(client: redis.Redis) -> None:
    first = client.register_script(_INCR_AND_ECHO)
    second = client.register_script(_INCR_AND_ECHO + " -- another script")
    key = f"rs-{uuid.uuid4().hex}"
    client.script_flush()  # as after a Redis restart: the cache of scripts is empty
    calls = [(first if i % 2 else second, [key], [str(i)]) for i in range(10)]
    assert run_scripts(client, calls) == [[i + 1, str(i).encode()] for i in range(10)]
    assert all(client.script_exists(first.sha, second.sha))


def test_an_error_reply_raises_after_every_reply_was_read(client: redis.Redis) -> None:
    ok, fail = client.register_script(_INCR_AND_ECHO), client.register_script(_FAIL)
    good, bad = f"rs-{uuid.uuid4().hex}", f"rs-{uuid.uuid4().hex}"
    client.hset(bad, "f", "v")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        run_scripts(client, [(ok, [good], ["a"]), (fail, [bad], []), (ok, [good], ["b"])])
    assert client.get(good) == b"2"  # the calls around the failed one ran, like a pipeline's
    assert run_scripts(client, [(ok, [good], ["c"])]) == [[3, b"c"]]  # and the client still works


def test_redis_down_raises_a_connection_error() -> None:
    from tests.conftest import free_port

    c = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    script = c.register_script(_INCR_AND_ECHO)
    with pytest.raises(redis.ConnectionError):
        run_scripts(c, [(script, ["k"], ["a"])])
