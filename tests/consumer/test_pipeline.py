"""The pipeline as a plain function of its inputs: no broker, no Redis.

Records are built in memory, the conversation state is an in-memory store with the Redis script's rules
(tested against real Redis in test_conversation_store.py), labels come from the real scoring path (routes,
labeler, prompt builder) on a keyword backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import redis

from consumer import pipeline
from consumer.conversation_store import StoredTurn, TurnUpdate
from consumer.pipeline import Parts, Polled, RedisDown
from core.records import Alert, ChatMessage, EmotionEvent, conversation_scope
from core.settings import Settings
from model_store.loading import choose_adapter
from scoring.routes import Routes
from tests.keyword_backend import KeywordBackend


class MemoryTurns:
    """Each conversation's turns in a dict, by the rules of ConversationStore's Lua script."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.turns: dict[str, dict[int, StoredTurn]] = {}

    def append_many(self, turns: Sequence[tuple[str, StoredTurn]]) -> list[TurnUpdate]:
        out = []
        for conversation_id, t in turns:
            stored = self.turns.setdefault(conversation_id, {})
            added = False
            if t.turn not in stored:
                other = next((s.turn for s in stored.values() if s.message_id == t.message_id), None)
                if other is not None:
                    out.append(TurnUpdate(False, (), other))
                    continue
                stored[t.turn] = t
                added = True
            window = [stored[n] for n in sorted(stored) if n <= t.turn][-self.size:]
            out.append(TurnUpdate(added, tuple(window)))
        return out


class NoAlerts:
    def evaluate(self, items):
        return []

    def unsent(self, alerts):
        return list(alerts)


def _settings(**batch) -> Settings:
    return Settings().with_overrides(model={"backend": "null", "label_set": "meld"}, window={"size": 3},
                                     batch={"micro_batch_size": 4, **batch})


def _parts(settings: Settings, *, conversations=None, alerts=None, inference: list[float] | None = None) -> Parts:
    backend = KeywordBackend(fail_on="boom")
    routes = Routes(settings, backend, choose=choose_adapter)
    routes.choose_adapters()
    return Parts(conversations=conversations or MemoryTurns(settings.window.size), routes=routes,
                 alerts=alerts or NoAlerts(), model_id=backend.model_id, count_tokens=backend.count_tokens,
                 on_inference=(inference.append if inference is not None else lambda s: None))


_offsets = iter(range(10**6))


def _record(value: bytes, key: bytes | None = b"k") -> Polled:
    return Polled(SimpleNamespace(topic="chat.messages", partition=0, offset=next(_offsets), key=key, value=value,
                                  headers=[]),
                  received=0.0)


def _msg(conv: str, turn: int, text: str, *, message_id: str | None = None) -> Polled:
    m = ChatMessage(message_id=message_id or f"{conv}:{turn}", conversation_id=conv, turn=turn, speaker=f"S{turn % 2}",
                    text=text, sent_at=datetime.now(UTC))
    return _record(m.to_bytes(), conv.encode())


def test_a_batch_becomes_events_and_dead_letters_with_their_reasons() -> None:
    settings = _settings()
    batch = [_msg("a", 0, "hello"), _msg("a", 1, "so angry now"), _record(b'{"message_id": '),
             _msg("b", 0, "what a surprise"), _record(json.dumps({"message_id": "x"}).encode())]
    out = pipeline.process(batch, settings, _parts(settings))
    assert [(e.message_id, e.label) for e, _ in out.events] == [("a:0", "neutral"), ("a:1", "angry"),
                                                                ("b:0", "surprise")]
    assert [(d.error_type, d.source_offset) for d in out.dead] == [("invalid_json", batch[2].record.offset),
                                                                   ("schema", batch[4].record.offset)]
    assert out.alerts == [] and out.truncated == 0
    first = out.events[0][0]
    assert first.event_id == EmotionEvent.make_id(tenant=None, conversation_id="a", message_id="a:0", model="keyword", adapter=None) and first.window == 1
    assert out.events[1][0].window == 2 and not out.events[1][0].window_degraded


def test_conflicts_and_duplicate_ids_are_dead_lettered_and_a_redelivery_is_labelled_again() -> None:
    settings = _settings()
    parts = _parts(settings)
    pipeline.process([_msg("c", 0, "hi"), _msg("c", 1, "fine")], settings, parts)
    out = pipeline.process([_msg("c", 1, "fine"),  # the same message again: its event again
                            _msg("c", 1, "other text", message_id="c:other"),  # another message at turn 1
                            _msg("c", 2, "again", message_id="c:0")],  # message c:0 is already turn 0
                           settings, parts)
    assert [e.message_id for e, _ in out.events] == ["c:1"]
    assert [d.error_type for d in out.dead] == ["conflict", "duplicate_id"]
    assert "already holds message 'c:1'" in out.dead[0].reason and "already turn 0" in out.dead[1].reason


def test_a_window_that_lacks_turns_is_marked_degraded() -> None:
    settings = _settings()
    out = pipeline.process([_msg("g", 0, "one"), _msg("g", 2, "three")], settings, _parts(settings))
    assert [e.window_degraded for e, _ in out.events] == [False, True]


def test_a_stream_batch_is_labelled_in_micro_batches() -> None:
    settings = _settings()
    seconds: list[float] = []
    batch = [_msg(f"m{i}", 0, "hi") for i in range(10)]
    out = pipeline.process(batch, settings, _parts(settings, inference=seconds))
    assert len(out.events) == 10 and len(seconds) == 3  # 4 + 4 + 2


def test_a_message_the_model_fails_on_is_dead_lettered_and_the_rest_labelled() -> None:
    settings = _settings()
    batch = [_msg("f", 0, "ok"), _msg("f", 1, "boom"), _msg("h", 0, "sad")]
    out = pipeline.process(batch, settings, _parts(settings))
    assert [(e.message_id, e.label) for e, _ in out.events] == [("f:0", "neutral"), ("h:0", "sad")]
    # The letter points at the record it came from (what replay-dlq and the DLQ's readers key on).
    assert [(d.error_type, d.source_partition, d.source_offset) for d in out.dead] == [
        ("inference", batch[1].record.partition, batch[1].record.offset)]
    assert "the model fell over" in out.dead[0].reason


def test_texts_are_cut_to_the_token_budget_before_they_are_stored() -> None:
    settings = _settings().with_overrides(window={"max_turn_tokens": 8})
    memory = MemoryTurns(3)
    out = pipeline.process([_msg("t", 0, "word " * 100)], settings, _parts(settings, conversations=memory))
    assert out.truncated == 1 and len(out.events) == 1
    assert len(memory.turns[conversation_scope(None, "t")][0].text) < 100


class _Down:
    def __init__(self, fails: str) -> None:
        self.fails = fails

    def append_many(self, turns):
        if self.fails == "window":
            raise redis.ConnectionError("refused")
        return MemoryTurns(3).append_many(turns)

    def evaluate(self, items):
        raise redis.ConnectionError("refused")

    def unsent(self, alerts: Sequence[Alert]):
        return list(alerts)


@pytest.mark.parametrize("stage", ["window", "alerts"])
def test_redis_failing_in_a_stateful_stage_raises_redis_down_with_that_stage(stage: str) -> None:
    settings = _settings()
    down = _Down(stage)
    parts = _parts(settings, conversations=down, alerts=down)
    with pytest.raises(RedisDown) as raised:
        pipeline.process([_msg("r", 0, "hi")], settings, parts)
    assert raised.value.operation == stage


# -- one poisonous message at each stage ---------------------------------------------------------

POISON = "poison"


def _poisoned(text_or_id: str) -> bool:
    return POISON in text_or_id


class _PoisonTurns(MemoryTurns):
    def append_many(self, turns):
        if any(_poisoned(t.text) for _, t in turns):
            raise redis.ResponseError("user_script:1: a script failed on this message's data")
        return super().append_many(turns)


class _PoisonAlerts(NoAlerts):
    def evaluate(self, items):
        if any(_poisoned(e.message_id) for e, _ in items):
            raise KeyError("a rule failed on this event")
        return []


class _PoisonCalibration:
    def apply(self, dist):
        if max(dist, key=dist.__getitem__) == "disgust":
            raise ZeroDivisionError("prior correction failed")
        return dist


def _inject(stage: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Parts:
    parts = _parts(settings)
    if stage == "decode":
        real = pipeline.decode
        monkeypatch.setattr(pipeline, "decode", lambda value, **kw: (_ for _ in ()).throw(RuntimeError("decoder bug"))
                            if POISON.encode() in value else real(value, **kw))
    elif stage == "sanitize":
        def count(text: str) -> int:
            if _poisoned(text):
                raise UnicodeError("tokenizer failed")
            return len(text) // 4 + 1
        parts = Parts(**{**parts.__dict__, "count_tokens": count})
    elif stage == "conversation":
        parts = Parts(**{**parts.__dict__, "conversations": _PoisonTurns(settings.window.size)})
    elif stage == "prompt":
        def lookup(texts):
            if any(_poisoned(t) for t in texts):
                raise IndexError("retrieval index corrupt")
            return [None] * len(texts)
        parts.routes.default.labeler.demonstrations = lookup
    elif stage == "inference":
        parts.routes.default.labeler.backend.fail_on = POISON
    elif stage == "calibration":
        parts.routes.default.labeler.calibration = _PoisonCalibration()
    elif stage == "event":
        real_event = pipeline.event
        monkeypatch.setattr(pipeline, "event", lambda item, msg, *a: (_ for _ in ()).throw(OSError("clock"))
                            if _poisoned(msg.message_id) else real_event(item, msg, *a))
    elif stage == "alerts":
        parts = Parts(**{**parts.__dict__, "alerts": _PoisonAlerts()})
    return parts


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_a_message_failing_at_any_stage_is_dead_lettered_with_its_stage_and_the_batch_goes_on(
    stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings()
    parts = _inject(stage, settings, monkeypatch)
    text = "such disgust" if stage == "calibration" else f"a {POISON} text"
    batch = [_msg("p", 0, "hello"), _msg("p", 1, text, message_id=f"p:{POISON}"), _msg("q", 0, "so sad"),
             _msg("p", 2, "fine")]
    out = pipeline.process(batch, settings, parts)
    dead = [d for d in out.dead if d.source_offset == batch[1].record.offset]
    assert len(out.dead) == 1 and len(dead) == 1, out.dead
    assert dead[0].stage == stage
    assert dead[0].error_type == ("inference" if stage == "inference" else "processing")
    labelled = {e.message_id for e, _ in out.events}
    others = {"p:0", "q:0", "p:2"}
    # Its rules failed, not its label: the event stands, and a replay of the dead letter evaluates them again.
    assert labelled == (others | {f"p:{POISON}"} if stage == "alerts" else others)


def test_redis_out_of_memory_is_an_outage_not_a_poisonous_message() -> None:
    class Full(MemoryTurns):
        def append_many(self, turns):
            raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")

    settings = _settings()
    with pytest.raises(RedisDown):
        pipeline.process([_msg("o", 0, "hi")], settings, _parts(settings, conversations=Full(3)))
    assert pipeline.redis_outage(redis.ConnectionError("refused"))
    assert not pipeline.redis_outage(redis.ResponseError("ERR user_script:1: bad argument"))


def test_latencies_to_the_ack_are_counted_and_a_clock_ahead_of_ours_is_clamped_and_counted() -> None:
    from consumer.metrics import ConsumerMetrics

    m = ConsumerMetrics()
    m.count_batch(2, [], [], [], 0, processing_s=[0.2, 0.4], end_to_end_s=[1.5, -3.0])
    assert m.value("erc_processing_latency_seconds_count") == 2
    assert abs(m.value("erc_processing_latency_seconds_sum") - 0.6) < 1e-9
    assert m.value("erc_end_to_end_latency_seconds_sum") == 1.5 and m.value("erc_clock_skew_total") == 1
