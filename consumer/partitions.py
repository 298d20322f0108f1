"""The member's input partitions: polling a stream batch from them, what it holds (rebalances), seeking a batch
back, pausing them while Redis is away, and their lag gauge.

The rebalance listener runs on kafka-python's IO thread: before partitions go, the offsets of their finished
but uncommitted batches are committed (``delivery.commit_interval_ms``), so their next owner does not redo them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import redis
import structlog
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaConnectionError

from consumer.delivery import Emitter
from consumer.metrics import ConsumerMetrics
from consumer.pipeline import REDIS_DOWN, Polled
from core.settings import BatchSettings

log = structlog.get_logger(__name__)


def _names(partitions) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)


class Partitions(AsyncConsumerRebalanceListener):
    """The partitions this member holds, kept by the group's rebalances; read by readiness and the lag gauge."""

    def __init__(self, consumer: KafkaConsumer, emitter: Emitter, metrics: ConsumerMetrics) -> None:
        self.consumer = consumer
        self.emitter = emitter
        self.metrics = metrics
        self.held: set[TopicPartition] = set()
        self.paused_for_redis = False
        self._lag_at = 0.0

    # -- rebalances (IO thread) --------------------------------------------------------------

    async def on_partitions_revoked(self, revoked):
        pending = {tp: meta for tp, meta in self.emitter.pending().items() if tp in revoked}
        if pending:
            try:
                await self.consumer.commit_async(offsets=pending)
                self.metrics.commits_on_revoke.inc()
                log.info("committed on revoke", offsets={f"{tp.topic}/{tp.partition}": m.offset
                                                        for tp, m in pending.items()})
            except Exception as e:  # noqa: BLE001 - their new owner redelivers from the last commit
                log.warning("commit on revoke failed; those records will be redelivered", error=repr(e))
            self.emitter.drop_pending(pending)
        self._release(revoked)
        log.info("partitions revoked", partitions=_names(revoked))

    async def on_partitions_assigned(self, assigned):
        if self.paused_for_redis and assigned:
            self.consumer.pause(*assigned)
        self.held.update(assigned)
        self.metrics.assigned_partitions.set(len(self.held))
        self._lag_at = 0.0  # recompute the lag of the new assignment at the next iteration
        log.info("partitions assigned", partitions=_names(assigned))

    async def on_partitions_lost(self, lost):
        self.emitter.drop_pending(lost)  # evicted: a commit would be refused
        self._release(lost)
        log.warning("partitions lost", partitions=_names(lost))

    def _release(self, partitions) -> None:
        self.held.difference_update(partitions)
        self.metrics.assigned_partitions.set(len(self.held))

    # -- the main loop's side ----------------------------------------------------------------

    def poll_batch(self, batch_settings: BatchSettings, stop: threading.Event) -> list[Polled]:
        """A stream batch: up to ``batch.stream_records`` records, waiting at most ``batch.max_wait_ms`` after
        the first one."""
        max_records = batch_settings.stream_records
        max_wait = batch_settings.max_wait_ms / 1000
        batch: list[Polled] = []
        deadline: float | None = None
        while len(batch) < max_records and not stop.is_set():
            timeout_s = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records - len(batch))
            except KafkaConnectionError:
                if batch:  # records already taken must be processed, or the next commit would skip them
                    return batch
                raise
            now = time.monotonic()
            for records in polled.values():
                batch.extend(Polled(r, now) for r in records)
            if not batch:
                return batch
            if deadline is None:
                deadline = now + max_wait
            if now >= deadline:
                break
        return batch

    def rewind(self, batch: Sequence[Polled]) -> None:
        """Seek every partition of the batch back to its first record: the next poll returns it again."""
        first: dict[TopicPartition, int] = {}
        for item in batch:
            r = item.record
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
        self.metrics.rewinds.inc()

    def wait_for_redis(self, client: redis.Redis, stop: threading.Event, delay: float, cap: float) -> None:
        """Pause every partition, keep polling (the member stays in its group), retry Redis with backoff
        from ``delay`` up to ``cap`` seconds."""
        self.metrics.redis_outages.inc()
        self.paused_for_redis = True
        try:
            while not stop.is_set():
                self.metrics.beat()  # paused on purpose, not wedged
                assigned = self.consumer.assignment()
                if assigned:
                    self.consumer.pause(*assigned)
                began = time.monotonic()
                polled = self.consumer.poll(timeout_ms=int(delay * 1000))
                for tp, records in polled.items():  # none expected (paused); never skip any
                    self.consumer.seek(tp, min(r.offset for r in records))
                rest = delay - (time.monotonic() - began)
                if rest > 0:
                    stop.wait(rest)
                try:
                    client.ping()
                    break
                except REDIS_DOWN as e:
                    self.metrics.redis_errors.labels("ping").inc()
                    delay = min(cap, delay * 2)
                    log.warning("redis still unavailable", error=str(e), retry_in_s=delay)
        finally:
            self.paused_for_redis = False
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.resume(*assigned)

    def update_lag(self, interval_s: float, *, force: bool = False) -> None:
        """Per-partition lag, highwater (from fetch responses) minus position, every ``interval_s``."""
        now = time.monotonic()
        if not force and now - self._lag_at < interval_s:
            return
        self._lag_at = now
        lags: dict[tuple[str, int], int] = {}
        for tp in self.consumer.assignment():
            try:
                high = self.consumer.highwater(tp)
                position = self.consumer.position(tp, timeout_ms=200)
            except Exception:  # noqa: BLE001 - revoked meanwhile, or no position yet: next time
                continue
            lags[(tp.topic, tp.partition)] = max(0, high - position) if high is not None and position is not None else 0
        self.metrics.set_lag(lags)
