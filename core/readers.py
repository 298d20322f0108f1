"""Reading erc-stream's output topics the way every reader of the project must: deduplicated by ``event_id``.

Delivery is at-least-once by default: a crash between a batch's acks and its offset commit emits the
batch's events again, with the same ``event_id`` (uuid5 of message id, model and adapter). Readers
keep the first copy of each id and count the rest. In transactional mode readers use
``read_committed`` (set here from ``delivery.mode``); on Apache Kafka that alone removes the copies,
elsewhere the deduplication still does.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition

from core.records import Alert, DeadLetter, EmotionEvent
from core.settings import ExportSettings, Settings


class Deduper:
    """Remembers the last ``capacity`` ids; ``first(id)`` is True once per id (while remembered).

    Bounded, because a reader that follows a topic for months would otherwise hold every id it ever saw: the
    readers of this module and the exporter take ``export.dedupe_ids`` (the default here), ~165 B an id
    (docs/capacity.md). Copies come from redelivered batches, minutes apart at most, so the bound only needs to
    span a few stream batches of every partition."""

    def __init__(self, capacity: int = ExportSettings.model_fields["dedupe_ids"].default) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.copies = 0

    def first(self, key: str) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            self.copies += 1
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True


def isolation_level(settings: Settings) -> str:
    return "read_committed" if settings.delivery.mode == "transactional" else "read_uncommitted"


def read_records(
    settings: Settings, topic: str, *, follow: bool = False, timeout_s: float | None = None,
    idle_grace_s: float = 1.0,
) -> Iterator:
    """Every record of ``topic`` from the beginning, without a consumer group.

    Stops once every partition's position reached its highwater (``follow=False``) or never
    (``follow=True``), or after ``timeout_s``. Uses ``highwater()`` from fetch responses, which is
    right on every broker (tansu's ListOffsets is not).
    """
    consumer = KafkaConsumer(
        client_id=f"{settings.kafka.client_id}-reader-{uuid.uuid4().hex[:6]}", group_id=None,
        enable_auto_commit=False, auto_offset_reset="earliest", isolation_level=isolation_level(settings),
        fetch_max_bytes=max(52_428_800, settings.kafka.max_message_bytes * 4),
        max_partition_fetch_bytes=max(1_048_576, settings.kafka.max_message_bytes * 4),
        **settings.kafka.client_options(),
    )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        partitions: set[int] = set()
        while not partitions:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                time.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        quiet_since: float | None = None
        while deadline is None or time.monotonic() < deadline:
            got = False
            for records in consumer.poll(timeout_ms=200).values():
                got = got or bool(records)
                yield from records
            if follow:
                continue
            caught_up = all(
                (high := consumer.highwater(tp)) is not None and consumer.position(tp) >= high for tp in tps
            )
            if caught_up:
                return
            # A partition that never answered a fetch (empty) has no highwater: stop once quiet.
            now = time.monotonic()
            quiet_since = None if got else (quiet_since or now)
            if quiet_since is not None and now - quiet_since >= idle_grace_s:
                if all(consumer.highwater(tp) is None or consumer.position(tp) >= consumer.highwater(tp)
                       for tp in tps):
                    return
    finally:
        consumer.close()


@dataclass
class EventsRead:
    events: list[EmotionEvent]
    copies: int
    records: int


def read_events(settings: Settings, **kw) -> EventsRead:
    """All distinct emotion events of the output topic (first copy of each ``event_id``)."""
    dedupe = Deduper(settings.export.dedupe_ids)
    events: list[EmotionEvent] = []
    records = 0
    for r in read_records(settings, settings.kafka.output_topic, **kw):
        records += 1
        event = EmotionEvent.from_bytes(r.value)
        if dedupe.first(event.event_id):
            events.append(event)
    return EventsRead(events, dedupe.copies, records)


def read_dead_letters(settings: Settings, **kw) -> tuple[list[DeadLetter], int]:
    """Distinct dead letters (one per source record and stage: topic, partition, offset; the notifier's stage names
    the webhook, so two targets refusing one alert are two letters) and the copies dropped."""
    dedupe = Deduper(settings.export.dedupe_ids)
    out: list[DeadLetter] = []
    for r in read_records(settings, settings.kafka.dlq_topic, **kw):
        d = DeadLetter.from_bytes(r.value)
        stage = d.stage if d.stage and d.stage.startswith("notify:") else ""
        if dedupe.first(f"{d.source_topic}|{d.source_partition}|{d.source_offset}|{stage}"):
            out.append(d)
    return out, dedupe.copies


def read_alerts(settings: Settings, **kw) -> tuple[list[Alert], int]:
    """Distinct alerts of the alerts topic (first copy of each ``alert_id``) and the copies dropped."""
    dedupe = Deduper(settings.export.dedupe_ids)
    out: list[Alert] = []
    for r in read_records(settings, settings.kafka.alerts_topic, **kw):
        alert = Alert.from_bytes(r.value)
        if dedupe.first(alert.alert_id):
            out.append(alert)
    return out, dedupe.copies
