"""One poisonous message per pipeline stage, through the real broker and Redis: each lands in the DLQ with
its stage, every other message gets its event, and the consumer goes on (no crash, no crash loop)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import UTC, datetime

import pytest
import redis

from consumer import pipeline
from consumer.app import StreamApp
from core.readers import read_dead_letters, read_events
from core.records import ChatMessage
from core.settings import Settings
from tests.app_threads import start
from tests.kafka_helpers import produce_raw
from tests.keyword_backend import KeywordBackend


def _poison(stage: str) -> str:
    return f"poison-{stage}"


class _FailingTurns:
    """The real conversation store, except that a script fails on one message's data (a Redis error reply)."""

    def __init__(self, real) -> None:
        self.real = real

    def append_many(self, turns):
        if any(_poison("conversation") in t.text for _, t in turns):
            raise redis.ResponseError("user_script:12: Script attempted to access nonexistent global variable")
        return self.real.append_many(turns)


class _FailingAlerts:
    """The real alert engine, except that a rule fails on one event."""

    def __init__(self, real) -> None:
        self.real = real

    def evaluate(self, items):
        if any(_poison("alerts") in e.message_id for e, _ in items):
            raise KeyError("a rule's state was unreadable")
        return self.real.evaluate(items)

    def unsent(self, alerts):
        return self.real.unsent(alerts)


class _FailingCalibration:
    def apply(self, dist):
        if max(dist, key=dist.__getitem__) == "disgust":
            raise ZeroDivisionError("prior correction failed")
        return dist


def _inject_everywhere(app: StreamApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing part for each stage, each failing only on its own poisoned message."""
    real_decode, real_event = pipeline.decode, pipeline.event

    def decode(value, **kw):
        if _poison("decode").encode() in value:
            raise RuntimeError("decoder bug")
        return real_decode(value, **kw)

    def event(item, msg, *rest):
        if _poison("event") in msg.message_id:
            raise OSError("clock went away")
        return real_event(item, msg, *rest)

    monkeypatch.setattr(pipeline, "decode", decode)
    monkeypatch.setattr(pipeline, "event", event)
    count_tokens = app.parts.count_tokens

    def tokens(text: str) -> int:
        if _poison("sanitize") in text:
            raise UnicodeError("tokenizer failed")
        return count_tokens(text)

    def lookup(texts):
        if any(_poison("prompt") in t for t in texts):
            raise IndexError("retrieval index corrupt")
        return [None] * len(texts)

    labeler = app.labeler
    labeler.demonstrations = lookup
    labeler.calibration = _FailingCalibration()
    app.parts = dataclasses.replace(app.parts, count_tokens=tokens, conversations=_FailingTurns(app.conversations),
                                    alerts=_FailingAlerts(app.alerts))


def test_a_poisonous_message_at_each_stage_is_dead_lettered_and_the_stream_goes_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 8, "max_wait_ms": 300})
    run = uuid.uuid4().hex[:6]
    now = datetime.now(UTC)
    msgs: list[ChatMessage] = []
    poisoned: dict[str, str] = {}  # stage -> message id
    for stage in pipeline.STAGES:
        conv = f"{run}-{stage}"
        text = f"such disgust {_poison(stage)}" if stage == "calibration" else f"a {_poison(stage)} text"
        for turn, (mid, t) in enumerate([(f"{conv}:0", "hello there"), (f"{conv}:{_poison(stage)}", text),
                                         (f"{conv}:2", "so sad now")]):
            msgs.append(ChatMessage(message_id=mid, conversation_id=conv, turn=turn, speaker=f"S{turn % 2}",
                                    text=t, sent_at=now))
        poisoned[stage] = f"{conv}:{_poison(stage)}"
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])

    app = StreamApp(settings, KeywordBackend(fail_on=_poison("inference")))
    app.routes.choose_adapters()
    _inject_everywhere(app, monkeypatch)
    thread, errors = start(app)
    try:
        deadline = time.monotonic() + 60
        while app.stats.consumed < len(msgs) and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert app.stats.consumed == len(msgs) and thread.is_alive() and not errors, (app.stats, errors)
        # Still running: a message sent afterwards gets its event.
        late = ChatMessage(message_id=f"{run}-late:0", conversation_id=f"{run}-late", turn=0, speaker="S0",
                           text="still here?", sent_at=now)
        produce_raw(settings, settings.kafka.input_topic, [(late.conversation_id.encode(), late.to_bytes())])
        while app.stats.events < 2 * len(pipeline.STAGES) + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        app.stop()
        thread.join(30)
    assert not errors, errors

    dead, _ = read_dead_letters(settings, timeout_s=20)
    by_offset = {}
    events = {e.message_id for e in read_events(settings, timeout_s=20).events}
    for d in dead:
        by_offset[ChatMessage.from_bytes(d.original()).message_id] = d
    assert {d.stage for d in dead} == set(pipeline.STAGES) and len(dead) == len(pipeline.STAGES)
    for stage, mid in poisoned.items():
        d = by_offset[mid]
        assert d.stage == stage and d.error_type == ("inference" if stage == "inference" else "processing"), d
        assert (mid in events) == (stage == "alerts")  # a failed rule costs the alerts, not the label
    good = {m.message_id for m in msgs} - set(poisoned.values())
    assert good | {f"{run}-late:0"} <= events
    assert app.metrics.value("erc_dead_letters_total", {"reason": "processing"}) == len(pipeline.STAGES) - 1
