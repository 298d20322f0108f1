"""1,000 hostile records interleaved with valid traffic, through a real `erc-stream consume` process:
every valid message gets exactly one event with a whole window, every hostile record is accounted for
(an event, or a dead letter of the expected type with a reason), every label is in the label set, and
the consumer is still running at the end."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer

from consumer.app import StreamApp
from core.labels import get_label_set
from core.readers import read_dead_letters, read_events, read_records
from core.records import ChatMessage, EmotionEvent
from core.settings import Settings
from model_store.loading import choose_adapter
from tests.app_threads import run_until
from tests.hostile import CONTROL_TEXTS, INJECTIONS, Hostile, hostile_records
from tests.kafka_helpers import produce_raw
from tests.procs import ConsumerProc, stream_messages

N_HOSTILE = 1000


def _interleave(valid: list, groups: list[list], rng: random.Random) -> list:
    """Mix two ordered streams at random, keeping each one's order (and each attack's records together in order)."""
    out, i, j = [], 0, 0
    while i < len(valid) or j < len(groups):
        if j == len(groups) or (i < len(valid) and rng.random() < len(valid) / (len(valid) + len(groups))):
            out.append(valid[i])
            i += 1
        else:
            out.extend(groups[j])
            j += 1
    return out


def test_hostile_input_is_accounted_for_and_the_consumer_keeps_running(settings: Settings, tmp_path: Path) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 32, "max_wait_ms": 50},
                                       store={"dir": tmp_path / "store"})
    run = f"hostile-{uuid.uuid4().hex[:6]}"
    valid = stream_messages(50, 10, run_id=f"{run}-ok")
    groups = hostile_records(N_HOSTILE, run=run)
    hostile_count = sum(len(g) for g in groups)
    assert hostile_count >= N_HOSTILE
    stream = _interleave(valid, groups, random.Random(7))

    producer = KafkaProducer(acks="all", max_request_size=4_000_000, linger_ms=5, **settings.kafka.client_options())
    try:
        futures = []
        for item in stream:
            if isinstance(item, Hostile):
                futures.append((item, producer.send(settings.kafka.input_topic, key=item.key, value=item.value)))
            else:
                futures.append((item, producer.send(settings.kafka.input_topic, key=item.conversation_id.encode(),
                                                    value=item.to_bytes())))
        producer.flush(60)
        placed = [(item, f.get(30)) for item, f in futures]
    finally:
        producer.close(5)

    consumer = ConsumerProc(settings, tmp_path / "consumers", "hostile")
    consumer.start()
    try:
        expect_events = {m.message_id for m in valid} | {h.message_id for h, _ in placed
                                                          if isinstance(h, Hostile) and h.expect == "event"}
        expect_dlq = sum(1 for h, _ in placed if isinstance(h, Hostile) and h.expect == "dlq")
        deadline = time.monotonic() + 180
        events: list[EmotionEvent] = []
        letters = []
        while time.monotonic() < deadline:
            assert consumer.alive, consumer.tail()
            events = [EmotionEvent.from_bytes(r.value) for r in read_records(settings, settings.kafka.output_topic)]
            letters, copies = read_dead_letters(settings)
            if {e.message_id for e in events} >= expect_events and len(letters) >= expect_dlq:
                break
            time.sleep(2)
        time.sleep(1)
        assert consumer.alive, f"the consumer stopped:\n{consumer.tail()}"
    finally:
        rc = consumer.terminate()
    assert rc == 0, consumer.tail()
    events = [EmotionEvent.from_bytes(r.value) for r in read_records(settings, settings.kafka.output_topic)]
    letters, copies = read_dead_letters(settings)
    assert copies == 0

    label_set = get_label_set(settings.model.label_set)
    for e in events:
        assert e.label in label_set and set(e.probabilities) == set(label_set.labels)

    per_message = defaultdict(list)
    for e in events:
        per_message[e.message_id].append(e)
    # Valid traffic: exactly one event each, windows whole and in turn order.
    for m in valid:
        got = per_message[m.message_id]
        assert len(got) == 1, (m.message_id, len(got))
        e = got[0]
        assert not e.window_degraded and e.window == min(m.turn + 1, settings.window.size), (m.message_id, e)

    # Hostile records: each one is an event or a dead letter of an expected type, with a reason.
    by_source = {(d.source_partition, d.source_offset): d for d in letters}
    accounted = Counter()
    for item, meta in placed:
        if not isinstance(item, Hostile):
            continue
        if item.expect == "event":
            got = per_message[item.message_id]
            assert got, f"no event for {item.kind}"
            assert len({e.event_id for e in got}) == 1
            if item.degraded is not None:
                assert all(e.window_degraded == item.degraded for e in got if e.turn == item.turn), (item.kind, got)
            accounted["event"] += 1
        else:
            d = by_source.get((meta.partition, meta.offset))
            assert d is not None, f"no dead letter for {item.kind}"
            assert d.error_type in item.error_types, (item.kind, d.error_type, d.reason)
            assert d.reason
            if len(item.value or b"") <= settings.kafka.dlq_max_original_bytes:
                assert d.original() == (item.value or b"") and not d.original_truncated
            else:  # a dead letter keeps the first dlq_max_original_bytes and says so
                assert d.original_truncated and d.original_size == len(item.value)
                assert d.original() == item.value[: settings.kafka.dlq_max_original_bytes]
            accounted[d.error_type] += 1
    # Nothing valid was dead-lettered.
    hostile_sources = {(meta.partition, meta.offset) for item, meta in placed if isinstance(item, Hostile)}
    assert set(by_source) <= hostile_sources
    assert sum(accounted.values()) == hostile_count
    print(f"\nhostile: {hostile_count} records accounted for: {dict(accounted)}; valid: {len(valid)} events")


@pytest.mark.slow
def test_hostile_texts_on_the_real_model_get_a_label_of_the_label_set(settings: Settings, own_hf_backend) -> None:
    """Prompt injection and other hostile texts, labelled by the embedded model with the shipped adapter:
    the answer is read from the label tokens' probabilities, so every label is one of the set's."""
    settings = settings.with_overrides(batch={"micro_batch_size": 8, "max_wait_ms": 100})
    texts = [*INJECTIONS, *CONTROL_TEXTS[:3], "", " \n\t ", "word " * 600, "😡" * 50, "### ###", '"> from <joy>:']
    now = datetime.now(UTC)
    msgs = [ChatMessage(message_id=f"h:{i}", conversation_id=f"hostile-{i % 3}", turn=i // 3, speaker="Customer",
                        text=text, sent_at=now) for i, text in enumerate(texts)]
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])
    app = StreamApp(settings, own_hf_backend)
    app.routes.choose_adapters()  # the registry's default for meld: the shipped adapter
    shipped = choose_adapter(settings).name
    run_until(app, lambda: app.stats.events >= len(msgs), timeout_s=180)
    assert app.stats.events == len(msgs) and app.stats.dead_letters == 0, app.stats
    labels = set(get_label_set("meld").labels)
    events = read_events(settings, timeout_s=20).events
    assert len(events) == len(msgs) and all(e.adapter == shipped for e in events)
    for e in events:
        assert e.label in labels and set(e.probabilities) == labels, e
        assert abs(sum(e.probabilities.values()) - 1) < 1e-3 and e.label == max(e.probabilities, key=e.probabilities.get)
