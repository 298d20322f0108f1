"""Local services for development and tests: a tansu Kafka broker and a Redis server.

``services_up`` makes sure both answer at the addresses in :class:`~core.settings.Settings`,
starting them only when nothing listens there, and creates the four topics. What we start is
recorded with a pid file in ``settings.services.run_dir`` (``tansu-<port>.pid``,
``redis-<port>.pid``); ``services_down`` stops only those, so a broker or Redis someone else runs
is used but never killed.

Readiness is judged by the wire protocol, not by an open port (:mod:`local_services.probes`): a Kafka
ApiVersions request for the broker and a RESP ``PING`` for Redis. That is what lets ``up`` refuse, with a
clear message, a port held by something else instead of hanging in a client's retry loop.
"""

from __future__ import annotations

from core.settings import Settings
from local_services.addresses import kafka_address, redis_address
from local_services.base import KAFKA, REDIS, STOP_TIMEOUT_S, ServiceError, ServiceStatus
from local_services.broker import ensure_topics, kafka_down, kafka_status, kafka_up
from local_services.probes import wait_for_kafka
from local_services.redis_server import redis_down, redis_status, redis_up


def services_up(settings: Settings) -> list[ServiceStatus]:
    """Bring up Kafka (with the topics) and Redis; idempotent. Raises ServiceError on conflicts."""
    return [kafka_up(settings), redis_up(settings)]


def services_down(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S) -> list[ServiceStatus]:
    """Stop only what ``services_up`` started (per the pid files); stale pid files are removed."""
    return [kafka_down(settings, timeout_s=timeout_s), redis_down(settings, timeout_s=timeout_s)]


def services_status(settings: Settings) -> list[ServiceStatus]:
    """Kafka and Redis as they are now; changes nothing."""
    return [kafka_status(settings), redis_status(settings)]


__all__ = [
    "KAFKA",
    "REDIS",
    "ServiceError",
    "ServiceStatus",
    "ensure_topics",
    "kafka_address",
    "kafka_down",
    "kafka_up",
    "redis_address",
    "redis_down",
    "redis_up",
    "services_down",
    "services_status",
    "services_up",
    "wait_for_kafka",
]
