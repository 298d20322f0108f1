"""Many Lua script calls in one Redis round trip, without redis-py's per-command pipeline layers.

A redis-py pipeline of ``Script`` calls costs, per call, a ``Script.__call__``, an ``evalsha`` and a
command-stack entry, and per execution an extra ``SCRIPT EXISTS`` round trip. The stream makes one
or two script calls per message, so ``run_scripts`` packs the ``EVALSHA`` commands itself, sends
them at once on one pooled connection and reads the replies in order.

Semantics are a non-transactional pipeline's (``raise_on_error=True``): every reply is read; an
error reply raises (the first one) after that; scripts Redis does not know (``NOSCRIPT``, e.g. after a
restart) are loaded and those calls redone in their order; a connection error is retried with the
client's own retry policy, re-sending the whole round trip (every stream script is idempotent for a
redelivered input), and then raises, like a pipeline.

Redis Cluster (a :class:`redis.cluster.RedisCluster` client): the calls are grouped by the primary
that owns their keys' slot and each group goes, as above, to that node in one round trip. Every
stream script touches only keys of one hash tag (one conversation or one tenant), so a call never
crosses slots, and the calls of one conversation keep their order (same slot, same node, same round
trip). A ``MOVED``/``ASK`` reply (slots resharded or failed over) refreshes the slot map and re-sends
only the calls that were redirected, in their order; the redirected calls did not run.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import (
    AskError,
    ClusterError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: (script, keys, args) of one call.
Call = tuple[Script, Sequence[object], Sequence[object]]

#: Slot-map refreshes before a call that keeps being redirected (a slot migrating, ``ASK``) is given up.
_REDIRECTS = 3


def _round_trip(conn, calls: Sequence[Call]) -> list[object]:
    commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]
    conn.send_packed_command(conn.pack_commands(commands))
    replies: list[object] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except ResponseError as e:  # the error reply was read: the connection is still in step
            replies.append(e)
    return replies


def run_scripts(client: redis.Redis | RedisCluster, calls: Sequence[Call]) -> list[object]:
    """Run the calls in order in one round trip per node (two if scripts had to be loaded); their replies, in order."""
    if not calls:
        return []
    if isinstance(client, RedisCluster):
        replies = _on_cluster(client, calls)
    else:
        replies = _on_node(client, calls)
    for r in replies:
        if isinstance(r, ResponseError):
            raise r
    return replies


def _on_node(client: redis.Redis, calls: Sequence[Call]) -> list[object]:
    """The calls' replies from one server, error replies included (not raised)."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        replies = conn.retry.call_with_retry(lambda: _round_trip(conn, calls), lambda _error: conn.disconnect())
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
                script.sha = client.script_load(script.script)
            for i, reply in zip(missing, _round_trip(conn, [calls[i] for i in missing])):
                replies[i] = reply
        return replies
    except BaseException:
        conn.disconnect()  # whatever is unread on it must not reach the next user
        raise
    finally:
        pool.release(conn)


def _on_cluster(cluster: RedisCluster, calls: Sequence[Call]) -> list[object]:
    replies: list[object] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(_REDIRECTS + 1):
        redirected: list[int] = []
        for node, indices in _by_node(cluster, [(i, calls[i]) for i in todo]):
            try:
                node_replies = _on_node(cluster.get_redis_connection(node), [calls[i] for i in indices])
            except (RedisConnectionError, RedisTimeoutError):
                _refresh(cluster)  # a failover may have moved the slots: the caller's retry finds the new owner
                raise
            for i, reply in zip(indices, node_replies):
                if isinstance(reply, AskError):  # MOVED is an AskError too
                    redirected.append(i)
                else:
                    replies[i] = reply
        if not redirected:
            return replies
        _refresh(cluster)
        todo = redirected
    raise ClusterError(f"{len(todo)} script calls still redirected after {_REDIRECTS} slot-map refreshes")


def _by_node(cluster: RedisCluster, calls: Sequence[tuple[int, Call]]) -> list[tuple[object, list[int]]]:
    """The calls' indices grouped by the primary owning their first key's slot, in call order within a group."""
    groups: dict[str, tuple[object, list[int]]] = {}
    for i, (_script, keys, _args) in calls:
        if not keys:
            raise ValueError("a script call on Redis Cluster needs at least one key (it picks the node)")
        try:
            node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(keys[0]))
        except RedisClusterException as e:  # slot not covered: the cluster is down for this key
            raise ClusterError(str(e)) from e
        groups.setdefault(node.name, (node, []))[1].append(i)
    return list(groups.values())


def _refresh(cluster: RedisCluster) -> None:
    try:
        cluster.nodes_manager.initialize()
    except (redis.RedisError, RedisClusterException):
        pass  # nothing answers now; the next call tries again
