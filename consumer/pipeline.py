"""One stream batch in, its events, alerts and dead letters out: a plain function of its inputs.

The stages, in order: decode and validate each record, clean its text to the token budget, append it to
its conversation's stored turns (one pipelined Redis round-trip), dead-letter id conflicts, label the
history windows in micro-batches (``batch.micro_batch_size`` messages a backend call), build the events,
evaluate the alert rules. Nothing here talks to Kafka, and the stateful parts — the conversation store,
the alert engine, the labelling routes — are inputs (:class:`Parts`), so the pipeline runs in a unit test
without a broker or Redis. Emitting and committing the outcome is :mod:`consumer.checkpoint`'s job.

A Redis failure in a stateful stage raises :class:`RedisDown`: nothing of the batch was emitted, so the
loop rewinds it and waits for Redis (see :mod:`consumer.app`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from consumer.conversation_store import StoredTurn, TurnUpdate
from consumer.sanitize import clean_text
from consumer.validation import decode
from core.records import Alert, ChatMessage, DeadLetter, EmotionEvent, utcnow
from core.settings import Settings
from scoring.labeler import Failed, Labelled
from scoring.prompts import Turn

#: Any Redis failure pauses the stream until Redis answers again (unreachable, loading, out of memory…).
REDIS_DOWN = (redis.RedisError,)


@dataclass(frozen=True)
class Polled:
    record: Any  # kafka ConsumerRecord (topic, partition, offset, key, value)
    received: float  # time.monotonic() at poll return


class RedisDown(Exception):
    """A stateful stage could not reach Redis; ``operation`` names it (a metric label)."""

    def __init__(self, message: str, operation: str) -> None:
        super().__init__(message)
        self.operation = operation


class ConversationTurns(Protocol):
    """Stores each conversation's turns and answers each new turn's history window (:class:`ConversationStore`)."""

    def append_many(self, turns: Sequence[tuple[str, StoredTurn]]) -> list[TurnUpdate]: ...


class AlertRules(Protocol):
    """The alert rules and their memory of sent alerts (:class:`consumer.alerts.AlertEngine`)."""

    def evaluate(self, items: Sequence[tuple[EmotionEvent, ChatMessage]]) -> list[Alert]: ...

    def unsent(self, alerts: Sequence[Alert]) -> list[Alert]: ...


class LabelRoutes(Protocol):
    """Which adapter and label set label a tenant's messages, and the labelling itself (:class:`scoring.routes.Routes`)."""

    def label(self, windows: Sequence[Sequence[Turn]], tenants: Sequence[str | None]) -> list[Labelled | Failed]: ...

    def labeler(self, tenant: str | None) -> Any: ...


@dataclass(frozen=True)
class Parts:
    """What the pipeline works with; each may be a test's own."""

    conversations: ConversationTurns
    routes: LabelRoutes
    alerts: AlertRules
    model_id: str
    count_tokens: Callable[[str], int]
    #: Called with the seconds each micro-batch's labelling took (the inference histogram).
    on_inference: Callable[[float], None] = lambda seconds: None


@dataclass
class Outcome:
    """What one batch produced: everything the checkpoint emits, and what the counters need."""

    events: list[tuple[EmotionEvent, ChatMessage]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    truncated: int = 0  # texts cut to the token budget


def process(batch: Sequence[Polled], settings: Settings, parts: Parts) -> Outcome:
    """Run every stage over ``batch``. Raises :class:`RedisDown` (redo the batch later); a failure of one
    message's labelling dead-letters that message only."""
    out = Outcome()
    valid = decode_all(batch, settings, out.dead)
    turns, out.truncated = stored_turns(valid, settings, parts.count_tokens)
    try:
        updates = parts.conversations.append_many(turns)
    except REDIS_DOWN as e:  # wait for it, lose nothing
        raise RedisDown(f"{type(e).__name__}: {e}", "window") from e
    valid, updates = drop_conflicts(valid, updates, settings, out.dead)
    results = label(valid, updates, settings, parts)
    out.events = build_events(valid, updates, results, settings, parts, out.dead)
    try:
        out.alerts = parts.alerts.unsent(parts.alerts.evaluate(out.events))
    except REDIS_DOWN as e:  # nothing was emitted yet: wait for Redis, redo the batch
        raise RedisDown(f"{type(e).__name__}: {e}", "alerts") from e
    return out


def decode_all(batch: Sequence[Polled], settings: Settings, dead: list[DeadLetter]) -> list[tuple[Polled, ChatMessage]]:
    """The batch's valid messages; every other record becomes a dead letter with its reason."""
    k = settings.kafka
    valid: list[tuple[Polled, ChatMessage]] = []
    for item in batch:
        r = item.record
        decoded = decode(r.value, key=r.key, topic=r.topic, partition=r.partition, offset=r.offset,
                         max_bytes=k.max_message_bytes, max_original_bytes=k.dlq_max_original_bytes)
        if isinstance(decoded, DeadLetter):
            dead.append(decoded)
        else:
            valid.append((item, decoded))
    return valid


def stored_turns(valid: Sequence[tuple[Polled, ChatMessage]], settings: Settings,
                 count_tokens: Callable[[str], int]) -> tuple[list[tuple[str, StoredTurn]], int]:
    """Each message as the turn its conversation stores (text cleaned and cut), and how many texts were cut."""
    w = settings.window
    turns: list[tuple[str, StoredTurn]] = []
    truncated = 0
    for _, m in valid:
        text, cut = clean_text(m.text, max_chars=w.max_turn_chars, max_tokens=w.max_turn_tokens,
                               count_tokens=count_tokens)
        truncated += cut
        turns.append((m.conversation_id, StoredTurn(m.turn, m.speaker, text, m.message_id)))
    return turns, truncated


def drop_conflicts(valid: Sequence[tuple[Polled, ChatMessage]], updates: Sequence[TurnUpdate], settings: Settings,
                   dead: list[DeadLetter]) -> tuple[list[tuple[Polled, ChatMessage]], list[TurnUpdate]]:
    """Dead-letter what must not be labelled: a message id already stored at another turn of the
    conversation (``duplicate_id``), or a different message claiming a stored turn (``conflict``).

    A redelivery of the same message (same id, same turn) is fine: it gets its event again, same id.
    """
    keep_valid: list[tuple[Polled, ChatMessage]] = []
    keep_updates: list[TurnUpdate] = []
    for (item, msg), u in zip(valid, updates):
        if u.duplicate_of_turn is not None:
            dead.append(_dead_letter(item, settings, "duplicate_id",
                                     f"message id {msg.message_id!r} is already turn {u.duplicate_of_turn} of "
                                     f"conversation {msg.conversation_id!r}, not turn {msg.turn}"))
            continue
        stored = u.window[-1].message_id
        if not u.added and stored != msg.message_id:
            dead.append(_dead_letter(item, settings, "conflict",
                                     f"turn {msg.turn} of conversation {msg.conversation_id!r} already holds message "
                                     f"{stored!r}"))
            continue
        keep_valid.append((item, msg))
        keep_updates.append(u)
    return keep_valid, keep_updates


def label(valid: Sequence[tuple[Polled, ChatMessage]], updates: Sequence[TurnUpdate], settings: Settings,
          parts: Parts) -> list[Labelled | Failed]:
    """Each message's history window labelled by its tenant's route, one backend call per micro-batch."""
    windows = [[t.as_prompt_turn() for t in u.window] for u in updates]
    tenants = [m.tenant for _, m in valid]
    results: list[Labelled | Failed] = []
    step = settings.batch.micro_batch_size
    for start in range(0, len(windows), step):
        began = time.monotonic()
        results += parts.routes.label(windows[start:start + step], tenants[start:start + step])
        parts.on_inference(time.monotonic() - began)
    return results


def build_events(valid: Sequence[tuple[Polled, ChatMessage]], updates: Sequence[TurnUpdate],
                 results: Sequence[Labelled | Failed], settings: Settings, parts: Parts,
                 dead: list[DeadLetter]) -> list[tuple[EmotionEvent, ChatMessage]]:
    """One event per labelled message; a failed or invalid result dead-letters its message (``inference``)."""
    events: list[tuple[EmotionEvent, ChatMessage]] = []
    for (item, msg), update, result in zip(valid, updates, results):
        if isinstance(result, Failed):
            dead.append(_dead_letter(item, settings, "inference", result.error))
            continue
        try:
            events.append((event(item, msg, update, result, settings, parts), msg))
        except ValueError as e:  # a backend answer that breaks the event's invariants: that item only
            dead.append(_dead_letter(item, settings, "inference", f"invalid result: {e}"))
    return events


def event(item: Polled, msg: ChatMessage, update: TurnUpdate, result: Labelled, settings: Settings,
          parts: Parts) -> EmotionEvent:
    labeler = parts.routes.labeler(msg.tenant)
    label_set = labeler.label_set
    return EmotionEvent(
        event_id=EmotionEvent.make_id(msg.message_id, parts.model_id, labeler.adapter),
        message_id=msg.message_id,
        conversation_id=msg.conversation_id,
        turn=msg.turn,
        speaker=msg.speaker,
        tenant=msg.tenant,
        label=result.label,
        probabilities=result.probabilities,
        label_set=label_set.name,
        model=parts.model_id,
        adapter=labeler.adapter,
        window=result.turns_used,
        latency_ms=round((time.monotonic() - item.received) * 1000, 3),
        emitted_at=utcnow(),
        gold_label=label_set.map_gold(msg.gold_label) if msg.gold_label else None,
        window_degraded=update.degraded(msg.turn, settings.window.size),
    )


def _dead_letter(item: Polled, settings: Settings, error_type: str, reason: str) -> DeadLetter:
    r = item.record
    return DeadLetter.for_record(error_type=error_type, reason=reason, topic=r.topic, partition=r.partition,
                                 offset=r.offset, value=r.value, key=r.key,
                                 max_original_bytes=settings.kafka.dlq_max_original_bytes)
