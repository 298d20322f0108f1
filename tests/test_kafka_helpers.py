"""The shared test helpers themselves, on the session broker."""

from __future__ import annotations

import time

from core.settings import Settings
from tests.kafka_helpers import produce_raw, read_all


def test_produce_then_read_all_returns_everything_in_partition_order(settings: Settings) -> None:
    topic = settings.kafka.input_topic
    items = [(f"k{i % 5}".encode(), f"v{i}".encode()) for i in range(40)] + [(None, b"no-key")]
    metas = produce_raw(settings, topic, items)
    assert len(metas) == len(items)
    records = read_all(settings, topic, expected=len(items), timeout_s=20)
    assert sorted(r.value for r in records) == sorted(v for _, v in items)
    assert [(r.partition, r.offset) for r in records] == sorted((r.partition, r.offset) for r in records)
    by_key: dict[bytes | None, set[int]] = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for key, parts in by_key.items() if key is not None)


def test_read_all_returns_more_than_expected_when_there_is_more(settings: Settings) -> None:
    produce_raw(settings, settings.kafka.output_topic, [(b"a", b"1"), (b"a", b"1"), (b"b", b"2")])
    assert len(read_all(settings, settings.kafka.output_topic, expected=2, timeout_s=10)) == 3


def test_read_all_on_empty_topic_returns_quickly(settings: Settings) -> None:
    started = time.monotonic()
    assert read_all(settings, settings.kafka.dlq_topic, expected=0, timeout_s=10) == []
    assert time.monotonic() - started < 5
