"""Checkpointing one stream batch: emit its outcome, flush, check every ack, commit its offsets — in that order.

The two delivery modes (:mod:`consumer.delivery`) differ in how the last two steps happen: at-least-once
flushes, checks the acks, then commits the offsets (now, or at the next ``delivery.commit_interval_ms``);
transactional commits outputs and offsets in one Kafka transaction. Either way nothing of a batch is
committed before all of it was acknowledged, and a failure anywhere aborts the batch (the loop rewinds and
redoes it; the redo emits the same event ids). Alert ids are recorded as sent only after their ack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from consumer.delivery import Emitter, FatalDeliveryError, Offsets
from consumer.metrics import ConsumerMetrics
from consumer.pipeline import REDIS_DOWN, Outcome, Polled
from consumer.record_batches import SkippedBatch
from core.records import Alert
from core.settings import Settings

log = structlog.get_logger(__name__)


class SentAlerts(Protocol):
    def mark_sent(self, alerts: Sequence[Alert]) -> None: ...


class Checkpoint:
    """Delivers each batch's outcome and commits its offsets through one emitter, on one consumer."""

    def __init__(self, settings: Settings, emitter: Emitter, consumer: KafkaConsumer, alerts: SentAlerts,
                 metrics: ConsumerMetrics) -> None:
        self.settings = settings
        self.emitter = emitter
        self.consumer = consumer
        self.alerts = alerts
        self.metrics = metrics

    def deliver(self, batch: Sequence[Polled], outcome: Outcome) -> None:
        """Emit → flush → acks → commit. Raises DeliveryError (redo the batch) or FatalDeliveryError (exit)."""
        k = self.settings.kafka
        self.emitter.begin()
        try:
            for event, msg in outcome.events:
                self.emitter.send(k.output_topic, msg.conversation_id.encode(), event.to_bytes())
            for alert in outcome.alerts:
                key = alert.conversation_id if alert.conversation_id is not None else (alert.tenant or "")
                self.emitter.send(k.alerts_topic, key.encode(), alert.to_bytes())
            for d in outcome.dead:
                self.emitter.send(k.dlq_topic, None, d.to_bytes())
            self.emitter.finish(offsets(batch), self.consumer)
        except FatalDeliveryError:
            raise
        except BaseException:
            self.emitter.abort()
            raise
        try:
            self.alerts.mark_sent(outcome.alerts)
        except REDIS_DOWN as e:  # delivered already; at worst a redelivery sends them again, same ids
            self.metrics.redis_errors.labels("alerts").inc()
            log.warning("could not record sent alerts", error=str(e), alerts=[a.alert_id for a in outcome.alerts])

    def commit_pending(self, *, force: bool = False) -> None:
        """Commit the offsets of finished batches not committed yet (at-least-once with an interval)."""
        self.emitter.commit_pending(self.consumer, force=force)

    def close(self, *, fatal: bool = False) -> None:
        if not fatal:
            self.commit_pending(force=True)
        self.emitter.close(timeout_s=1 if fatal else 10)


def offsets(batch: Sequence[Polled]) -> Offsets:
    """The offsets that commit ``batch``: one past its last record (or skipped record batch), per partition."""
    ends: dict[TopicPartition, int] = {}
    for item in batch:
        r = item.record
        tp = TopicPartition(r.topic, r.partition)
        ends[tp] = max(ends.get(tp, -1), r.end if isinstance(r, SkippedBatch) else r.offset + 1)
    return {tp: OffsetAndMetadata(o, "", -1) for tp, o in ends.items()}
