"""``erc-stream notify``: alerts from the alerts topic to people, through webhooks.

Each alert goes to every target (``notify.targets``) whose tenants and rules it matches, as the alert record
(``kind: json``) or Slack text (``kind: slack``), with ``Idempotency-Key: <alert_id>``; during a storm, the alerts
of one (tenant, rule) are folded into summaries (``Idempotency-Key: <summary_id>``), one per group and
``notify.group_interval_s`` (:mod:`outputs.notify_groups`, :mod:`outputs.notify_payloads`).

Each target is served by a worker thread of its own with a bounded backlog (:mod:`outputs.notify_worker`): a
target that fails, or is slow, delays no other. This module polls the topic, routes, and commits.

Delivery guarantees, per (alert, target):

- **nothing lost**: every alert reaches each target it routes to alone or counted in a delivered summary (which
  lists its id), or is dead-lettered for that target (``error_type: notify_refused``, the alert as its original
  value): refused (a 4xx other than 408/425/429), failed every try, or the target failing with its backlog full
  (``notify.backlog_max``). A partition's offsets are committed only up to its first alert that is not yet so for
  every target (and after the dead letters' acks): a notifier that dies re-reads the rest;
- **never twice to a target that answered**: what a target accepted (2xx) is remembered in Redis, alerts and
  summaries (:mod:`outputs.notify_ledger`), before the commit, and skipped when it comes again (a restart, a
  redelivered copy, a second copy on the topic). The one window left is a notifier killed between a target's 2xx
  and the Redis write: that notification is sent again, an alert with the same ``Idempotency-Key``, which a
  receiver can dedupe on;
- **retries with backoff** for timeouts, connection errors, 408, 425, 429 and 5xx: ``notify.attempts`` tries,
  ``notify.backoff_s`` doubling up to ``notify.backoff_max_s``, at least what a ``Retry-After`` asks on 429/503
  (up to ``notify.backoff_max_s``); a response body is read for at most 4 KiB.

While Redis is down the notifier waits (it cannot tell what was sent) and commits no further. Metrics: see
:mod:`outputs.notify_metrics`. Logs and dead letters name a target by its ``name``, never by its URL or token.
"""

from __future__ import annotations

import threading
import time

import httpx
import structlog
from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from core.records import Alert, DeadLetter
from core.redis_client import connect
from core.settings import NotifyTarget, Settings
from outputs.follow import Follower, Record
from outputs.notify_ledger import Ledger
from outputs.notify_metrics import NotifyMetrics
from outputs.notify_offsets import OffsetTracker, Ticket
from outputs.notify_payloads import payload
from outputs.notify_worker import TargetWorker

__all__ = ["Notifier", "NotifyMetrics", "payload", "routes"]

log = structlog.get_logger(__name__)

def routes(alert: Alert, targets: tuple[NotifyTarget, ...]) -> list[NotifyTarget]:
    """The targets an alert goes to: those whose tenants and rules it matches (None matches every one)."""
    return [t for t in targets
            if (t.tenants is None or alert.tenant in t.tenants) and (t.rules is None or alert.rule in t.rules)]


class Notifier:
    """Follows the alerts topic in ``notify.group_id`` and hands each alert to its targets' workers (see the
    module); commits what they finished."""

    def __init__(self, settings: Settings, *, http: httpx.Client | None = None) -> None:
        self.settings = settings
        self.n = settings.notify
        self.metrics = NotifyMetrics()
        self._stop = threading.Event()
        self.redis = connect(settings.redis)
        self.ledger = Ledger(self.redis, prefix=settings.redis.key_prefix, sent_ttl_s=self.n.sent_ttl_s,
                             interval_s=self.n.group_interval_s, stop=self._stop)
        self.producer = KafkaProducer(**settings.kafka.client_options(), acks="all",
                                      client_id=f"{settings.kafka.client_id}-notify")
        self.tracker = OffsetTracker()
        self.workers = {t.name: TargetWorker(t, self.n, ledger=self.ledger, metrics=self.metrics,
                                             dead_letter=self._dead_letter, stop=self._stop, http=http)
                        for t in self.n.targets}
        self._committed: dict[TopicPartition, int] = {}
        self.follower = Follower(settings, group_id=self.n.group_id, topics=[settings.kafka.alerts_topic],
                                 handle=self._take, lookback_s=self.n.start_lookback_s, auto_commit=False,
                                 client="notify")

    def _take(self, record: Record) -> None:
        if not isinstance(record, Alert):
            return
        r = self.follower.current
        targets = routes(record, self.n.targets)
        ticket = self.tracker.open(TopicPartition(r.topic, r.partition), r.offset, len(targets))
        for target in targets:
            self.workers[target.name].submit(record, ticket)

    def run(self, *, idle_exit_s: float | None = None) -> None:
        """Poll and commit until stopped (or idle, with nothing in flight, for ``idle_exit_s``)."""
        for worker in self.workers.values():
            worker.start()
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                self.metrics.last_beat = time.monotonic()
                handed = self.follower.poll(timeout_ms=200)
                if handed or self.tracker.pending() or not self.follower.assigned:  # idle: caught up, all done
                    idle_since = time.monotonic()
                self._commit()
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    return
        finally:
            self._stop.set()
            for worker in self.workers.values():
                worker.wake()
            for worker in self.workers.values():
                worker.join(60)
            try:
                self._commit()  # what was finished before the stop
            except Exception as e:  # noqa: BLE001 - the next run re-reads it, and skips what was delivered
                log.warning("notifier's last commit failed", error=f"{type(e).__name__}: {e}")

    def _commit(self) -> None:
        """Each assigned partition's offset, up to its first unfinished alert."""
        consumer = self.follower.consumer
        offsets = {}
        for tp in consumer.assignment():
            first = self.tracker.first_open(tp)
            try:
                at = first if first is not None else consumer.position(tp)
            except KafkaError:  # revoked meanwhile: no longer ours to commit
                continue
            if at is not None and self._committed.get(tp) != at:
                offsets[tp] = OffsetAndMetadata(at, "", -1)
        if not offsets:
            return
        self.producer.flush()  # dead letters are acked one by one already; nothing is left behind the offsets
        try:
            consumer.commit(offsets)
        except KafkaError as e:  # a rebalance under way: the next round commits what is still ours
            log.warning("notifier commit failed; retrying", error=f"{type(e).__name__}: {e}")
            return
        self._committed.update({tp: o.offset for tp, o in offsets.items()})

    def serve_metrics(self):
        """/metrics (and /healthz) on ``notify.metrics_port``, bound and protected like the consumer's."""
        from core.http_endpoint import start_http_server

        m = self.settings.metrics
        return start_http_server(self.metrics, host=m.host, port=self.n.metrics_port,  # type: ignore[arg-type]
                                 liveness_timeout_s=m.liveness_timeout_s, ready=lambda: (True, {}),
                                 token=m.token.get_secret_value() if m.token else None)

    def stop(self) -> None:
        self._stop.set()
        for worker in self.workers.values():
            worker.wake()

    def close(self) -> None:
        self.follower.close()
        self.producer.close()
        for worker in self.workers.values():
            worker.close()

    def _dead_letter(self, alert: Alert, ticket: Ticket, target: NotifyTarget, reason: str) -> FutureRecordMetadata:
        """One alert dead-lettered for ``target``; the caller waits for the ack before it counts as handled."""
        k = self.settings.kafka
        letter = DeadLetter.for_record(
            error_type="notify_refused", reason=f"target {target.name!r}: {reason}", topic=k.alerts_topic,
            partition=ticket.partition, offset=ticket.offset, value=alert.to_bytes(),
            key=(alert.conversation_id or alert.tenant or "").encode(), stage=f"notify:{target.name}",
            max_original_bytes=k.dlq_max_original_bytes)
        return self.producer.send(k.dlq_topic, key=alert.alert_id.encode(), value=letter.to_bytes())
