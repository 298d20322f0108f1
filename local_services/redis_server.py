"""The local Redis: Debian's ``redis-server``, started without persistence when nothing answers at ``redis.url``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import structlog

from core.settings import Settings
from local_services.addresses import bind_ip, fmt_address, is_local, redis_address
from local_services.base import REDIS, STOP_TIMEOUT_S, ServiceError, ServiceStatus
from local_services.probes import port_open, redis_ping, speaks_redis, wait_until
from local_services.processes import log_file_path, log_tail, managed_pid, pid_file_path, read_pid, stop_managed

log = structlog.get_logger(__name__)


def redis_status(settings: Settings) -> ServiceStatus:
    url = settings.redis.url.get_secret_value()
    host, port = redis_address(settings)
    pid, ours = managed_pid(settings, REDIS, port)
    error = redis_ping(url)
    if error is None:
        running = True
        detail = f"redis-server started by erc-stream (pid {pid})" if ours else "Redis not started by erc-stream"
    else:
        running = False
        if speaks_redis(host, port):
            detail = f"Redis answers but PING failed: {error}"
        elif port_open(host, port):
            detail = "port is open but does not answer the Redis protocol"
        else:
            detail = "nothing listens"
    if pid is not None and not ours:
        detail += f"; stale pid file (pid {pid} is not a running redis-server)"
    return ServiceStatus(REDIS, fmt_address(host, port), running, ours, pid if ours else None, detail)


def redis_up(settings: Settings) -> ServiceStatus:
    """Make sure Redis answers PING at ``redis.url``; start a throwaway redis-server if nothing listens."""
    url = settings.redis.url.get_secret_value()
    host, port = redis_address(settings)
    address = fmt_address(host, port)
    pid_file = pid_file_path(settings, REDIS, port)

    pid, ours = managed_pid(settings, REDIS, port)
    if pid is not None and not ours:
        log.info("redis.stale_pid_file", path=str(pid_file), pid=pid)
        pid_file.unlink(missing_ok=True)
        pid = None

    error = redis_ping(url)
    if error is None:
        detail = f"redis-server already running (pid {pid})" if ours else "using a Redis not started by erc-stream"
        return ServiceStatus(REDIS, address, True, ours, pid if ours else None, detail)
    if speaks_redis(host, port):
        raise ServiceError(f"Redis at {address} answers but refuses us ({error}); check the credentials in ERC_REDIS__URL")
    if port_open(host, port):
        raise ServiceError(
            f"port {port} on {host} is in use by something that does not speak the Redis protocol; "
            f"stop it, or point ERC_REDIS__URL at a free port"
        )
    if urlsplit(url).scheme != "redis":
        raise ServiceError(f"nothing answers at {address}, and a TLS (rediss://) Redis cannot be started here")
    if not is_local(host):
        raise ServiceError(
            f"nothing answers at {address}, and {host} is not an address of this machine, "
            f"so no Redis can be started there; start it or use a local address"
        )
    pid = _start_redis(settings, host, port)
    return ServiceStatus(REDIS, address, True, True, pid, f"started redis-server (pid {pid}, no persistence)")


def _start_redis(settings: Settings, host: str, port: int) -> int:
    run_dir = Path(settings.services.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pid_file = pid_file_path(settings, REDIS, port)
    log_path = log_file_path(settings, REDIS, port)
    url = settings.redis.url.get_secret_value()
    cmd = [
        "redis-server",
        "--port", str(port),
        "--bind", bind_ip(host),
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
    log.info("redis.starting", address=fmt_address(host, port), log=str(log_path))
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)  # noqa: S603
    except FileNotFoundError:
        raise ServiceError("redis-server is not installed (apt-get install redis-server)") from None
    if done.returncode != 0:
        raise ServiceError(
            f"redis-server exited with {done.returncode}: {(done.stdout + done.stderr).decode(errors='replace').strip()}"
        )
    timeout_s = settings.services.start_timeout_s
    if not wait_until(lambda: redis_ping(url) is None and read_pid(pid_file) is not None, timeout_s):
        raise ServiceError(
            f"redis-server did not answer PING at {fmt_address(host, port)} within {timeout_s:.1f} s. "
            f"Log {log_path}:\n{log_tail(log_path)}"
        )
    pid = read_pid(pid_file)
    assert pid is not None
    log.info("redis.ready", pid=pid, address=fmt_address(host, port))
    return pid


def redis_down(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S) -> ServiceStatus:
    """Stop the redis-server we started on ``redis.url``'s port; leave others alone."""
    host, port = redis_address(settings)
    return stop_managed(settings, REDIS, host, port, timeout_s, redis_status)
