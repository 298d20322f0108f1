"""Processes we start: their pid and log files in ``services.run_dir``, liveness checks, and stopping only our own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from core.settings import Settings
from local_services.addresses import fmt_address
from local_services.base import KAFKA, POLL_S, ServiceStatus

log = structlog.get_logger(__name__)


# Popen objects of brokers started by this process, so they are reaped (no zombies) and not
# reported as "still running" when garbage-collected.
started_children: dict[int, subprocess.Popen[bytes]] = {}


def pid_file_path(settings: Settings, name: str, port: int) -> Path:
    prefix = "tansu" if name == KAFKA else "redis"
    return Path(settings.services.run_dir) / f"{prefix}-{port}.pid"


def log_file_path(settings: Settings, name: str, port: int) -> Path:
    prefix = "tansu" if name == KAFKA else "redis"
    return Path(settings.services.run_dir) / f"{prefix}-{port}.log"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> None:
    child = started_children.get(pid)
    if child is not None:
        if child.poll() is not None:
            started_children.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int, binary: str | None = None) -> bool:
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


def managed_pid(settings: Settings, name: str, port: int) -> tuple[int | None, bool]:
    """(pid from our pid file, whether that process is alive and ours)."""
    pid = read_pid(pid_file_path(settings, name, port))
    if pid is None:
        return None, False
    return pid, is_running(pid, _binary(name))


def stop_pid(pid: int, timeout_s: float) -> bool:
    """SIGTERM, wait for exit, SIGKILL after ``timeout_s``. True if it had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if not is_running(pid):
        return False
    log.warning("service.sigkill", pid=pid, after_s=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return True


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def stop_managed(
    settings: Settings, name: str, host: str, port: int, timeout_s: float,
    status: Callable[[Settings], ServiceStatus],
) -> ServiceStatus:
    pid_file = pid_file_path(settings, name, port)
    pid, ours = managed_pid(settings, name, port)
    if pid is None:
        note = "nothing started by erc-stream here"
    elif not ours:
        note = f"removed stale pid file (pid {pid} was not running)"
    else:
        killed = stop_pid(pid, timeout_s)
        started_children.pop(pid, None)
        note = f"stopped pid {pid}" + (" (SIGKILL after timeout)" if killed else "")
        log.info(f"{name}.stopped", pid=pid, killed=killed, address=fmt_address(host, port))
    pid_file.unlink(missing_ok=True)
    after = status(settings)
    return ServiceStatus(name, after.address, after.running, False, None, f"{note}; now: {after.detail}")
