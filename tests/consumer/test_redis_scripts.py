"""Script calls in one round trip: replies in order, unknown scripts loaded, errors raised like a pipeline's."""

from __future__ import annotations

import uuid

import pytest
import redis
from redis.cluster import RedisCluster

from consumer.redis_scripts import run_scripts

_INCR_AND_ECHO = "return {redis.call('INCR', KEYS[1]), ARGV[1]}"
_FAIL = "return redis.call('INCR', KEYS[1])"  # on a key holding a hash: WRONGTYPE


@pytest.fixture
def client(any_redis: redis.Redis) -> redis.Redis:
    """Standalone Redis, then Redis Cluster (every key a script touches shares one hash tag)."""
    return any_redis


def _server_of(client: redis.Redis | RedisCluster, key: str) -> redis.Redis:
    """The server holding ``key``: the client itself, or the cluster primary owning the key's slot."""
    if isinstance(client, RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(key))
    return client


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
    assert all(_server_of(client, key).script_exists(first.sha, second.sha))  # loaded where the key lives


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


def test_on_a_cluster_calls_go_to_every_slot_owner_in_order(redis_cluster_url: str) -> None:
    cluster = RedisCluster.from_url(redis_cluster_url, socket_timeout=5)
    try:
        script = cluster.register_script(_INCR_AND_ECHO)
        keys = [f"rs:{{{uuid.uuid4().hex}}}" for _ in range(60)]
        assert len({cluster.get_node_from_key(k).name for k in keys}) == 3  # all three primaries take part
        calls = [(script, [keys[i % 60]], [str(i)]) for i in range(180)]
        assert run_scripts(cluster, calls) == [[i // 60 + 1, str(i).encode()] for i in range(180)]
    finally:
        cluster.close()


def test_on_a_cluster_a_moved_slot_is_followed(redis_cluster_url: str) -> None:
    """The slot map cached by the client goes stale (the slot moves to another primary): MOVED, refresh, redo."""
    cluster = RedisCluster.from_url(redis_cluster_url, socket_timeout=5)
    try:
        script = cluster.register_script(_INCR_AND_ECHO)
        key, other = f"rs:{{{uuid.uuid4().hex}}}", f"rs:{{{uuid.uuid4().hex}}}"
        owner = cluster.get_node_from_key(key)
        target = next(n for n in cluster.get_primaries() if n.name != owner.name)
        target_id = cluster.get_redis_connection(target).execute_command("CLUSTER MYID")
        slot = cluster.keyslot(key)
        # An empty slot moves with SETSLOT NODE: first on the new owner, then on the others (as redis-cli does).
        for node in [target] + [n for n in cluster.get_primaries() if n.name != target.name]:
            cluster.get_redis_connection(node).execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        replies = run_scripts(cluster, [(script, [key], ["a"]), (script, [other], ["b"]), (script, [key], ["c"])])
        assert replies == [[1, b"a"], [1, b"b"], [2, b"c"]]
        assert cluster.get_redis_connection(target).get(key) == b"2"  # it ran on the new owner, twice
    finally:
        cluster.close()


def test_connect_makes_a_standalone_client_by_default_and_a_cluster_client_when_asked(
    redis_url: str, redis_cluster_url: str
) -> None:
    from core.redis_client import connect
    from core.settings import RedisSettings

    standalone = connect(RedisSettings(url=redis_url))
    cluster = connect(RedisSettings(url=redis_cluster_url, cluster=True))
    try:
        assert type(standalone) is redis.Redis and standalone.ping()
        assert isinstance(cluster, RedisCluster) and len(cluster.get_primaries()) == 3
    finally:
        standalone.close()
        cluster.close()
