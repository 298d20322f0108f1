"""Delivery modes on the real broker: at-least-once copies are recognisable by event_id; transactional
mechanics (commit with offsets, abort and redo, fencing of a restarted worker, the commit watchdog).

tansu cannot show the transactional mode's exactly-once output (it hands the records of transactions
open at a crash to read_committed readers, and accepts commits from stale members); these tests check
what it can: explicitly aborted records stay invisible, offsets commit with the transaction, a second
instance of a worker fences the first, and a hung commit is cut by the watchdog.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from consumer.app import StreamApp
from consumer.delivery import (
    CachingPartitioner,
    FatalDeliveryError,
    Transactional,
    make_emitter,
    transactional_id,
    with_watchdog,
)
from core.readers import read_events
from core.records import EmotionEvent
from core.settings import KafkaSettings, ServicesSettings, Settings
from local_services.supervisor import ensure_topics, kafka_down, kafka_up
from scoring.backends.null import NullBackend
from tests.app_threads import FailOnce, run_until, start
from tests.conftest import free_port
from tests.kafka_helpers import committed_offsets, produce_raw, read_all
from tests.procs import stream_messages


def _produce(settings: Settings, n_conv: int = 6, turns: int = 5):
    msgs = stream_messages(n_conv, turns, run_id=uuid.uuid4().hex[:8])
    metas = produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])
    ends: dict[int, int] = {}
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    return msgs, ends


def test_at_least_once_redo_emits_copies_with_the_same_event_id(settings: Settings) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 10, "max_wait_ms": 50})
    msgs, ends = _produce(settings)
    app = StreamApp(settings, NullBackend(), emitter=FailOnce(make_emitter(settings)))
    run_until(app, lambda: app.stats.consumed >= len(msgs))
    assert app.stats.rewinds == 1 and app.stats.events == len(msgs)

    out = read_events(settings, timeout_s=20)
    # The failed batch's events were sent before the failure: they are on the topic twice, same ids.
    assert out.records == len(msgs) + out.copies and 1 <= out.copies <= 10
    assert sorted(e.message_id for e in out.events) == sorted(m.message_id for m in msgs)
    assert all(e.event_id == EmotionEvent.make_id(tenant=e.tenant, conversation_id=e.conversation_id, message_id=e.message_id, model="null", adapter=None) for e in out.events)
    assert committed_offsets(settings) == {p: ends.get(p) for p in range(settings.kafka.partitions)}


def test_transactional_batches_commit_outputs_with_offsets_and_abort_then_redo(settings: Settings) -> None:
    settings = settings.with_overrides(
        batch={"micro_batch_size": 10, "max_wait_ms": 50},
        delivery={"mode": "transactional", "worker_id": f"w-{uuid.uuid4().hex[:6]}", "commit_watchdog_s": 20},
    )
    msgs, ends = _produce(settings)
    app = StreamApp(settings, NullBackend(), emitter=FailOnce(make_emitter(settings)))
    run_until(app, lambda: app.stats.consumed >= len(msgs))
    assert app.emitter.fired == 1 and app.stats.rewinds == 1

    records = read_all(settings, settings.kafka.output_topic, expected=len(msgs), timeout_s=20,
                       isolation_level="read_committed")
    ids = Counter(EmotionEvent.from_bytes(r.value).message_id for r in records)
    # The aborted transaction's events are not visible; the redone batch's are, once each.
    assert ids == Counter(m.message_id for m in msgs)
    # Offsets were committed by the transactions, not by the consumer.
    assert committed_offsets(settings) == {p: ends.get(p) for p in range(settings.kafka.partitions)}


def test_a_restarted_worker_fences_the_old_instance(settings: Settings) -> None:
    settings = settings.with_overrides(delivery={"mode": "transactional", "worker_id": f"w-{uuid.uuid4().hex[:6]}",
                                                 "commit_watchdog_s": 20})
    assert transactional_id(settings).endswith(settings.delivery.worker_id)
    consumer = KafkaConsumer(group_id=settings.kafka.group_id, enable_auto_commit=False,
                             **settings.kafka.client_options())
    old = Transactional(settings)
    try:
        old.begin()
        old.send(settings.kafka.output_topic, b"k", b"from the old instance")
        new = Transactional(settings)  # same transactional id: bumps the epoch, aborts the old open transaction
        try:
            offsets = {TopicPartition(settings.kafka.input_topic, 0): OffsetAndMetadata(1, "", -1)}
            with pytest.raises(FatalDeliveryError, match="(?i)fenc|epoch"):
                old.finish(offsets, consumer)
            new.begin()
            new.send(settings.kafka.output_topic, b"k", b"from the new instance")
            new.finish(offsets, consumer)
        finally:
            new.close(5)
    finally:
        old.close(1)
        consumer.close(autocommit=False)
    values = [r.value for r in read_all(settings, settings.kafka.output_topic, expected=1, timeout_s=10,
                                        isolation_level="read_committed")]
    assert values[-1] == b"from the new instance"
    # The old instance's open transaction was aborted by the new one's init_transactions. Apache Kafka
    # hides its record from read_committed readers; tansu sends it anyway (its fetch responses carry
    # no aborted-transaction list), so here it may show up before the new record, never after it.
    assert set(values) <= {b"from the old instance", b"from the new instance"}
    assert committed_offsets(settings)[0] == 1


def test_a_fenced_consumer_exits(settings: Settings, tmp_path: Path) -> None:
    """Two StreamApps with one worker id: the older one stops with FatalDeliveryError, the newer goes on."""
    settings = settings.with_overrides(
        batch={"micro_batch_size": 5, "max_wait_ms": 20},
        delivery={"mode": "transactional", "worker_id": f"w-{uuid.uuid4().hex[:6]}", "commit_watchdog_s": 20},
    )
    old = StreamApp(settings, NullBackend())
    thread, errors = start(old)
    new = StreamApp(settings, NullBackend())  # init_transactions fences `old`
    new_thread = threading.Thread(target=new.run, daemon=True)
    new_thread.start()
    try:
        msgs, _ = _produce(settings, n_conv=8, turns=4)
        thread.join(60)
        assert not thread.is_alive(), "the fenced consumer did not stop"
        assert errors and isinstance(errors[0], FatalDeliveryError), errors
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = read_all(settings, settings.kafka.output_topic, expected=len(msgs), timeout_s=5,
                           isolation_level="read_committed")
            if {EmotionEvent.from_bytes(r.value).message_id for r in out} >= {m.message_id for m in msgs}:
                break
        else:
            pytest.fail("the new instance did not label every message")
    finally:
        new.stop()
        new_thread.join(30)


def test_the_watchdog_cuts_a_call_that_never_returns() -> None:
    started = time.monotonic()
    with pytest.raises(FatalDeliveryError, match="watchdog"):
        with_watchdog(lambda: time.sleep(30), 0.3, "commit_transaction")
    assert time.monotonic() - started < 2
    assert with_watchdog(lambda: 42, 1, "x") == 42
    with pytest.raises(ZeroDivisionError):
        with_watchdog(lambda: 1 / 0, 1, "x")


def test_the_watchdog_ends_a_commit_to_a_frozen_broker(tmp_path: Path) -> None:
    """A broker that stops answering (SIGSTOP) mid-transaction: the commit is cut by the watchdog, not hung."""
    base = None
    for _ in range(3):
        port = free_port()
        base = Settings(kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", partitions=1,
                                            input_topic="wd.in", output_topic="wd.out", dlq_topic="wd.dlq",
                                            group_id="wd", request_timeout_ms=5000),
                        services=ServicesSettings(run_dir=tmp_path / "run"))
        if kafka_up(base, create_topics=False).managed:
            break
    ensure_topics(base)
    settings = base.with_overrides(delivery={"mode": "transactional", "worker_id": "wd", "commit_watchdog_s": 3})
    pid = int((tmp_path / "run" / f"tansu-{port}.pid").read_text())
    consumer = KafkaConsumer(group_id="wd", enable_auto_commit=False, **settings.kafka.client_options())
    emitter = Transactional(settings)
    try:
        emitter.begin()
        emitter.send("wd.out", b"k", b"v")
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(FatalDeliveryError, match="watchdog"):
                emitter.finish({TopicPartition("wd.in", 0): OffsetAndMetadata(1, "", -1)}, consumer)
            assert time.monotonic() - started < 10
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        emitter.close(1)
        consumer.close(autocommit=False)
        kafka_down(base)


class _Cluster:
    """The two ClusterMetadata calls a partitioner makes."""

    def __init__(self, partitions: int) -> None:
        self.partitions = set(range(partitions))

    def topics(self) -> set[str]:
        return {"t"}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions


def test_the_caching_partitioner_places_keys_as_kafkas_default_does() -> None:
    from kafka.partitioner.default import DefaultPartitioner

    ours, default = CachingPartitioner(), DefaultPartitioner()
    for partitions in (1, 4, 7):
        cluster = _Cluster(partitions)
        for i in range(300):
            key = f"conversation-{i}".encode() * (1 + i % 3)
            expected = default.partition("t", None, key, None, None, cluster)
            assert ours.partition("t", None, key, None, None, cluster) == expected  # computed
            assert ours.partition("t", None, key, None, None, cluster) == expected  # remembered
    assert ours.partition("t", None, None, None, None, _Cluster(4)) in range(4)  # no key: any partition
