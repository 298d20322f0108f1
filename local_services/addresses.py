"""Where a service listens: host and port from the settings' bootstrap servers and Redis URL, and whether that is this machine."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from core.settings import Settings
from local_services.base import ServiceError


def split_host_port(hostport: str, default_port: int) -> tuple[str, int]:
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
    return split_host_port(first, 9092)


def redis_address(settings: Settings) -> tuple[str, int]:
    """Host and port of ``redis.url`` (a unix-socket URL has no port and cannot be managed)."""
    parts = urlsplit(settings.redis.url.get_secret_value())
    if parts.scheme not in ("redis", "rediss"):
        raise ServiceError(
            f"redis.url has scheme {parts.scheme!r}; only redis:// and rediss:// addresses can be managed"
        )
    return parts.hostname or "127.0.0.1", parts.port or 6379


def fmt_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_local(host: str) -> bool:
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


def bind_ip(host: str) -> str:
    """An IP address for ``host`` that servers can bind (tansu and redis want addresses, not names)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return host
    ips = [info[4][0] for info in infos]
    v4 = [ip for ip in ips if ":" not in ip]
    return (v4 or ips or [host])[0]
