"""``erc-stream notify``: alerts from the alerts topic to people, through webhooks.

Each alert goes to every target (``notify.targets``) whose tenants and rules it matches, as the alert record
(``kind: json``) or a Slack-compatible ``{"text": ...}`` (``kind: slack``), with ``Idempotency-Key: <alert_id>``.

Delivery guarantees, per (alert, target):

- **at least once**: the group's offsets are committed only after every alert of a poll reached every target
  it routes to, or was dead-lettered; a notifier that dies before re-reads those alerts;
- **never twice to a target that answered**: an (alert, target) that a target accepted (2xx) is remembered in
  Redis (key ``<prefix>:notify:sent:{<target>}:<alert_id>``, ``notify.sent_ttl_s``) before the offset commit, and skipped
  when the alert comes again (a restart, a redelivered copy, a second copy on the topic). The one window left is
  a notifier killed between a target's 2xx and the Redis write: that alert is sent again, with the same
  ``Idempotency-Key``, which a receiver can dedupe on;
- **retries with backoff** for timeouts, connection errors, 408, 429 and 5xx: ``notify.attempts`` tries,
  ``notify.backoff_s`` doubling up to ``notify.backoff_max_s`` (a ``Retry-After`` in seconds is honoured);
- **a dead letter** (``error_type: notify_refused`` on the dead-letter topic, the alert as its original value)
  for an alert a target refused for good (another 4xx) or that failed every try; it is then not retried.

While Redis is down the notifier waits (it cannot tell what was sent) and commits nothing. Metrics (``/metrics``
on ``notify.metrics_port``, the consumer's ``metrics.host`` and ``metrics.token``):
``erc_notify_delivered_total{target}``, ``erc_notify_skipped_total{target}`` (already delivered),
``erc_notify_failures_total{target,reason}``, ``erc_notify_dead_letters_total{target}``,
``erc_notify_delivery_seconds{target}``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import httpx
import redis
import structlog
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from consumer.redis_client import connect
from core.records import Alert, DeadLetter
from core.settings import NotifyTarget, Settings
from outputs.follow import Follower, Record

log = structlog.get_logger(__name__)

#: Status codes worth another try (the rest of 4xx is a refusal).
RETRY_STATUS = frozenset({408, 425, 429})


class NotifyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.delivered = Counter("erc_notify_delivered_total", "Alerts a target accepted.", ["target"],
                                 registry=self.registry)
        self.skipped = Counter("erc_notify_skipped_total", "Alerts not sent again: the target already has them.",
                               ["target"], registry=self.registry)
        self.failures = Counter("erc_notify_failures_total", "Failed delivery attempts.", ["target", "reason"],
                                registry=self.registry)
        self.dead = Counter("erc_notify_dead_letters_total", "Alerts a target refused for good, dead-lettered.",
                            ["target"], registry=self.registry)
        self.seconds = Histogram("erc_notify_delivery_seconds", "One delivery attempt.", ["target"],
                                 registry=self.registry)
        self.last_beat = time.monotonic()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    reason: str = ""  # why not: the last error
    final: bool = False  # a refusal: no retry


def routes(alert: Alert, targets: tuple[NotifyTarget, ...]) -> list[NotifyTarget]:
    """The targets an alert goes to: those whose tenants and rules it matches (None matches every one)."""
    return [t for t in targets
            if (t.tenants is None or alert.tenant in t.tenants) and (t.rules is None or alert.rule in t.rules)]


def payload(alert: Alert, target: NotifyTarget) -> dict:
    if target.kind == "slack":
        where = f" in conversation {alert.conversation_id}" if alert.conversation_id else ""
        lines = [f"*{alert.severity.upper()}* {alert.rule}{where}" + (f" ({alert.tenant})" if alert.tenant else ""),
                 alert.summary]
        lines += [f"> #{e.turn} {e.speaker}: {e.label} ({e.probability:.0%})" for e in alert.evidence[:5]]
        return {"text": "\n".join(lines)}
    return json.loads(alert.to_bytes())


class Notifier:
    """Follows the alerts topic in ``notify.group_id`` and delivers each alert to its targets (see the module)."""

    def __init__(self, settings: Settings, *, http: httpx.Client | None = None) -> None:
        self.settings = settings
        self.n = settings.notify
        self.metrics = NotifyMetrics()
        self.redis = connect(settings.redis)
        self.http = http or httpx.Client(timeout=self.n.timeout_s)
        self.producer = KafkaProducer(**settings.kafka.client_options(), acks="all",
                                      client_id=f"{settings.kafka.client_id}-notify")
        self._pending: list[tuple[Alert, int, int]] = []  # alert, its partition and offset
        self.follower = Follower(settings, group_id=self.n.group_id, topics=[settings.kafka.alerts_topic],
                                 handle=self._take, lookback_s=self.n.start_lookback_s, auto_commit=False,
                                 client="notify")
        self._stop = threading.Event()

    def _take(self, record: Record) -> None:
        if isinstance(record, Alert):
            r = self.follower.current
            self._pending.append((record, r.partition, r.offset))

    def _key(self, target: NotifyTarget, alert: Alert) -> str:
        return f"{self.settings.redis.key_prefix}:notify:sent:{{{target.name}}}:{alert.alert_id}"

    def run(self, *, idle_exit_s: float | None = None) -> None:
        """Poll, deliver, commit, until stopped (or idle for ``idle_exit_s``)."""
        idle_since = time.monotonic()
        while not self._stop.is_set():
            self.metrics.last_beat = time.monotonic()
            self._pending = []
            if self.follower.poll(timeout_ms=500):
                idle_since = time.monotonic()
            for alert, partition, offset in self._pending:
                for target in routes(alert, self.n.targets):
                    if self._stop.is_set():
                        return  # stopped mid-poll: nothing committed; the next run re-reads these alerts and
                        # skips what was delivered
                    self._deliver(alert, target, (partition, offset))
            if self._pending:
                self.producer.flush()  # dead letters written before the offsets move
                self.follower.consumer.commit()
            elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                return

    def serve_metrics(self):
        """/metrics (and /healthz) on ``notify.metrics_port``, bound and protected like the consumer's."""
        from consumer.metrics import start_http_server

        m = self.settings.metrics
        return start_http_server(self.metrics, host=m.host, port=self.n.metrics_port,  # type: ignore[arg-type]
                                 liveness_timeout_s=m.liveness_timeout_s, ready=lambda: (True, {}),
                                 token=m.token.get_secret_value() if m.token else None)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.follower.close()
        self.producer.close()
        self.http.close()

    def _done(self, alert: Alert, target: NotifyTarget) -> bool:
        return bool(self._redis(lambda: self.redis.exists(self._key(target, alert))))

    def _deliver(self, alert: Alert, target: NotifyTarget, source: tuple[int, int]) -> None:
        if self._done(alert, target):
            self.metrics.skipped.labels(target.name).inc()
            return
        delay = self.n.backoff_s
        outcome = Outcome(False, "no attempt")
        for attempt in range(1, self.n.attempts + 1):
            outcome = self._attempt(alert, target)
            if outcome.delivered:
                self._redis(lambda: self._remember(alert, target))
                self.metrics.delivered.labels(target.name).inc()
                log.info("alert delivered", target=target.name, alert_id=alert.alert_id, attempt=attempt)
                return
            if outcome.final or attempt == self.n.attempts or self._stop.wait(delay):
                break
            delay = min(delay * 2, self.n.backoff_max_s)
        if self._stop.is_set() and not outcome.final:
            return  # shutting down: not a refusal, the alert is read again after the restart
        self._dead_letter(alert, target, outcome, source)

    def _attempt(self, alert: Alert, target: NotifyTarget) -> Outcome:
        headers = {"Idempotency-Key": alert.alert_id, "Content-Type": "application/json"}
        if target.token is not None:
            headers["Authorization"] = f"Bearer {target.token.get_secret_value()}"
        started = time.monotonic()
        try:
            r = self.http.post(target.url, json=payload(alert, target), headers=headers)
        except httpx.HTTPError as e:
            self.metrics.failures.labels(target.name, type(e).__name__).inc()
            return Outcome(False, f"{type(e).__name__}: {e}")
        finally:
            self.metrics.seconds.labels(target.name).observe(time.monotonic() - started)
        if r.is_success:
            return Outcome(True)
        self.metrics.failures.labels(target.name, str(r.status_code)).inc()
        reason = f"HTTP {r.status_code}: {r.text[:200]}"
        if r.status_code < 500 and r.status_code not in RETRY_STATUS:
            return Outcome(False, reason, final=True)
        return Outcome(False, reason)

    def _remember(self, alert: Alert, target: NotifyTarget) -> None:
        self.redis.set(self._key(target, alert), int(time.time()), ex=self.n.sent_ttl_s)

    def _dead_letter(self, alert: Alert, target: NotifyTarget, outcome: Outcome, source: tuple[int, int]) -> None:
        k = self.settings.kafka
        letter = DeadLetter.for_record(
            error_type="notify_refused", reason=f"target {target.name!r}: {outcome.reason}", topic=k.alerts_topic,
            partition=source[0], offset=source[1], value=alert.to_bytes(), key=(alert.conversation_id or alert.tenant or "").encode(),
            stage=f"notify:{target.name}", max_original_bytes=k.dlq_max_original_bytes)
        self.producer.send(k.dlq_topic, key=alert.alert_id.encode(), value=letter.to_bytes())
        self._redis(lambda: self._remember(alert, target))  # handled: a dead-lettered alert is not retried
        self.metrics.dead.labels(target.name).inc()
        log.warning("alert dead-lettered", target=target.name, alert_id=alert.alert_id, reason=outcome.reason)

    def _redis(self, call):
        """A Redis call, waited for while Redis is down (what was sent is unknown without it)."""
        delay = 0.5
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("redis unreachable; notifier waiting", error=str(e), retry_in_s=delay)
                if self._stop.wait(delay):
                    raise
                delay = min(delay * 2, 30.0)
