"""Decode and validate input records: a ChatMessage, or a DeadLetter that says why not.

Never raises for bad input: the stream must go on after any record.
"""

from __future__ import annotations

from pydantic import ValidationError

from consumer.sanitize import has_control_chars
from core.records import ChatMessage, DeadLetter

#: Identifier fields that must be printable and not blank (they become Redis keys, log fields and event ids).
_ID_FIELDS = ("message_id", "conversation_id", "speaker", "tenant", "role", "reply_to")
#: Turns are Redis sorted-set scores (doubles): above 2**53 two turns could compare equal.
MAX_TURN = 2**53 - 1


def _schema_reason(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "<record>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def decode(
    value: bytes | None, *, key: bytes | None, topic: str, partition: int, offset: int, max_bytes: int,
    max_original_bytes: int | None = None,
) -> ChatMessage | DeadLetter:
    """Turn one record value into a message, or into a dead letter with an error type and a reason."""

    def dead(error_type: str, reason: str) -> DeadLetter:
        return DeadLetter.for_record(
            error_type=error_type, reason=reason, topic=topic, partition=partition, offset=offset,
            value=value, key=key, max_original_bytes=max_original_bytes,
        )

    if value is None:
        return dead("empty", "record has no value (a tombstone?)")
    if len(value) > max_bytes:
        return dead("too_large", f"record is {len(value)} bytes, over the {max_bytes}-byte limit")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as e:
        return dead("invalid_utf8", f"value is not UTF-8: {e.reason} at byte {e.start}")
    try:
        message = ChatMessage.from_bytes(value)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            return dead("invalid_json", f"value is not JSON: {e.errors()[0]['msg']}")
        version = [err for err in e.errors() if err["loc"] == ("schema_version",)]
        if version:
            return dead("unsupported_version", f"schema_version {version[0].get('input')!r} is not one this "
                        f"consumer reads (1, 2)")
        return dead("schema", _schema_reason(e))
    if message.turn is not None and message.turn > MAX_TURN:
        return dead("schema", f"turn: must be at most {MAX_TURN}")
    for name in _ID_FIELDS:
        field = getattr(message, name)
        if field is None:
            continue
        if not field.strip():
            return dead("schema", f"{name}: must not be blank")
        if has_control_chars(field):
            return dead("schema", f"{name}: must not contain control characters")
    return message
