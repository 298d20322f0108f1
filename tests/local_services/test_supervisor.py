"""local_services.supervisor against real processes on free ports (never 9092 / 6379)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient

from core.settings import KafkaSettings, RedisSettings, ServicesSettings, Settings
from local_services import supervisor as sv
from local_services.processes import is_running
from local_services.supervisor import ServiceError
from tests.conftest import free_port


def _settings(run_dir: Path, kafka_port: int | None = None, redis_port: int | None = None) -> Settings:
    return Settings(
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{kafka_port or free_port()}", partitions=3),
        redis=RedisSettings(url=f"redis://127.0.0.1:{redis_port or free_port()}/0"),
        services=ServicesSettings(run_dir=run_dir, start_timeout_s=10.0),
    )


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Settings]:
    """Settings on two free ports with a private run dir; whatever we started is stopped after."""
    s = _settings(tmp_path / "run")
    try:
        yield s
    finally:
        sv.services_down(s)


@contextmanager
def foreign_listener(reply: bytes | None) -> Iterator[int]:
    """A TCP server that is neither Kafka nor Redis: answers ``reply`` and hangs up, or stays silent."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            if reply is None:
                held.append(conn)
            else:
                try:
                    conn.sendall(reply)
                finally:
                    conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        server.close()


def _topics(bootstrap: str) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    try:
        names = [t for t in admin.list_topics() if not t.startswith("__")]
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)}
    finally:
        admin.close()


def test_up_is_idempotent_status_reports_running_and_down_stops(local: Settings) -> None:
    kafka, red = sv.services_up(local)
    assert (kafka.name, kafka.running, kafka.managed) == (sv.KAFKA, True, True)
    assert (red.name, red.running, red.managed) == (sv.REDIS, True, True)
    assert kafka.pid and red.pid
    run_dir = local.services.run_dir
    kport, rport = sv.kafka_address(local)[1], sv.redis_address(local)[1]
    assert (run_dir / f"tansu-{kport}.pid").read_text().strip() == str(kafka.pid)
    assert (run_dir / f"redis-{rport}.pid").read_text().strip() == str(red.pid)
    topics = _topics(local.kafka.bootstrap_servers)
    for name in (local.kafka.input_topic, local.kafka.output_topic, local.kafka.dlq_topic):
        assert topics[name] == 3

    again = sv.services_up(local)
    assert [(s.running, s.managed, s.pid) for s in again] == [(True, True, kafka.pid), (True, True, red.pid)]

    status = sv.services_status(local)
    assert [(s.name, s.running, s.managed, s.pid) for s in status] == [
        (sv.KAFKA, True, True, kafka.pid),
        (sv.REDIS, True, True, red.pid),
    ]
    assert redis.Redis.from_url(local.redis.url.get_secret_value()).ping()

    down = sv.services_down(local)
    assert [(s.running, s.managed, s.pid) for s in down] == [(False, False, None)] * 2
    assert not (run_dir / f"tansu-{kport}.pid").exists()
    assert not (run_dir / f"redis-{rport}.pid").exists()
    for pid in (kafka.pid, red.pid):
        assert not is_running(pid)
    assert [s.running for s in sv.services_status(local)] == [False, False]
    assert [s.running for s in sv.services_down(local)] == [False, False]  # down twice is fine


def test_up_from_another_process_survives_it_and_is_stopped_here(local: Settings) -> None:
    """The CLI case: `services up` exits, the services stay up, a later `down` finds them by pid file."""
    env = {
        **os.environ,
        "ERC_KAFKA__BOOTSTRAP_SERVERS": local.kafka.bootstrap_servers,
        "ERC_REDIS__URL": local.redis.url.get_secret_value(),
        "ERC_SERVICES__RUN_DIR": str(local.services.run_dir),
    }
    code = "from core.settings import Settings; from local_services.supervisor import services_up; services_up(Settings())"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60, capture_output=True)
    status = sv.services_status(local)
    assert [(s.running, s.managed) for s in status] == [(True, True)] * 2
    pids = [s.pid for s in status]
    down = sv.services_down(local)
    assert [s.running for s in down] == [False, False]
    assert not any(is_running(pid) for pid in pids if pid)


@pytest.mark.parametrize("reply", [b"HTTP/1.0 400 Bad Request\r\n\r\n", None], ids=["chatty", "silent"])
def test_kafka_port_held_by_something_else_is_refused(tmp_path: Path, reply: bytes | None) -> None:
    with foreign_listener(reply) as port:
        s = _settings(tmp_path / "run", kafka_port=port)
        with pytest.raises(ServiceError, match=rf"port {port} .*does not speak the Kafka protocol") as err:
            sv.kafka_up(s)
        assert "ERC_KAFKA__BOOTSTRAP_SERVERS" in str(err.value)
        st = sv.services_status(s)[0]
        assert (st.running, st.managed) == (False, False)
        assert "does not answer the Kafka protocol" in st.detail
    assert not list((tmp_path / "run").glob("tansu-*.pid")) if (tmp_path / "run").exists() else True


def test_redis_port_held_by_something_else_is_refused(tmp_path: Path) -> None:
    with foreign_listener(b"HTTP/1.0 400 Bad Request\r\n\r\n") as port:
        s = _settings(tmp_path / "run", redis_port=port)
        with pytest.raises(ServiceError, match=rf"port {port} .*does not speak the Redis protocol"):
            sv.redis_up(s)


def test_kafka_port_held_by_redis_is_refused(tmp_path: Path, redis_url: str) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    s = _settings(tmp_path / "run", kafka_port=port)
    with pytest.raises(ServiceError, match=f"port {port} .*Kafka"):
        sv.kafka_up(s)


def test_redis_is_started_when_absent(local: Settings) -> None:
    assert sv.services_status(local)[1].running is False
    st = sv.redis_up(local)
    assert (st.running, st.managed) == (True, True)
    assert "started redis-server" in st.detail
    client = redis.Redis.from_url(local.redis.url.get_secret_value())
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert client.config_get("save")["save"] == ""
    assert client.config_get("appendonly")["appendonly"] == "no"
    client.close()
    down = sv.redis_down(local)
    assert (down.running, down.managed) == (False, False)
    assert not is_running(st.pid)  # type: ignore[arg-type]


def test_foreign_broker_is_used_topics_ensured_and_left_running(tmp_path: Path, kafka_bootstrap: str) -> None:
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    s = _settings(tmp_path / "run", kafka_port=port).with_overrides(
        kafka={"input_topic": "svc-foreign-in", "output_topic": "svc-foreign-out", "dlq_topic": "svc-foreign-dlq"}
    )
    st = sv.kafka_up(s)
    assert (st.running, st.managed, st.pid) == (True, False, None)
    topics = _topics(kafka_bootstrap)
    assert {"svc-foreign-in", "svc-foreign-out", "svc-foreign-dlq"} <= topics.keys()
    assert sv.kafka_up(s).running  # topics already there: still fine
    down = sv.kafka_down(s)
    assert (down.running, down.managed) == (True, False)
    sv.wait_for_kafka(kafka_bootstrap, 2.0)  # the session broker is untouched


def test_foreign_redis_is_used_and_left_running(tmp_path: Path, redis_url: str) -> None:
    s = Settings(redis=RedisSettings(url=redis_url), services=ServicesSettings(run_dir=tmp_path / "run"))
    st = sv.redis_up(s)
    assert (st.running, st.managed) == (True, False)
    assert sv.redis_down(s).running is True
    assert redis.Redis.from_url(redis_url).ping()


def test_stale_pid_files_are_ignored_and_never_kill_a_stranger(local: Settings) -> None:
    run_dir = local.services.run_dir
    run_dir.mkdir(parents=True)
    kport, rport = sv.kafka_address(local)[1], sv.redis_address(local)[1]
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / f"tansu-{kport}.pid").write_text(f"{dead.pid}\n")
    (run_dir / f"redis-{rport}.pid").write_text(f"{os.getpid()}\n")  # alive, but not redis-server

    status = sv.services_status(local)
    assert [(s.running, s.managed, s.pid) for s in status] == [(False, False, None)] * 2
    assert all("stale pid file" in s.detail for s in status)

    down = sv.services_down(local)  # must not signal this test process
    assert all("stale" in s.detail for s in down)
    assert not list(run_dir.glob("*.pid"))

    (run_dir / f"tansu-{kport}.pid").write_text(f"{dead.pid}\n")
    kafka, red = sv.services_up(local)
    assert kafka.managed and kafka.pid != dead.pid
    assert (run_dir / f"tansu-{kport}.pid").read_text().strip() == str(kafka.pid)


def test_wait_for_kafka(kafka_bootstrap: str) -> None:
    sv.wait_for_kafka(kafka_bootstrap, 2.0)
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ServiceError, match=f"127.0.0.1:{port}.*nothing listens"):
        sv.wait_for_kafka(f"127.0.0.1:{port}", 0.5)
    assert time.monotonic() - started < 3


def test_ensure_topics_is_idempotent(settings: Settings) -> None:
    assert sv.ensure_topics(settings) == []  # the fixture made them
    topics = _topics(settings.kafka.bootstrap_servers)
    for name in (settings.kafka.input_topic, settings.kafka.output_topic, settings.kafka.dlq_topic):
        assert topics[name] == 4
