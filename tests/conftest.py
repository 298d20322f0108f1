"""Shared fixtures: real services on free ports, never mocks.

- ``kafka_bootstrap`` (session): ``"127.0.0.1:PORT"`` of a fresh tansu broker (memory storage)
  started through :mod:`erc_stream.services`; stopped, and waited for, at the end.
- ``redis_url`` (session): ``"redis://127.0.0.1:PORT/0"`` of a fresh redis-server; stopped at the end.
- ``settings`` (function): a :class:`Settings` on those two with unique topics, group id, client id
  and Redis key prefix per test, its three topics created with 4 partitions.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from erc_stream.services import (
    ServiceError,
    ServiceStatus,
    ensure_topics,
    kafka_down,
    kafka_up,
    redis_down,
    redis_up,
)
from erc_stream.settings import KafkaSettings, RedisSettings, ServicesSettings, Settings


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _start_on_free_port(
    make: Callable[[int, Path], Settings], up: Callable[[Settings], ServiceStatus], run_dir: Path
) -> Settings:
    """Start a service on a free port; retry if another process grabbed the port meanwhile."""
    last: Exception | None = None
    for _ in range(3):
        settings = make(free_port(), run_dir)
        try:
            status = up(settings)
        except ServiceError as exc:
            last = exc
            continue
        if status.managed:
            return settings
        last = RuntimeError(f"port taken by a service we did not start: {status}")
    raise RuntimeError(f"could not start a test service: {last}")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh tansu broker for this test session, as a bootstrap string."""
    run_dir = tmp_path_factory.mktemp("kafka-run")
    settings = _start_on_free_port(
        lambda port, d: Settings(
            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"),
            services=ServicesSettings(run_dir=d, start_timeout_s=20.0),
        ),
        lambda s: kafka_up(s, create_topics=False),
        run_dir,
    )
    try:
        yield settings.kafka.bootstrap_servers
    finally:
        kafka_down(settings)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, non-persistent redis-server for this test session, as a URL."""
    run_dir = tmp_path_factory.mktemp("redis-run")
    settings = _start_on_free_port(
        lambda port, d: Settings(
            redis=RedisSettings(url=f"redis://127.0.0.1:{port}/0"),
            services=ServicesSettings(run_dir=d, start_timeout_s=20.0),
        ),
        redis_up,
        run_dir,
    )
    try:
        yield settings.redis.url.get_secret_value()
    finally:
        redis_down(settings)


@pytest.fixture
def settings(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings on the session's broker and Redis, unique per test, with the topics created."""
    suffix = uuid.uuid4().hex[:8]
    s = Settings(
        kafka=KafkaSettings(
            bootstrap_servers=kafka_bootstrap,
            input_topic=f"test-{suffix}.messages",
            output_topic=f"test-{suffix}.emotions",
            dlq_topic=f"test-{suffix}.dlq",
            partitions=4,
            group_id=f"erc-test-{suffix}",
            client_id=f"erc-test-{suffix}",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        ),
        redis=RedisSettings(url=redis_url, key_prefix=f"erc-test-{suffix}"),
        services=ServicesSettings(run_dir=tmp_path / "run"),
    )
    ensure_topics(s)
    return s
