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
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError

#: (script, keys, args) of one call.
Call = tuple[Script, Sequence[object], Sequence[object]]


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


def run_scripts(client: redis.Redis, calls: Sequence[Call]) -> list[object]:
    """Run the calls in order in one round trip (two if scripts had to be loaded); their replies, in order."""
    if not calls:
        return []
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
        for r in replies:
            if isinstance(r, ResponseError):
                raise r
        return replies
    except BaseException:
        conn.disconnect()  # whatever is unread on it must not reach the next user
        raise
    finally:
        pool.release(conn)
