"""The stream: consume → validate → window in Redis → prompt → micro-batched inference → emit → commit.

Delivery is at-least-once. A batch's offsets are committed only after every event and dead letter
of that batch has been acknowledged by the broker (``acks=all``); a crash before that replays the
batch, and the replay yields the same ``event_id``s (they are derived from message id, model and
adapter), so readers can drop the copies. Processing is synchronous within ``poll``'s thread, so
when a rebalance revokes partitions there is never an uncommitted, half-done batch.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import redis
import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from consumer.labeler import Failed, Labeler
from consumer.validation import decode
from consumer.window_store import WindowStore, WindowTurn
from erc_stream.labels import get_label_set
from erc_stream.schemas import ChatMessage, DeadLetter, EmotionEvent, utcnow
from erc_stream.settings import Settings
from model_store.backends.base import Backend
from model_store.loading import choose_adapter
from model_store.registry import Registry
from model_store.prompts import PromptBuilder

log = structlog.get_logger(__name__)


@dataclass
class StreamStats:
    """Counters of one consumer process (the demo's summary and, later, the metrics endpoint read them)."""

    consumed: int = 0
    events: int = 0
    dead_letters: int = 0
    batches: int = 0
    dead_by_type: Counter = field(default_factory=Counter)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=100_000))
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Polled:
    record: object  # kafka ConsumerRecord
    received: float  # time.monotonic() at poll return


class _Rebalance(ConsumerRebalanceListener):
    def on_partitions_revoked(self, revoked):  # noqa: D401 - kafka-python callback
        # Nothing to flush: batches are committed before poll() is called again.
        log.info("partitions revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))

    def on_partitions_assigned(self, assigned):
        log.info("partitions assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class StreamApp:
    """One consumer-group member running the whole pipeline."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        *,
        adapter: str | None = None,
        on_event: Callable[[EmotionEvent, ChatMessage], None] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.stats = StreamStats()
        self.on_event = on_event
        self._stop = threading.Event()
        label_set = get_label_set(settings.model.label_set)
        builder = PromptBuilder(
            label_set,
            max_tokens=settings.model.max_prompt_tokens,
            count_tokens=backend.count_tokens,
            demo_position=settings.model.demo_position,
            max_turn_chars=settings.window.max_turn_chars,
        )
        self.labeler = Labeler(backend, builder, adapter=adapter)
        self._registry = Registry(settings.store.dir)
        self._registry_version = self._registry.version()
        self._registry_checked = time.monotonic()
        self.redis = redis.Redis.from_url(
            settings.redis.url.get_secret_value(),
            socket_timeout=settings.redis.socket_timeout_s,
            socket_connect_timeout=settings.redis.socket_timeout_s,
        )
        self.windows = WindowStore(
            self.redis,
            prefix=settings.redis.key_prefix,
            size=settings.window.size,
            retain=settings.window.retain,
            ttl_s=settings.window.ttl_s,
        )
        k = settings.kafka
        self.consumer = KafkaConsumer(
            group_id=k.group_id,
            client_id=k.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=settings.batch.max_size,
            fetch_max_bytes=max(52_428_800, k.max_message_bytes * 2),
            max_partition_fetch_bytes=max(1_048_576, k.max_message_bytes * 2),
            **k.client_options(),
        )
        self.consumer.subscribe([k.input_topic], listener=_Rebalance())
        self.producer = KafkaProducer(
            acks="all", linger_ms=5, retries=5, max_request_size=max(1_048_576, k.max_message_bytes * 2 + 4096),
            **k.client_options(),
        )

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and leave the group (safe from any thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self, *, idle_exit_s: float | None = None) -> StreamStats:
        """Process until stopped (or, with ``idle_exit_s``, until no input arrived for that long)."""
        log.info("consumer running", group=self.settings.kafka.group_id, topic=self.settings.kafka.input_topic,
                 model=self.backend.model_id, adapter=self.labeler.adapter, label_set=self.settings.model.label_set)
        last_input = time.monotonic()
        try:
            while not self._stop.is_set():
                self._follow_registry()
                batch = self._poll_batch()
                if batch:
                    self._process(batch)
                    last_input = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last_input > idle_exit_s:
                    break
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        try:
            self.producer.flush(timeout=10)
            self.producer.close(timeout=10)
        finally:
            self.consumer.close(autocommit=False)  # leaves the group; offsets were committed per batch
            self.redis.close()
            log.info("consumer stopped", consumed=self.stats.consumed, events=self.stats.events,
                     dead_letters=self.stats.dead_letters)

    def _follow_registry(self) -> None:
        """Between batches: if no adapter is pinned in settings, switch to a newly promoted one."""
        if self.settings.model.adapter is not None or self.settings.model.backend == "null":
            return
        now = time.monotonic()
        if now - self._registry_checked < self.settings.model.adapter_poll_s:
            return
        self._registry_checked = now
        version = self._registry.version()
        if version == self._registry_version:
            return
        self._registry_version = version
        choice = choose_adapter(self.settings)
        if choice.name != self.labeler.adapter:
            log.info("adapter promoted; switching", old=self.labeler.adapter, new=choice.name)
            self.labeler.use(choice)

    # -- the pipeline ----------------------------------------------------------------------

    def _poll_batch(self) -> list[_Polled]:
        """Up to ``batch.max_size`` records, waiting at most ``batch.max_wait_ms`` after the first one."""
        max_size = self.settings.batch.max_size
        max_wait = self.settings.batch.max_wait_ms / 1000
        batch: list[_Polled] = []
        deadline: float | None = None
        while len(batch) < max_size and not self._stop.is_set():
            timeout_s = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
            polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_size - len(batch))
            now = time.monotonic()
            for records in polled.values():
                batch.extend(_Polled(r, now) for r in records)
            if not batch:
                return batch
            if deadline is None:
                deadline = now + max_wait
            if now >= deadline:
                break
        return batch

    def _process(self, batch: list[_Polled]) -> None:
        k = self.settings.kafka
        self.stats.consumed += len(batch)
        valid: list[tuple[_Polled, ChatMessage]] = []
        dead: list[DeadLetter] = []
        for item in batch:
            r = item.record
            decoded = decode(r.value, key=r.key, topic=r.topic, partition=r.partition, offset=r.offset,
                             max_bytes=k.max_message_bytes)
            if isinstance(decoded, DeadLetter):
                dead.append(decoded)
            else:
                valid.append((item, decoded))

        updates = self._retry_redis(lambda: self.windows.append_many(
            [(m.conversation_id, WindowTurn(m.turn, m.speaker, m.text, m.message_id)) for _, m in valid]
        ))
        valid, updates = self._drop_conflicts(valid, updates, dead)
        results = self.labeler.label([[t.as_prompt_turn() for t in u.window] for u in updates]) if valid else []

        futures = []
        label_set = self.labeler.label_set
        for (item, msg), result in zip(valid, results):
            r = item.record
            if isinstance(result, Failed):
                dead.append(DeadLetter.for_record(
                    error_type="inference", reason=result.error, topic=r.topic, partition=r.partition,
                    offset=r.offset, value=r.value, key=r.key,
                ))
                continue
            event = EmotionEvent(
                event_id=EmotionEvent.make_id(msg.message_id, self.backend.model_id, self.labeler.adapter),
                message_id=msg.message_id,
                conversation_id=msg.conversation_id,
                turn=msg.turn,
                speaker=msg.speaker,
                tenant=msg.tenant,
                label=result.label,
                probabilities=result.probabilities,
                label_set=label_set.name,
                model=self.backend.model_id,
                adapter=self.labeler.adapter,
                window=result.turns_used,
                latency_ms=round((time.monotonic() - item.received) * 1000, 3),
                emitted_at=utcnow(),
                gold_label=label_set.map_gold(msg.gold_label) if msg.gold_label else None,
            )
            futures.append(self.producer.send(k.output_topic, key=msg.conversation_id.encode(), value=event.to_bytes()))
            self.stats.latencies_ms.append(event.latency_ms)
            if self.on_event:
                self.on_event(event, msg)
        for d in dead:
            futures.append(self.producer.send(k.dlq_topic, value=d.to_bytes()))
            self.stats.dead_by_type[d.error_type] += 1
            log.warning("dead letter", error_type=d.error_type, reason=d.reason[:200],
                        partition=d.source_partition, offset=d.source_offset)
        self.producer.flush()
        for f in futures:
            f.get(timeout=k.request_timeout_ms / 1000)  # raises if the broker did not take it: no commit
        self.consumer.commit(offsets=self._offsets(batch))
        self.stats.events += len(futures) - len(dead)
        self.stats.dead_letters += len(dead)
        self.stats.batches += 1

    @staticmethod
    def _drop_conflicts(valid, updates, dead: list[DeadLetter]):
        """A different message claiming a turn that is already stored is dead-lettered, not labelled.

        A redelivery of the same message (same id) is fine: it gets its event again, with the same id.
        """
        keep = []
        for (item, msg), u in zip(valid, updates):
            stored = u.window[-1].message_id
            if not u.added and stored != msg.message_id:
                r = item.record
                dead.append(DeadLetter.for_record(
                    error_type="conflict",
                    reason=f"turn {msg.turn} of conversation {msg.conversation_id!r} already holds message {stored!r}",
                    topic=r.topic, partition=r.partition, offset=r.offset, value=r.value, key=r.key,
                ))
            else:
                keep.append(((item, msg), u))
        return [p for p, _ in keep], [u for _, u in keep]

    @staticmethod
    def _offsets(batch: list[_Polled]) -> dict[TopicPartition, OffsetAndMetadata]:
        offsets: dict[TopicPartition, int] = {}
        for item in batch:
            r = item.record
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        return {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}

    def _retry_redis(self, op):
        """Redis unreachable: keep the batch, back off (0.1 s → 10 s) and retry until it answers or we stop."""
        delay = 0.1
        while True:
            try:
                return op()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if self._stop.is_set():
                    raise
                log.warning("redis unavailable; retrying", error=str(e), retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
