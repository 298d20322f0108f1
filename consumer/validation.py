"""Decode and validate input records: a ChatMessage, or a DeadLetter that says why not; then its tenant from the
source the deployment trusts (``tenancy.source``).

Never raises for bad input: the stream must go on after any record.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from pydantic import ValidationError

from consumer.sanitize import has_control_chars
from core.records import ChatMessage, DeadLetter
from core.settings import TenancySettings

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


@lru_cache(maxsize=8)
def _pattern(expression: str) -> re.Pattern[str]:
    return re.compile(expression)


def trusted_tenant(topic: str, headers: Sequence[tuple[str, bytes | None]] | None,
                   tenancy: TenancySettings) -> str | None:
    """The tenant of a record from its topic or its header (``None``: that source names none). Raises ValueError
    when the source names one that is not a valid identifier."""
    if tenancy.source == "topic":
        match = _pattern(tenancy.topic_pattern).fullmatch(topic)
        tenant = match["tenant"] if match else None
    else:
        raw = next((v for k, v in headers or () if k == tenancy.header), None)
        tenant = raw.decode("utf-8") if raw is not None else None
    if tenant is not None and (not tenant.strip() or has_control_chars(tenant) or len(tenant) > 256):
        raise ValueError("the trusted tenant must be printable, not blank, at most 256 characters")
    return tenant


def with_trusted_tenant(message: ChatMessage, *, topic: str, headers, tenancy: TenancySettings,
                        dead) -> ChatMessage | DeadLetter:
    """``message`` with the tenant of its trusted source (``tenancy.source`` topic or header), or a dead letter:
    ``tenant_missing`` when that source names none, ``tenant_mismatch`` when the message claims another one. With
    ``source = "message"`` the message is returned as it is."""
    if tenancy.source == "message":
        return message
    where = f"topic {topic!r}" if tenancy.source == "topic" else f"header {tenancy.header!r}"
    try:
        tenant = trusted_tenant(topic, headers, tenancy)
    except (ValueError, UnicodeDecodeError) as e:
        return dead("tenant_missing", f"{where}: {e}")
    if tenant is None:
        return dead("tenant_missing", f"no tenant in {where} (tenancy.source = {tenancy.source})")
    if message.tenant is not None and message.tenant != tenant:
        return dead("tenant_mismatch", f"the message claims tenant {message.tenant!r}; {where} says {tenant!r}")
    return message if message.tenant == tenant else message.model_copy(update={"tenant": tenant})


def decode(
    value: bytes | None, *, key: bytes | None, topic: str, partition: int, offset: int, max_bytes: int,
    max_original_bytes: int | None = None, headers=None, tenancy: TenancySettings | None = None,
) -> ChatMessage | DeadLetter:
    """Turn one record value into a message (its tenant from ``tenancy``'s trusted source), or into a dead letter
    with an error type and a reason."""

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
    if tenancy is None:
        return message
    return with_trusted_tenant(message, topic=topic, headers=headers, tenancy=tenancy, dead=dead)
