"""The Redis client of every erc-stream process (the consumer, the notifier): standalone ``redis.Redis`` or, with
``redis.cluster`` on, ``RedisCluster``.

Both expose what the stream uses (``register_script``, non-transactional ``pipeline``, ``zrange``,
``ping``, ``close``); the Lua calls go through :func:`consumer.redis_scripts.run_scripts`, which
routes them per node in cluster mode. Every key of a conversation carries its ``{conversation_id}``
hash tag (a tenant's keys ``{t=<tenant>}``), so each script touches one slot.
"""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from core.settings import RedisSettings


def connect(settings: RedisSettings) -> redis.Redis | RedisCluster:
    """A client for these settings. The standalone one connects lazily; the cluster one asks its seed for the
    slot map at once, so the cluster must answer when the consumer starts."""
    url = settings.url.get_secret_value()
    if settings.cluster:
        return RedisCluster.from_url(url, **settings.client_options())
    return redis.Redis.from_url(url, **settings.client_options())
