"""The whole stream on a real broker and a real Redis: valid messages become events, bad ones dead letters,
and the group's committed offsets reach the end of every partition."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from kafka import KafkaConsumer, TopicPartition

from consumer.app import StreamApp
from consumer.metrics import StreamStats
from core.labels import get_label_set
from core.records import ChatMessage, DeadLetter, EmotionEvent
from core.settings import Settings
from producer_sim.replay import interleave, to_messages
from producer_sim.synthetic import synthetic_conversations
from scoring.backends.base import Backend, ScoreRequest
from scoring.backends.null import NullBackend
from scoring.prompts import PromptBuilder, Turn
from tests.kafka_helpers import produce_raw, read_all

CONVERSATIONS = 4
TURNS = 6
K = CONVERSATIONS * TURNS


def _messages(seed: int = 3) -> list[ChatMessage]:
    """K valid messages: 4 synthetic conversations of 6 turns, interleaved like live traffic."""
    convs = [c for c in synthetic_conversations(12, seed=seed) if len(c.utterances) >= TURNS][:CONVERSATIONS]
    assert len(convs) == CONVERSATIONS
    per_conv = [msgs[:TURNS] for msgs in to_messages(convs, run_id=f"e2e-{uuid.uuid4().hex[:8]}")]
    stream = list(interleave(per_conv, concurrency=CONVERSATIONS, seed=seed))
    assert len(stream) == K
    return stream


def _malformed(conversation_id: str) -> list[tuple[str, bytes, bytes]]:
    """(expected error type, key, value) for four broken records."""
    valid = {
        "message_id": "bad", "conversation_id": conversation_id, "turn": 99, "speaker": "X", "text": "t",
        "sent_at": "2024-05-01T12:00:00Z",
    }
    key = conversation_id.encode()
    missing = {k: v for k, v in valid.items() if k != "speaker"}
    return [
        ("invalid_json", key, b'{"message_id": "bad", "turn": '),
        ("invalid_utf8", key, b'{"message_id": "caf\xe9", "turn": 1}'),
        ("schema", key, json.dumps(missing).encode()),
        ("schema", key, json.dumps({**valid, "turn": "3"}).encode()),
    ]


@dataclass
class StreamRun:
    messages: list[ChatMessage]
    bad: list[tuple[str, bytes, bytes]]
    produced: dict[tuple[int, int], bytes]  # (partition, offset) -> value
    events: list
    dead: list
    stats: StreamStats
    committed: dict[int, int | None]
    ends: dict[int, int]


def _run_stream(settings: Settings, backend: Backend, timeout_s: float = 90.0) -> StreamRun:
    messages = _messages()
    bad = _malformed(messages[0].conversation_id)
    items: list[tuple[bytes | None, bytes]] = [(m.conversation_id.encode(), m.to_bytes()) for m in messages]
    for pos, (_, key, value) in zip((0, 7, 15, len(items)), bad):  # first, middle, ..., last
        items.insert(pos, (key, value))
    metas = produce_raw(settings, settings.kafka.input_topic, items)
    produced = {(meta.partition, meta.offset): value for meta, (_, value) in zip(metas, items)}
    ends: dict[int, int] = defaultdict(int)
    for meta in metas:
        ends[meta.partition] = max(ends[meta.partition], meta.offset + 1)

    app = StreamApp(settings, backend)
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["stats"] = app.run()
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=run, name="stream-app", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        # events and dead_letters are counted once a batch is committed
        while time.monotonic() < deadline and thread.is_alive() and (
            app.stats.events + app.stats.dead_letters < len(items)
        ):
            time.sleep(0.1)
        events = read_all(settings, settings.kafka.output_topic, expected=K, timeout_s=20)
        dead = read_all(settings, settings.kafka.dlq_topic, expected=len(bad), timeout_s=20)
    finally:
        app.stop()
        thread.join(30)
    assert not thread.is_alive(), "the app did not stop"
    assert "error" not in result, result.get("error")

    group = KafkaConsumer(
        group_id=settings.kafka.group_id, client_id=f"test-offsets-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False, **settings.kafka.client_options(),
    )
    try:
        committed = {
            p: group.committed(TopicPartition(settings.kafka.input_topic, p))
            for p in range(settings.kafka.partitions)
        }
    finally:
        group.close(autocommit=False)
    return StreamRun(messages, bad, produced, events, dead, result["stats"], committed, dict(ends))


def _check_common(run: StreamRun, settings: Settings, model: str) -> dict[str, EmotionEvent]:
    label_set = get_label_set(settings.model.label_set)
    size = settings.window.size

    # exactly one event per valid message, none for the bad ones
    assert len(run.events) == K, [r.value[:80] for r in run.events]
    events = [EmotionEvent.from_bytes(r.value) for r in run.events]
    by_message = {e.message_id: e for e in events}
    inputs = {m.message_id: m for m in run.messages}
    assert len(by_message) == K and set(by_message) == set(inputs)

    for record, event in zip(run.events, events):
        msg = inputs[event.message_id]
        assert record.key == msg.conversation_id.encode()
        assert event.event_id == EmotionEvent.make_id(tenant=msg.tenant, conversation_id=msg.conversation_id, message_id=msg.message_id, model=model, adapter=None)
        assert (event.conversation_id, event.turn, event.speaker) == (msg.conversation_id, msg.turn, msg.speaker)
        assert event.model == model and event.adapter is None and event.label_set == label_set.name
        assert event.label in label_set
        assert set(event.probabilities) == set(label_set.labels)
        assert abs(sum(event.probabilities.values()) - 1) < 1e-4
        assert all(0 <= p <= 1 for p in event.probabilities.values())
        assert event.label == max(event.probabilities, key=event.probabilities.__getitem__)
        assert event.gold_label == label_set.map_gold(msg.gold_label) and event.gold_label is not None
        assert 1 <= event.window <= size
        assert event.window == min(msg.turn + 1, size)  # nothing is truncated with these short turns
        assert event.latency_ms >= 0

    # per conversation, events come out in turn order (same key, same partition)
    per_conv: dict[str, list[int]] = defaultdict(list)
    for event in events:
        per_conv[event.conversation_id].append(event.turn)
    assert len(per_conv) == CONVERSATIONS
    assert all(turns == list(range(TURNS)) for turns in per_conv.values()), per_conv

    # the four broken records are dead letters with their types and their original bytes
    assert len(run.dead) == len(run.bad)
    letters = [DeadLetter.from_bytes(r.value) for r in run.dead]
    assert Counter(d.error_type for d in letters) == Counter(t for t, _, _ in run.bad)
    assert sorted(d.original() for d in letters) == sorted(v for _, _, v in run.bad)
    for d in letters:
        assert d.source_topic == settings.kafka.input_topic
        assert run.produced[(d.source_partition, d.source_offset)] == d.original()
        assert d.reason
        assert d.key_b64 is not None

    # every record's offset is committed: the group is at the end of each partition
    for p in range(settings.kafka.partitions):
        assert run.committed[p] == run.ends.get(p), (p, run.committed, run.ends)
    assert run.stats.consumed == K + len(run.bad)
    assert run.stats.events == K and run.stats.dead_letters == len(run.bad)
    assert run.stats.batches >= 3  # 28 records at most 8 a batch
    return by_message


def _overrides(settings: Settings, **extra) -> Settings:
    return settings.with_overrides(batch={"micro_batch_size": 8, "max_wait_ms": 100}, **extra)


def test_stream_end_to_end_with_the_null_backend(settings: Settings) -> None:
    settings = _overrides(settings)
    run = _run_stream(settings, NullBackend())
    by_message = _check_common(run, settings, "null")
    n = len(get_label_set("meld").labels)
    assert all(abs(p - 1 / n) < 1e-9 for e in by_message.values() for p in e.probabilities.values())


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["hf", "hf_cached", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_stream_end_to_end_with_the_real_model(settings: Settings, backend_name: str, request) -> None:
    # the session's transformers or vLLM backend, or a transformers one with a prefix cache
    backend = request.getfixturevalue(f"{backend_name}_backend")
    settings = _overrides(settings, window={"size": 4, "hop": 1}, conversation={"retain_turns": 8}, model={"backend": backend_name.split("_")[0]})
    run = _run_stream(settings, backend)
    by_message = _check_common(run, settings, "smollm2-135m")
    if backend_name == "hf_cached":  # consecutive turns reused each other's keys and values in the stream
        assert backend.tokens.computed < 0.8 * backend.tokens.prompt_tokens, backend.tokens

    # The model saw the right window: re-score the last turn of each conversation from the inputs.
    builder = PromptBuilder(
        get_label_set(settings.model.label_set), max_tokens=settings.model.max_prompt_tokens,
        count_tokens=backend.count_tokens, demo_position=settings.model.demo_position,
        max_turn_chars=settings.window.max_turn_chars,
    )
    conv_msgs: dict[str, list[ChatMessage]] = defaultdict(list)
    for m in run.messages:
        conv_msgs[m.conversation_id].append(m)
    targets = [msgs[-1] for msgs in conv_msgs.values()]
    requests = []
    for target in targets:
        window = [Turn(m.speaker, m.text) for m in conv_msgs[target.conversation_id]][-settings.window.size:]
        prompt = builder.emotion(window)
        assert prompt.turns_used == settings.window.size
        requests.append(ScoreRequest(prompt.text, prompt.choices))
    for target, probs in zip(targets, backend.score(requests)):
        got = by_message[target.message_id].probabilities
        expected = dict(zip(get_label_set(settings.model.label_set).labels, probs))
        assert max(abs(got[k] - expected[k]) for k in expected) < 1e-3, (got, expected)


class _RecordingBackend(NullBackend):
    """The null backend, remembering every prompt it was asked to score."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.prompts.extend(r.prompt for r in requests)
        return super().score(requests)


def test_a_conflicting_message_is_not_labelled_from_another_messages_text(settings: Settings) -> None:
    settings = _overrides(settings)
    conv = f"conflict-{uuid.uuid4().hex[:6]}"
    first = ChatMessage(message_id="m-first", conversation_id=conv, turn=0, speaker="A",
                        text="FIRST TEXT: I love it", sent_at=datetime.now(UTC))
    second = first.model_copy(update={"message_id": "m-second", "text": "SECOND TEXT: I hate it"})
    produce_raw(settings, settings.kafka.input_topic, [(conv.encode(), first.to_bytes())])
    backend = _RecordingBackend()
    seen: list[tuple[EmotionEvent, ChatMessage]] = []
    app = StreamApp(settings, backend, on_event=lambda e, m: seen.append((e, m)))
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while app.stats.consumed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        produce_raw(settings, settings.kafka.input_topic, [(conv.encode(), second.to_bytes())])
        while app.stats.consumed < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        app.stop()
        thread.join(30)
    assert app.stats.consumed == 2
    labelled = {e.message_id for e, _ in seen}
    assert "m-first" in labelled
    # The second message claims a turn another message holds: dead-lettered as a conflict, not labelled.
    assert "m-second" not in labelled
    assert not any("SECOND TEXT" in p for p in backend.prompts), backend.prompts
    assert app.stats.dead_letters == 1 and app.stats.dead_by_type["conflict"] == 1
