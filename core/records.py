"""The one schema module: every record erc-stream reads or writes on Kafka, as pydantic v2 models.

Wire format is JSON (UTF-8). Every record carries ``schema_version``; readers accept the versions
they know and reject others with a clear reason. Input validation is strict: ``"turn": "3"`` is a
wrong type, not a number, so a producer's bug surfaces in the dead-letter topic instead of being
silently coerced.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails

SCHEMA_VERSION = 1
# Namespace of event ids: uuid5 of the JSON list [tenant, conversation id, message id, model, adapter@version].
EVENT_NAMESPACE = uuid.UUID("6f1c7a52-3b0e-4c1e-9a51-2d7c0e4b9f10")
# Namespace of alert ids: uuid5 of the JSON list [rule, tenant, conversation id, trigger message id].
ALERT_NAMESPACE = uuid.UUID("0b8f3c2e-7d41-4a9b-8e6f-5c2a1d9e4f70")


def _identity(*parts: str | None) -> str:
    # JSON, not a separator: no id can make two different tuples encode alike ("a|b", "c" vs "a", "b|c").
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


def conversation_scope(tenant: str | None, conversation_id: str) -> str:
    """A conversation's identity across tenants (its state's key in Redis): two tenants' conversation "1" are
    two conversations. ``t<len>:<tenant>:<id>`` with a tenant, ``n:<id>`` without: the first character tells the
    two apart and the length delimits the tenant, so no conversation id of one tenant (or of none) can name another
    tenant's conversation."""
    return f"n:{conversation_id}" if tenant is None else f"t{len(tenant)}:{tenant}:{conversation_id}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode("utf-8")


#: Roles the alert rules and the docs name; ``role`` takes any other string too.
ROLES = ("customer", "agent", "system")


class ChatMessage(_Record):
    """A chat message on ``chat.messages``, keyed by ``conversation_id``.

    Version 1 needs ``turn``. Version 2 adds ``role`` and ``reply_to`` and makes ``turn`` optional (the consumer
    numbers a conversation's messages by arrival when it is absent). ``message_id`` need only be unique within
    its conversation (and tenant)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True, str_strip_whitespace=False)

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    message_id: str = Field(min_length=1, max_length=256)
    conversation_id: str = Field(min_length=1, max_length=256)
    turn: int | None = Field(None, ge=0, description="Order of the message within its conversation (version 1: "
                             "required; version 2: optional, assigned by arrival when absent).")
    speaker: str = Field(min_length=1, max_length=256)
    role: str | None = Field(None, min_length=1, max_length=64,
                             description="The speaker's role: customer, agent, system, or any other (version 2).")
    reply_to: str | None = Field(None, min_length=1, max_length=256,
                                 description="The message id this one replies to, in the same conversation (version 2).")
    text: str
    sent_at: AwareDatetime
    tenant: str | None = Field(None, max_length=256)
    gold_label: str | None = Field(None, max_length=64, description="Carried by replays of labelled data.")

    @model_validator(mode="after")
    def _version_fields(self) -> "ChatMessage":
        if self.schema_version == 1 and self.turn is None:  # version 2 makes it optional
            raise ValidationError.from_exception_data(
                type(self).__name__, [InitErrorDetails(type="missing", loc=("turn",), input=None)])
        return self

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ChatMessage":
        return cls.model_validate_json(raw)


class EmotionEvent(_Record):
    """An emotion event on ``chat.emotions``, keyed by ``conversation_id``."""

    schema_version: Literal[1, 2] = 2
    event_id: str
    message_id: str
    conversation_id: str
    turn: int
    speaker: str
    role: str | None = None
    reply_to: str | None = None
    tenant: str | None = None
    label: str
    probabilities: dict[str, float]
    label_set: str
    model: str
    adapter: str | None = None
    adapter_version: str | None = Field(None, description="The adapter's content hash (its immutable version).")
    window: int = Field(description="Turns in the prompt's history window, the target included.")
    latency_ms: float = Field(description="Processing latency: from the poll that took the message to this event's "
                              "creation (an event cannot carry its own ack; erc_processing_latency_seconds measures "
                              "from the same poll to the ack, erc_end_to_end_latency_seconds from sent_at to the ack).")
    emitted_at: AwareDatetime
    gold_label: str | None = None
    window_degraded: bool = Field(
        False,
        description="The window lacked turns it should have held (Redis lost the conversation's state, a turn "
        "gap in the input, or a replay older than the retained turns): the label saw less context.",
    )

    @model_validator(mode="after")
    def _check_probabilities(self) -> "EmotionEvent":
        if self.label not in self.probabilities:
            raise ValueError(f"label {self.label!r} is not among the probabilities' labels")
        total = sum(self.probabilities.values())
        if not math.isclose(total, 1.0, abs_tol=1e-3):
            raise ValueError(f"probabilities sum to {total}, not 1")
        return self

    @staticmethod
    def make_id(*, tenant: str | None, conversation_id: str, message_id: str, model: str,
                adapter: str | None) -> str:
        """Deterministic: the same message of the same conversation and tenant, labelled by the same model and
        adapter version (``adapter`` = ``NAME@VERSION``), always has the same id; any other message, another."""
        return str(uuid.uuid5(EVENT_NAMESPACE, _identity(tenant, conversation_id, message_id, model, adapter or None)))

    @classmethod
    def from_bytes(cls, raw: bytes) -> "EmotionEvent":
        return cls.model_validate_json(raw)


class DeadLetter(_Record):
    """A record the stream could not turn into an event, on ``chat.dlq``, with why."""

    schema_version: Literal[1] = SCHEMA_VERSION
    error_type: str = Field(description="A short machine-readable class: invalid_json, invalid_utf8, schema, "
                            "unsupported_version, too_large, empty, conflict, duplicate_id, inference (the model), processing (any other failure of "
                            "this message in the pipeline), tenant_missing / tenant_mismatch (tenancy.source is topic or header and "
                            "names no tenant, or another one than the message claims), undecodable_batch (a whole record batch that could not be "
                            "decoded: corrupt, unknown codec, or inflating past kafka.max_decompressed_batch_bytes; "
                            "no original); notify_refused (an alert a webhook refused for good: "
                            "source_topic is the alerts topic).")
    reason: str
    stage: str | None = Field(None, description="The pipeline stage the message failed in (decode, sanitize, "
                              "conversation, prompt, inference, calibration, event, alerts), when it got past "
                              "validation.")
    source_topic: str
    source_partition: int
    source_offset: int
    source_end_offset: int | None = Field(
        None, description="For a record batch (undecodable_batch): the offset after it; the batch spans "
        "source_offset to source_end_offset - 1.")
    original_b64: str = Field(description="The original record value, base64.")
    key_b64: str | None = None
    failed_at: AwareDatetime = Field(default_factory=utcnow)
    original_size: int | None = Field(None, description="Bytes of the original value (set when it was cut).")
    original_truncated: bool = Field(False, description="original_b64 holds only the first bytes of the value.")

    @classmethod
    def for_record(
        cls, *, error_type: str, reason: str, topic: str, partition: int, offset: int,
        value: bytes | None, key: bytes | None, max_original_bytes: int | None = None, stage: str | None = None,
    ) -> "DeadLetter":
        value = value or b""
        cut = max_original_bytes is not None and len(value) > max_original_bytes
        return cls(
            error_type=error_type,
            reason=reason[:2000],
            stage=stage,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            original_b64=base64.b64encode(value[:max_original_bytes] if cut else value).decode("ascii"),
            key_b64=base64.b64encode(key[:1024]).decode("ascii") if key is not None else None,
            original_size=len(value) if cut else None,
            original_truncated=cut,
        )

    def original(self) -> bytes:
        return base64.b64decode(self.original_b64)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "DeadLetter":
        return cls.model_validate_json(raw)


class AlertEvidence(_Record):
    """One message behind an alert: which message, what it was labelled, how sure the model was."""

    message_id: str
    conversation_id: str
    turn: int
    speaker: str
    label: str
    probability: float = Field(description="The probability of ``label``.")
    probabilities: dict[str, float] = Field(default_factory=dict, description="Every label's probability.")


class Alert(_Record):
    """An alert on ``chat.alerts``, keyed by its conversation (conversation rules) or tenant (tenant rules).

    ``alert_id`` is deterministic (uuid5 of rule, scope and the message that triggered it): a redelivered
    message that raises an alert again raises the same id, and readers keep the first copy.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    alert_id: str
    rule: Literal["negative_streak", "shift_to_anger", "tenant_negative_rate"]
    severity: Literal["warning", "critical"] = "warning"
    summary: str
    conversation_id: str | None = Field(None, description="Set by the conversation rules.")
    tenant: str | None = None
    trigger_message_id: str = Field(description="The message whose event raised the alert.")
    evidence: list[AlertEvidence]
    metrics: dict[str, float] = Field(
        default_factory=dict, description="The rule's figures: streak length, negative rate, window size, ..."
    )
    label_set: str
    model: str
    adapter: str | None = None
    adapter_version: str | None = None
    raised_at: AwareDatetime = Field(default_factory=utcnow)

    @staticmethod
    def make_id(rule: str, *, tenant: str | None, conversation_id: str, trigger_message_id: str) -> str:
        """Deterministic: the same rule fired by the same message (of that conversation and tenant), the same id."""
        return str(uuid.uuid5(ALERT_NAMESPACE, _identity(rule, tenant, conversation_id, trigger_message_id)))

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Alert":
        return cls.model_validate_json(raw)
