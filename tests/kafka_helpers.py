"""Raw Kafka helpers for tests: write bytes to a topic, read a whole topic back.

``read_all`` decides it has seen everything with ``consumer.highwater()`` (from fetch responses),
never ``end_offsets``: on tansu ListOffsets answers the start of the last batch + 1.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.producer.future import RecordMetadata

from core.settings import Settings

#: After ``expected`` records arrived, how long ``read_all`` keeps looking for more when it cannot
#: tell that it has caught up (e.g. read_committed behind an open transaction).
EXTRA_GRACE_S = 1.0


def produce_raw(
    settings: Settings, topic: str, items: list[tuple[bytes | None, bytes]], timeout_s: float = 30.0
) -> list[RecordMetadata]:
    """Send ``(key, value)`` pairs in order (acks=all) and wait for every ack."""
    producer = KafkaProducer(
        client_id=f"test-producer-{uuid.uuid4().hex[:6]}", acks="all", **settings.kafka.client_options()
    )
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in items]
        producer.flush(timeout=timeout_s)
        return [f.get(timeout=timeout_s) for f in futures]
    finally:
        producer.close(timeout=5)


class PacedSender(threading.Thread):
    """Sends ``(key, value)`` pairs to ``topic`` at ``rate`` per second from a thread (acks=all).

    ``sent`` counts the sends so far (a test injects faults at chosen points of the stream);
    ``join_acked()`` waits for the end and every ack and re-raises a send failure.
    """

    def __init__(self, settings: Settings, topic: str, items: list[tuple[bytes | None, bytes]], rate: float) -> None:
        super().__init__(name="paced-sender", daemon=True)
        self.settings, self.topic, self.items, self.rate = settings, topic, items, rate
        self.sent = 0
        self.error: BaseException | None = None
        self.metadata: list[RecordMetadata] = []

    def run(self) -> None:
        producer = KafkaProducer(client_id=f"test-paced-{uuid.uuid4().hex[:6]}", acks="all", linger_ms=5,
                                 **self.settings.kafka.client_options())
        try:
            t0 = time.monotonic()
            futures = []
            for i, (key, value) in enumerate(self.items):
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(producer.send(self.topic, key=key, value=value))
                self.sent = i + 1
            producer.flush(60)
            self.metadata = [f.get(30) for f in futures]
        except BaseException as e:  # noqa: BLE001 - re-raised by join_acked
            self.error = e
        finally:
            producer.close(5)

    def wait_sent(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.sent < n and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def join_acked(self, timeout_s: float = 300.0) -> list[RecordMetadata]:
        self.join(timeout_s)
        if self.error is not None:
            raise self.error
        if self.is_alive():
            raise TimeoutError(f"the sender did not finish within {timeout_s} s ({self.sent}/{len(self.items)} sent)")
        return self.metadata


def read_all(
    settings: Settings, topic: str, expected: int, timeout_s: float = 30.0, **consumer_options: Any
) -> list[ConsumerRecord]:
    """Read ``topic`` from the beginning of every partition, without a group.

    Returns once at least ``expected`` records arrived and every partition's position has reached
    its highwater (so extra records, e.g. duplicates, are returned too), or at ``timeout_s`` with
    what arrived. Sorted by (partition, offset). ``consumer_options`` go to KafkaConsumer (e.g.
    ``isolation_level="read_committed"``).
    """
    deadline = time.monotonic() + timeout_s
    options: dict[str, Any] = {
        "client_id": f"test-reader-{uuid.uuid4().hex[:6]}",
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        **settings.kafka.client_options(),
        **consumer_options,
    }
    consumer = KafkaConsumer(**options)
    records: list[ConsumerRecord] = []
    try:
        partitions: set[int] = set()
        while not partitions:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                if time.monotonic() >= deadline:
                    return []
                time.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)

        def caught_up() -> bool:
            for tp in tps:
                high = consumer.highwater(tp)
                if high is None or consumer.position(tp) < high:
                    return False
            return True

        grace_until: float | None = None
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=100).values():
                records.extend(batch)
            if len(records) >= expected:
                if caught_up():
                    break
                now = time.monotonic()
                grace_until = grace_until or now + EXTRA_GRACE_S
                if now >= grace_until:
                    break
    finally:
        consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))


def committed_offsets(settings: Settings) -> dict[int, int | None]:
    """The group's committed offset of each input partition (None where nothing was committed)."""
    group = KafkaConsumer(group_id=settings.kafka.group_id, enable_auto_commit=False,
                          **settings.kafka.client_options())
    try:
        return {p: group.committed(TopicPartition(settings.kafka.input_topic, p))
                for p in range(settings.kafka.partitions)}
    finally:
        group.close(autocommit=False)
