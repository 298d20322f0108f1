"""Decode and validate input records: a ChatMessage, or a DeadLetter that says why not.

Never raises for bad input: the stream must go on after any record.
"""

from __future__ import annotations

from pydantic import ValidationError

from erc_stream.schemas import ChatMessage, DeadLetter


def _schema_reason(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "<record>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def decode(
    value: bytes | None, *, key: bytes | None, topic: str, partition: int, offset: int, max_bytes: int
) -> ChatMessage | DeadLetter:
    """Turn one record value into a message, or into a dead letter with an error type and a reason."""

    def dead(error_type: str, reason: str) -> DeadLetter:
        return DeadLetter.for_record(
            error_type=error_type, reason=reason, topic=topic, partition=partition, offset=offset,
            value=value, key=key,
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
        return ChatMessage.from_bytes(value)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            return dead("invalid_json", f"value is not JSON: {e.errors()[0]['msg']}")
        return dead("schema", _schema_reason(e))
