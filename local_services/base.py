"""What every local service shares: its names, timeouts, status record and error."""

from __future__ import annotations

from dataclasses import dataclass

KAFKA = "kafka"
REDIS = "redis"

#: How long one protocol probe may take. Short: a silent listener is "not Kafka/Redis", not "slow".
PROBE_TIMEOUT_S = 1.0
#: How long ``services_down`` waits after SIGTERM before SIGKILL. tansu drains open client
#: connections for up to ~5 s after SIGTERM (it exits at once when none are open).
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
TOPIC_ALREADY_EXISTS = 36


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
