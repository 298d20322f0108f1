"""Protocol probes: a service is up when it answers its own wire protocol (Kafka ApiVersions, RESP PING), not when a port is open."""

from __future__ import annotations

import secrets
import socket
import struct
import time
from collections.abc import Callable

from local_services.addresses import fmt_address, split_host_port
from local_services.base import PROBE_TIMEOUT_S, ServiceError


def port_open(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
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


def speaks_kafka(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
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


def speaks_redis(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
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


def redis_ping(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
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


def wait_until(check: Callable[[], bool], timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if not alive() or time.monotonic() >= deadline:
            return check()
        time.sleep(0.1)


def wait_for_kafka(bootstrap: str, timeout_s: float) -> None:
    """Block until the first broker of ``bootstrap`` answers the Kafka protocol (plaintext)."""
    host, port = split_host_port(bootstrap.split(",")[0], 9092)
    if not wait_until(lambda: speaks_kafka(host, port), timeout_s):
        what = "something that does not speak Kafka" if port_open(host, port) else "nothing"
        raise ServiceError(f"no Kafka broker answered at {fmt_address(host, port)} within {timeout_s:.1f} s ({what} listens there)")
