"""A rebalance between two polls of one stream batch: the records taken before it, of partitions this member no
longer holds, are not labelled, not emitted and not committed by it (their new owner reads them)."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

from kafka import KafkaConsumer, KafkaProducer

from consumer.app import StreamApp
from core.readers import read_events
from core.records import ChatMessage, EmotionEvent
from core.settings import Settings
from scoring.backends.null import NullBackend
from tests.app_threads import start
from tests.kafka_helpers import committed_offsets


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class _Member(threading.Thread):
    """A second member of the group that polls (so the rebalance completes) and never commits."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        k = settings.kafka
        self.consumer = KafkaConsumer(group_id=k.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
                                      session_timeout_ms=k.session_timeout_ms,
                                      heartbeat_interval_ms=k.heartbeat_interval_ms, **k.client_options())
        self.consumer.subscribe([k.input_topic])
        self.held: set[int] = set()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.consumer.poll(timeout_ms=200)
            self.consumer.pause(*self.consumer.assignment())  # holds its partitions, takes nothing
            self.held = {tp.partition for tp in self.consumer.assignment()}
        self.consumer.close(autocommit=False)


def test_records_of_partitions_revoked_between_two_polls_of_a_batch_are_dropped(settings: Settings) -> None:
    # One stream batch waits 15 s to fill: long enough for a second member to join in the middle of it.
    settings = settings.with_overrides(batch={"stream_batch_size": 500, "max_wait_ms": 15_000})
    k = settings.kafka
    run = uuid.uuid4().hex[:8]
    start_at = datetime(2024, 5, 1, tzinfo=UTC)
    partition_of = {f"{run}:p{p}": p for p in range(k.partitions)}
    msgs = [ChatMessage(message_id=f"{conv}:t{t}", conversation_id=conv, turn=t, speaker="s", text="hello there",
                        sent_at=start_at + timedelta(seconds=t))
            for conv in partition_of for t in range(3)]

    emitted: list[tuple[EmotionEvent, frozenset[int]]] = []
    app = StreamApp(settings, NullBackend())
    app.on_event = lambda event, msg: emitted.append((event, frozenset(tp.partition for tp in app.partitions.held)))
    thread, errors = start(app)
    member: _Member | None = None
    try:
        _wait(lambda: len(app.partitions.held) == k.partitions, 60, "the first member's assignment")
        producer = KafkaProducer(acks="all", **k.client_options())
        for m in msgs:
            producer.send(k.input_topic, key=m.conversation_id.encode(), value=m.to_bytes(),
                          partition=partition_of[m.conversation_id])
        producer.flush(30)
        producer.close(5)
        time.sleep(1.5)  # the first poll of the batch took them; the batch waits for more until its deadline
        assert app.stats.consumed == 0

        member = _Member(settings)
        member.start()
        _wait(lambda: member.held and app.stats.events > 0, 60, "the rebalance and the batch after it")
        mine = set(range(k.partitions)) - member.held
        # What the first member delivered: only its own partitions' records, each once.
        delivered = {e.message_id for e, _ in emitted}
        assert {partition_of[e.conversation_id] for e, _ in emitted} <= mine, (mine, emitted)
        assert delivered == {m.message_id for m in msgs if partition_of[m.conversation_id] in mine}
        assert len(emitted) == len(delivered)  # each once: a kept partition continues from its position
        assert app.metrics.value("erc_revoked_records_total") >= len(msgs) - len(delivered)
        committed = committed_offsets(settings)
        assert all(committed[p] is None for p in member.held), committed  # nothing committed for the other member

        member.stopping.set()  # the other member leaves: its partitions come back to the first
        member.join(30)
        _wait(lambda: app.stats.events >= len(msgs), 60, "the other partitions after the member left")
    finally:
        if member is not None and member.is_alive():
            member.stopping.set()
            member.join(30)
        app.stop()
        thread.join(30)
    assert not errors, errors
    out = read_events(settings, timeout_s=20)
    assert sorted(e.message_id for e in out.events) == sorted(m.message_id for m in msgs)
    assert all(held >= {partition_of[e.conversation_id]} for e, held in emitted)
    assert committed_offsets(settings) == {p: 3 for p in range(k.partitions)}
