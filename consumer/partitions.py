"""The member's input partitions: polling a stream batch from them, what it holds (rebalances), seeking a batch
back, pausing them while a part is down, and their lag gauge.

The rebalance listener runs on kafka-python's IO thread: before partitions go, the offsets of their finished
but uncommitted batches are committed (``delivery.commit_interval_ms``), so their next owner does not redo them.

A stream batch is built from several polls. A rebalance between two of them (or while the batch is processed)
can take partitions away: records taken from them before it must not be labelled, emitted or committed by this
member (their new owner reads them from the committed offset). With the classic (eager) protocol every
partition is revoked, then the new assignment comes; kafka-python keeps the position of a partition that is in
both, so its records stay valid, and only the partitions missing from the new assignment (or lost) are gone.
The listener logs each such loss with a sequence number; :meth:`Partitions.poll_batch` drops the records of
partitions gone after they were taken, and :meth:`Partitions.revoked_since` tells the loop whether its batch
lost any while it was processed.

A batch that cannot be decoded (:mod:`consumer.record_batches`) is skipped: the consumer seeks past it and the
batch carries a :class:`~consumer.record_batches.SkippedBatch` in its place, dead-lettered and committed with
the rest. No exception from fetching can end the loop: the others reach the caller as :class:`PollFailed`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import structlog
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaConnectionError

from consumer.delivery import Emitter
from consumer.metrics import ConsumerMetrics
from consumer.pipeline import Polled
from consumer.record_batches import SkippedBatch, UndecodableBatch
from core.settings import BatchSettings

log = structlog.get_logger(__name__)


class PollFailed(Exception):
    """``poll()`` raised something other than a broker connection error or an undecodable batch; nothing was
    taken. The loop backs off and polls again."""


def _names(partitions) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)


def _tp(item: Polled) -> TopicPartition:
    return TopicPartition(item.record.topic, item.record.partition)


class Partitions(AsyncConsumerRebalanceListener):
    """The partitions this member holds, kept by the group's rebalances; read by readiness and the lag gauge."""

    def __init__(self, consumer: KafkaConsumer, emitter: Emitter, metrics: ConsumerMetrics) -> None:
        self.consumer = consumer
        self.emitter = emitter
        self.metrics = metrics
        self.held: set[TopicPartition] = set()
        #: Set while consumption is paused for a part that is down (``redis``, ``backend``, ``output``):
        #: partitions assigned meanwhile are paused at once.
        self.paused_for: str | None = None
        self._lag_at = 0.0
        self._revocations = 0  # sequence number of the last loss of partitions
        self._revoking: set[TopicPartition] = set()  # revoked, not yet known whether they come back
        self._revoked: deque[tuple[int, frozenset[TopicPartition]]] = deque(maxlen=256)
        self._lock = threading.Lock()
        #: :meth:`revoked_since` this mark tells whether the last polled batch lost partitions since its last poll.
        self.batch_mark = 0

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
        self._revoking |= set(revoked)
        self.held.difference_update(revoked)
        self.metrics.assigned_partitions.set(len(self.held))
        log.info("partitions revoked", partitions=_names(revoked))

    async def on_partitions_assigned(self, assigned):
        if self.paused_for is not None and assigned:
            self.consumer.pause(*assigned)
        gone, self._revoking = self._revoking - set(assigned), set()
        if gone:
            self._gone(gone)
        self.held.update(assigned)
        self.metrics.assigned_partitions.set(len(self.held))
        self._lag_at = 0.0  # recompute the lag of the new assignment at the next iteration
        log.info("partitions assigned", partitions=_names(assigned))

    async def on_partitions_lost(self, lost):
        self.emitter.drop_pending(lost)  # evicted: a commit would be refused
        self._revoking -= set(lost)
        self._gone(lost)
        self.held.difference_update(lost)
        self.metrics.assigned_partitions.set(len(self.held))
        log.warning("partitions lost", partitions=_names(lost))

    def _gone(self, partitions) -> None:
        """Partitions this member no longer owns: records taken from them before now are not its to deliver."""
        with self._lock:
            self._revocations += 1
            self._revoked.append((self._revocations, frozenset(partitions)))

    def mark(self) -> int:
        """The current revocation sequence number (for :meth:`revoked_since`)."""
        with self._lock:
            return self._revocations

    def revoked_since(self, mark: int) -> set[TopicPartition]:
        """Partitions gone (revoked and not assigned again, or lost) after ``mark`` (all, if more losses happened
        than are kept)."""
        with self._lock:
            if self._revocations == mark:
                return set()
            if not self._revoked or self._revoked[0][0] > mark + 1:  # older entries dropped: assume the worst
                return set().union(*(p for _, p in self._revoked)) | set(self.consumer.assignment()) | self.held
            return set().union(*(p for seq, p in self._revoked if seq > mark))

    # -- the main loop's side ----------------------------------------------------------------

    def poll_batch(self, batch_settings: BatchSettings, stop: threading.Event) -> list[Polled]:
        """A stream batch: up to ``batch.stream_records`` records, waiting at most ``batch.max_wait_ms`` after
        the first one. Records of partitions revoked after they were taken are dropped; an undecodable batch
        is skipped and stands in the batch as one :class:`SkippedBatch`."""
        max_records = batch_settings.stream_records
        max_wait = batch_settings.max_wait_ms / 1000
        batch: list[Polled] = []
        deadline: float | None = None
        self.batch_mark = self.mark()
        while len(batch) < max_records and not stop.is_set():
            timeout_s = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records - len(batch))
            except UndecodableBatch as e:
                polled = self._skip(e)
            except KafkaConnectionError:
                if batch:  # records already taken must be processed, or the next commit would skip them
                    return self._still_held(batch)
                raise
            except Exception as e:  # noqa: BLE001 - no fetch error may end the loop
                self.metrics.poll_errors.inc()
                if batch:
                    log.warning("poll failed; processing what was taken", error=f"{type(e).__name__}: {e}")
                    return self._still_held(batch)
                raise PollFailed(f"{type(e).__name__}: {e}") from e
            batch = self._still_held(batch)
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

    def _still_held(self, batch: list[Polled]) -> list[Polled]:
        """``batch`` without the records of partitions revoked since they were taken."""
        gone = self.revoked_since(self.batch_mark)
        self.batch_mark = self.mark()
        kept = self.without(batch, gone)
        if len(kept) < len(batch):
            log.info("rebalance during a batch: records of revoked partitions dropped", dropped=len(batch) - len(kept),
                     partitions=_names(gone))
        return kept

    def without(self, batch: list[Polled], gone: set[TopicPartition]) -> list[Polled]:
        """``batch`` without the records of ``gone`` partitions (counted in ``erc_revoked_records_total``)."""
        if not gone:
            return batch
        kept = [item for item in batch if _tp(item) not in gone]
        self.metrics.revoked_records.inc(len(batch) - len(kept))
        return kept

    def _skip(self, e: UndecodableBatch) -> dict[TopicPartition, list]:
        """Seek past an undecodable batch; it goes on in the stream batch as one :class:`SkippedBatch`."""
        tp = TopicPartition(e.topic, e.partition)
        self.metrics.undecodable_batches.inc()
        log.error("undecodable record batch; dead-lettered and skipped", topic=e.topic, partition=e.partition,
                  first_offset=e.first, end_offset=e.end, reason=e.reason[:300])
        if tp not in self.consumer.assignment():  # revoked meanwhile: its owner meets the batch
            return {}
        self.consumer.seek(tp, e.end)
        return {tp: [SkippedBatch.of(e)]}

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

    def wait_for(self, part: str, probe: Callable[[], object], stop: threading.Event, delay: float,
                 cap: float, *, give_up_s: float = 0.0) -> bool:
        """Pause every partition, keep polling (the member stays in its group), and call ``probe`` with backoff
        from ``delay`` up to ``cap`` seconds until it returns without raising: True. False when the loop was
        stopped, or the part stayed down for ``give_up_s`` (0: never give up)."""
        self.paused_for = part
        give_up_at = time.monotonic() + give_up_s if give_up_s > 0 else None
        try:
            while not stop.is_set():
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    return False
                self.metrics.beat()  # paused on purpose, not wedged
                assigned = self.consumer.assignment()
                if assigned:
                    self.consumer.pause(*assigned)
                began = time.monotonic()
                try:
                    polled = self.consumer.poll(timeout_ms=int(delay * 1000))
                except Exception as e:  # noqa: BLE001 - paused: nothing is taken; a skipped batch is read again
                    log.debug("poll while paused failed", error=f"{type(e).__name__}: {e}")
                    polled = {}
                for tp, records in polled.items():  # none expected (paused); never skip any
                    self.consumer.seek(tp, min(r.offset for r in records))
                rest = delay - (time.monotonic() - began)
                if rest > 0:
                    stop.wait(rest)
                try:
                    probe()
                    return True
                except Exception as e:  # noqa: BLE001 - still down
                    delay = min(cap, delay * 2)
                    log.warning(f"{part} still unavailable", error=f"{type(e).__name__}: {e}"[:300], retry_in_s=delay)
        finally:
            self.paused_for = None
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.resume(*assigned)
        return False

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
