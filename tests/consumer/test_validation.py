"""decode(): every input record becomes a ChatMessage or a DeadLetter with a machine type and a readable reason."""

from __future__ import annotations

import json

import pytest

from consumer.validation import decode
from core.records import ChatMessage, DeadLetter

VALID = {
    "message_id": "m-1", "conversation_id": "c-1", "turn": 0, "speaker": "Alice", "text": "hello",
    "sent_at": "2024-05-01T12:30:15+00:00",
}


def _decode(value: bytes | None, *, max_bytes: int = 1_000, key: bytes | None = b"c-1"):
    return decode(value, key=key, topic="in", partition=3, offset=41, max_bytes=max_bytes)


def _dead(value: bytes | None, **kw) -> DeadLetter:
    out = _decode(value, **kw)
    assert isinstance(out, DeadLetter), out
    assert (out.source_topic, out.source_partition, out.source_offset) == ("in", 3, 41)
    assert out.original() == (value or b"")
    assert out.reason
    return out


def test_valid_record_is_a_chat_message() -> None:
    out = _decode(json.dumps(VALID).encode())
    assert isinstance(out, ChatMessage)
    assert (out.message_id, out.conversation_id, out.turn, out.speaker, out.text) == ("m-1", "c-1", 0, "Alice", "hello")


def test_valid_non_ascii_record_is_a_chat_message() -> None:
    out = _decode(json.dumps({**VALID, "text": "ça va? 😀"}, ensure_ascii=False).encode())
    assert isinstance(out, ChatMessage) and out.text == "ça va? 😀"


def test_a_record_exactly_at_the_limit_passes() -> None:
    raw = json.dumps(VALID).encode()
    assert isinstance(_decode(raw, max_bytes=len(raw)), ChatMessage)


@pytest.mark.parametrize("raw", [b"{not json", b'{"turn": 1,', b"hello", b'{"text": "lone \\ud800 surrogate"}'])
def test_invalid_json(raw: bytes) -> None:
    d = _dead(raw)
    assert d.error_type == "invalid_json"
    assert d.reason.startswith("value is not JSON")


def test_invalid_utf8() -> None:
    raw = b'{"text": "caf\xe9"}'
    d = _dead(raw)
    assert d.error_type == "invalid_utf8"
    bad_at = raw.index(b"\xe9")
    assert "not UTF-8" in d.reason and f"byte {bad_at}" in d.reason
    assert d.original() == raw


def test_missing_field_is_a_schema_error_naming_the_field() -> None:
    d = _dead(json.dumps({k: v for k, v in VALID.items() if k != "speaker"}).encode())
    assert d.error_type == "schema"
    assert "speaker" in d.reason and "required" in d.reason.lower()


def test_wrong_type_is_a_schema_error_naming_the_field() -> None:
    d = _dead(json.dumps({**VALID, "turn": "3"}).encode())
    assert d.error_type == "schema"
    assert d.reason.startswith("turn:") and "integer" in d.reason


def test_several_schema_errors_are_all_named() -> None:
    d = _dead(json.dumps({**VALID, "turn": -1, "sent_at": "2024-05-01T12:30:15", "message_id": ""}).encode())
    assert d.error_type == "schema"
    for field in ("turn", "sent_at", "message_id"):
        assert f"{field}:" in d.reason


def test_json_that_is_not_an_object_is_a_schema_error() -> None:
    d = _dead(b"[1, 2, 3]")
    assert d.error_type == "schema"
    assert d.reason.startswith("<record>:")


def test_too_large_is_checked_before_parsing() -> None:
    raw = json.dumps({**VALID, "text": "x" * 2_000}).encode()
    d = _dead(raw, max_bytes=1_000)
    assert d.error_type == "too_large"
    assert str(len(raw)) in d.reason and "1000" in d.reason
    # even a record that is not JSON or UTF-8 is too_large first
    assert _dead(b"\xff" * 1_001, max_bytes=1_000).error_type == "too_large"


def test_a_zero_length_value_is_a_dead_letter() -> None:
    assert _dead(b"").error_type in {"empty", "invalid_json"}


def test_tombstone_is_empty() -> None:
    d = _dead(None)
    assert d.error_type == "empty"
    assert "no value" in d.reason


def test_key_is_kept() -> None:
    d = _dead(b"nope", key=b"conv-\xff")
    import base64

    assert base64.b64decode(d.key_b64) == b"conv-\xff"
    assert _dead(b"nope", key=None).key_b64 is None
