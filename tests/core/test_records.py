"""The wire records: strict input, validated events, deterministic ids, dead letters that keep the bytes."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from core.records import SCHEMA_VERSION, ChatMessage, DeadLetter, EmotionEvent

SENT = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


def _message(**overrides) -> ChatMessage:
    fields = dict(
        message_id="m-1", conversation_id="c-1", turn=3, speaker="Alice", text="Héllo — wörld ✓",
        sent_at=SENT, tenant="acme", gold_label="joy",
    )
    fields.update(overrides)
    return ChatMessage(**fields)


def _wire(**overrides) -> dict:
    d = {
        "schema_version": 1, "message_id": "m-1", "conversation_id": "c-1", "turn": 3,
        "speaker": "Alice", "text": "hi", "sent_at": "2024-05-01T12:30:15Z",
    }
    d.update(overrides)
    return d


def _raw(d: dict) -> bytes:
    return json.dumps(d).encode()


# -- ChatMessage ------------------------------------------------------------------------------


def test_chat_message_round_trips_through_bytes() -> None:
    msg = _message()
    raw = msg.to_bytes()
    assert isinstance(raw, bytes)
    back = ChatMessage.from_bytes(raw)
    assert back == msg
    assert back.sent_at == SENT and back.sent_at.utcoffset() == timedelta(0)
    assert back.schema_version == SCHEMA_VERSION == 1
    assert back.text == "Héllo — wörld ✓"


def test_chat_message_round_trip_omits_none_and_keeps_other_timezones() -> None:
    tz = timezone(timedelta(hours=5, minutes=30))
    msg = _message(tenant=None, gold_label=None, sent_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz))
    raw = msg.to_bytes()
    assert b"tenant" not in raw and b"gold_label" not in raw
    back = ChatMessage.from_bytes(raw)
    assert back == msg and back.sent_at.utcoffset() == timedelta(hours=5, minutes=30)


def test_chat_message_parses_a_minimal_wire_record_and_ignores_extra_keys() -> None:
    msg = ChatMessage.from_bytes(_raw(_wire(extra_field="ignored")))
    assert msg.turn == 3 and msg.tenant is None and msg.gold_label is None
    assert msg.sent_at == datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)


@pytest.mark.parametrize("missing", ["message_id", "conversation_id", "turn", "speaker", "text", "sent_at"])
def test_chat_message_rejects_a_missing_required_field(missing: str) -> None:
    d = _wire()
    del d[missing]
    with pytest.raises(ValidationError) as info:
        ChatMessage.from_bytes(_raw(d))
    assert any(e["loc"] == (missing,) and e["type"] == "missing" for e in info.value.errors())
    if missing == "turn":  # required by version 1 only: version 2 numbers turns by arrival
        assert ChatMessage.from_bytes(_raw({**d, "schema_version": 2})).turn is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("turn", "3"),  # strict: a numeric string is not a number
        ("turn", 3.5),
        ("turn", True),
        ("turn", None),
        ("message_id", 42),
        ("speaker", ["Alice"]),
        ("text", None),
        ("text", 7),
        ("sent_at", 1714566615),  # strict: an epoch number is not a datetime
        ("schema_version", 3),
        ("schema_version", "1"),
        ("tenant", 5),
    ],
)
def test_chat_message_rejects_wrong_types(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        ChatMessage.from_bytes(_raw(_wire(**{field: value})))
    assert any(e["loc"][0] == field for e in info.value.errors())


def test_chat_message_rejects_a_negative_turn() -> None:
    with pytest.raises(ValidationError) as info:
        ChatMessage.from_bytes(_raw(_wire(turn=-1)))
    assert info.value.errors()[0]["loc"] == ("turn",)
    ChatMessage.from_bytes(_raw(_wire(turn=0)))  # zero is the first turn


def test_chat_message_rejects_a_naive_datetime() -> None:
    with pytest.raises(ValidationError) as info:
        ChatMessage.from_bytes(_raw(_wire(sent_at="2024-05-01T12:30:15")))
    assert info.value.errors()[0]["loc"] == ("sent_at",)
    with pytest.raises(ValidationError):
        _message(sent_at=datetime(2024, 5, 1, 12, 30, 15))  # in Python too


@pytest.mark.parametrize("field", ["message_id", "conversation_id", "speaker"])
def test_chat_message_rejects_empty_ids(field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatMessage.from_bytes(_raw(_wire(**{field: ""})))
    assert info.value.errors()[0]["loc"] == (field,)


def test_chat_message_accepts_empty_text() -> None:
    assert ChatMessage.from_bytes(_raw(_wire(text=""))).text == ""


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"turn": 1,}', b"\x00\x01"])
def test_chat_message_rejects_invalid_json(raw: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        ChatMessage.from_bytes(raw)
    assert info.value.errors()[0]["type"] == "json_invalid"


@pytest.mark.parametrize("raw", [b"[]", b"3", b'"a string"', b"null"])
def test_chat_message_rejects_json_that_is_not_an_object(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        ChatMessage.from_bytes(raw)


def test_chat_message_is_frozen() -> None:
    with pytest.raises(ValidationError):
        _message().turn = 4  # type: ignore[misc]


# -- EmotionEvent -----------------------------------------------------------------------------


def _event(**overrides) -> EmotionEvent:
    fields = dict(
        event_id=EmotionEvent.make_id(tenant=None, conversation_id="c-1", message_id="m-1", model="smollm2-135m",
                                      adapter=None), message_id="m-1", conversation_id="c-1",
        turn=3, speaker="Alice", label="joyful", probabilities={"joyful": 0.7, "sad": 0.2, "neutral": 0.1},
        label_set="meld", model="smollm2-135m", window=4, latency_ms=12.5, emitted_at=SENT,
    )
    fields.update(overrides)
    return EmotionEvent(**fields)


def test_emotion_event_round_trips_through_bytes() -> None:
    event = _event(tenant="acme", adapter="meld-lora", gold_label="joyful")
    assert EmotionEvent.from_bytes(event.to_bytes()) == event


def test_emotion_event_rejects_a_label_not_in_its_probabilities() -> None:
    with pytest.raises(ValidationError, match="not among the probabilities"):
        _event(label="angry")


@pytest.mark.parametrize("probs", [{"joyful": 0.7, "sad": 0.2}, {"joyful": 0.9, "sad": 0.2}, {"joyful": 0.0}])
def test_emotion_event_rejects_probabilities_that_do_not_sum_to_one(probs: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match="sum to"):
        _event(probabilities=probs)


def test_emotion_event_tolerates_float_rounding_in_the_sum() -> None:
    third = 1 / 3
    _event(label="a", probabilities={"a": third, "b": third, "c": third})
    _event(label="a", probabilities={"a": 0.5004, "b": 0.5})  # within 1e-3


def test_emotion_event_validator_applies_when_reading_bytes() -> None:
    d = json.loads(_event().to_bytes())
    d["probabilities"] = {"joyful": 0.5, "sad": 0.1}
    with pytest.raises(ValidationError):
        EmotionEvent.from_bytes(json.dumps(d).encode())


def test_make_id_is_deterministic_and_depends_on_tenant_conversation_message_model_and_adapter_version() -> None:
    def make(tenant=None, conv="c-1", mid="m-1", model="smollm2-135m", adapter=None):
        return EmotionEvent.make_id(tenant=tenant, conversation_id=conv, message_id=mid, model=model, adapter=adapter)

    a = make()
    assert a == make()
    assert a == make(adapter="")  # no adapter either way
    assert a != make(adapter="meld-lora@0123456789ab")
    assert make(adapter="meld-lora@0123456789ab") != make(adapter="meld-lora@ba9876543210")  # another version
    assert a != make(mid="m-2") and a != make(model="null")
    assert a != make(conv="c-2")  # two conversations that both number their messages "m-1"
    assert a != make(tenant="acme") and make(tenant="acme") != make(tenant="globex")
    # An unambiguous encoding: moving a separator between fields gives another id.
    assert make(conv="a|b", mid="c") != make(conv="a", mid="b|c")
    import uuid

    assert uuid.UUID(a).version == 5


# -- DeadLetter -------------------------------------------------------------------------------


def test_dead_letter_keeps_the_original_bytes_and_key() -> None:
    original = b"\xff\xfe{not json\x00" + bytes(range(256))
    d = DeadLetter.for_record(
        error_type="invalid_utf8", reason="bad", topic="t", partition=2, offset=17, value=original, key=b"c-\xff",
    )
    assert d.original() == original
    assert base64.b64decode(d.key_b64) == b"c-\xff"
    back = DeadLetter.from_bytes(d.to_bytes())
    assert back.original() == original
    assert (back.error_type, back.source_topic, back.source_partition, back.source_offset) == ("invalid_utf8", "t", 2, 17)
    assert back.failed_at.tzinfo is not None


def test_dead_letter_without_value_or_key() -> None:
    d = DeadLetter.for_record(error_type="empty", reason="none", topic="t", partition=0, offset=0, value=None, key=None)
    assert d.original() == b"" and d.key_b64 is None
    assert b"key_b64" not in d.to_bytes()


def test_dead_letter_reason_is_capped() -> None:
    d = DeadLetter.for_record(error_type="schema", reason="x" * 5000, topic="t", partition=0, offset=0,
                              value=b"v", key=None)
    assert len(d.reason) == 2000
