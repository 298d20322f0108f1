"""One stream batch in, its events, alerts and dead letters out: a plain function of its inputs.

The stages, in order: decode and validate each record, clean its text to the token budget, append it to
its conversation's stored turns (one pipelined Redis round-trip), dead-letter id conflicts, label the
history windows in micro-batches (``batch.micro_batch_size`` messages a backend call), build the events,
evaluate the alert rules. Nothing here talks to Kafka, and the stateful parts — the conversation store,
the alert engine, the labelling routes — are inputs (:class:`Parts`), so the pipeline runs in a unit test
without a broker or Redis. Emitting and committing the outcome is :mod:`consumer.checkpoint`'s job.

A record batch that could not be decoded arrives as one :class:`~consumer.record_batches.SkippedBatch` and
becomes one dead letter (``undecodable_batch``) naming its partition and offsets.

Failures are contained per message. One message that breaks a stage — its text, its state update, its
prompt, its demonstration lookup, its scores, its label-prior correction, its event or its alert rules —
is dead-lettered (``error_type`` ``processing``, or ``inference`` for the model; the ``stage`` and the
exception in the dead letter) and the rest of the batch goes on: a batched stage that raises is redone item
by item (:func:`scoring.fallback.batch_or_each`). So no message can stop the stream or make it fail the same
batch again on every redelivery. What is nobody's message's fault — Redis unreachable, out of memory,
loading, read-only — raises :class:`RedisDown`; a model backend that fails a batch, an item alone and then a
known-good probe raises :class:`~scoring.fallback.PartDown`. Either way nothing of the batch was emitted, so
the loop rewinds it and waits for that part (see :mod:`consumer.app`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
import redis.exceptions as redis_errors
import structlog

from consumer.conversation_store import StoredTurn, TurnUpdate
from consumer.record_batches import SkippedBatch
from consumer.sanitize import clean_text
from consumer.validation import decode
from core.records import Alert, ChatMessage, DeadLetter, EmotionEvent, conversation_scope, utcnow
from core.settings import Settings
from scoring.fallback import batch_or_each, describe
from scoring.labeler import Failed, Labelled
from scoring.prompts import Turn, WindowShape

log = structlog.get_logger(__name__)

#: Redis failures pause the stream until Redis answers again (see :func:`redis_outage` for which). redis-py's
#: cluster client raises RedisClusterException (not a RedisError) when it cannot reach the cluster at all.
REDIS_DOWN = (redis.RedisError, redis_errors.RedisClusterException)
#: Error replies that are the server's state, not the command's fault (redis-py maps some to classes).
_SERVER_ERRORS = (redis_errors.OutOfMemoryError, redis_errors.ReadOnlyError, redis_errors.BusyLoadingError,
                  redis_errors.MasterDownError, redis_errors.TryAgainError, redis_errors.ClusterDownError)
_SERVER_CODES = frozenset({"OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
                           "NOREPLICAS", "MISCONF"})

#: The stages a message can fail in, as its dead letter names them.
STAGES = ("decode", "sanitize", "conversation", "prompt", "inference", "calibration", "event", "alerts")


def redis_outage(e: BaseException) -> bool:
    """Redis itself is the problem (unreachable, out of memory, loading, read-only…), not the message: wait.

    Any other error reply (a script that fails on one message's data) is that message's failure."""
    if not isinstance(e, REDIS_DOWN):
        return False
    if isinstance(e, _SERVER_ERRORS) or not isinstance(e, redis.ResponseError):
        return True
    return str(e).split(" ", 1)[0] in _SERVER_CODES


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


#: A valid message and the record it came in.
Item = tuple[Polled, ChatMessage]


@dataclass
class Outcome:
    """What one batch produced: everything the checkpoint emits, and what the counters need."""

    events: list[tuple[EmotionEvent, ChatMessage]] = field(default_factory=list)
    received: list[float] = field(default_factory=list)  # each event's message's poll time (time.monotonic())
    alerts: list[Alert] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    truncated: int = 0  # texts cut to the token budget


def process(batch: Sequence[Polled], settings: Settings, parts: Parts) -> Outcome:
    """Run every stage over ``batch``. Raises :class:`RedisDown` (redo the batch later); a failure of one
    message dead-letters that message only."""
    out = Outcome()
    valid = decode_all(batch, settings, out.dead)
    valid, turns, out.truncated = stored_turns(valid, settings, parts.count_tokens, out.dead)
    valid, updates = update_conversations(valid, turns, settings, parts, out.dead)
    valid, updates = drop_conflicts(valid, updates, settings, out.dead)
    results = label(valid, updates, settings, parts)
    labelled = build_events(valid, updates, results, settings, parts, out.dead)
    out.events = [(e, m) for _, e, m in labelled]
    out.received = [item.received for item, _, _ in labelled]
    out.alerts = evaluate_alerts(labelled, settings, parts, out.dead)
    return out


def decode_all(batch: Sequence[Polled], settings: Settings, dead: list[DeadLetter]) -> list[Item]:
    """The batch's valid messages; every other record becomes a dead letter with its reason."""
    k = settings.kafka
    valid: list[Item] = []
    for item in batch:
        r = item.record
        if isinstance(r, SkippedBatch):
            dead.append(DeadLetter.for_record(
                error_type="undecodable_batch", reason=f"record batch at offsets {r.offset}..{r.end - 1}: {r.reason}",
                topic=r.topic, partition=r.partition, offset=r.offset, value=None, key=None,
            ).model_copy(update={"source_end_offset": r.end}))
            continue
        try:
            decoded = decode(r.value, key=r.key, topic=r.topic, partition=r.partition, offset=r.offset,
                             max_bytes=k.max_message_bytes, max_original_bytes=k.dlq_max_original_bytes,
                             headers=r.headers, tenancy=settings.tenancy)
        except Exception as e:  # noqa: BLE001 - decode never raises by contract; if it does, this record only
            dead.append(failed(item, settings, "decode", e))
            continue
        if isinstance(decoded, DeadLetter):
            dead.append(decoded)
        else:
            valid.append((item, decoded))
    return valid


def stored_turns(valid: Sequence[Item], settings: Settings, count_tokens: Callable[[str], int],
                 dead: list[DeadLetter]) -> tuple[list[Item], list[tuple[str, StoredTurn]], int]:
    """Each message as the turn its conversation stores (text cleaned and cut), and how many texts were cut."""
    w = settings.window
    kept: list[Item] = []
    turns: list[tuple[str, StoredTurn]] = []
    truncated = 0
    for item, m in valid:
        try:
            text, cut = clean_text(m.text, max_chars=w.max_turn_chars, max_tokens=w.max_turn_tokens,
                                   count_tokens=count_tokens)
        except Exception as e:  # noqa: BLE001 - this message only
            dead.append(failed(item, settings, "sanitize", e))
            continue
        truncated += cut
        kept.append((item, m))
        stored = StoredTurn(m.turn, m.speaker, text, m.message_id, m.reply_to)
        turns.append((conversation_scope(m.tenant, m.conversation_id), stored))
    return kept, turns, truncated


def update_conversations(valid: Sequence[Item], turns: Sequence[tuple[str, StoredTurn]], settings: Settings,
                         parts: Parts, dead: list[DeadLetter]) -> tuple[list[Item], list[TurnUpdate]]:
    """Each turn appended to its conversation's state, with its history window (one pipelined round trip)."""
    try:
        updates = batch_or_each(parts.conversations.append_many, turns, what="conversation update",
                                passthrough=redis_outage)
    except REDIS_DOWN as e:  # wait for it, lose nothing
        raise RedisDown(f"{type(e).__name__}: {e}", "window") from e
    kept: list[Item] = []
    kept_updates: list[TurnUpdate] = []
    for item_msg, update in zip(valid, updates):
        if isinstance(update, Exception):
            dead.append(failed(item_msg[0], settings, "conversation", update))
        else:
            kept.append(item_msg)
            kept_updates.append(update)
    return kept, kept_updates


def drop_conflicts(valid: Sequence[Item], updates: Sequence[TurnUpdate], settings: Settings,
                   dead: list[DeadLetter]) -> tuple[list[Item], list[TurnUpdate]]:
    """Dead-letter what must not be labelled: a message id already stored at another turn of the
    conversation (``duplicate_id``), or a different message claiming a stored turn (``conflict``).

    A redelivery of the same message (same id, same turn) is fine: it gets its event again, same id.
    """
    keep_valid: list[Item] = []
    keep_updates: list[TurnUpdate] = []
    for (item, msg), u in zip(valid, updates):
        if u.duplicate_of_turn is not None:
            dead.append(_dead_letter(item, settings, "duplicate_id",
                                     f"message id {msg.message_id!r} is already turn {u.duplicate_of_turn} of "
                                     f"conversation {msg.conversation_id!r}, not turn {u.turn}"))
            continue
        stored = u.window[-1].message_id
        if not u.added and stored != msg.message_id:
            dead.append(_dead_letter(item, settings, "conflict",
                                     f"turn {u.turn} of conversation {msg.conversation_id!r} already holds message "
                                     f"{stored!r}"))
            continue
        keep_valid.append((item, msg))
        keep_updates.append(u)
    return keep_valid, keep_updates


def label(valid: Sequence[Item], updates: Sequence[TurnUpdate], settings: Settings,
          parts: Parts) -> list[Labelled | Failed]:
    """Each message's history window labelled by its tenant's route, one backend call per micro-batch."""
    items = [(u.prompt_turns(), m.tenant) for (_, m), u in zip(valid, updates)]

    def label_items(chunk: Sequence[tuple[list[Turn], str | None]]) -> list[Labelled | Failed]:
        return parts.routes.label([w for w, _ in chunk], [t for _, t in chunk])

    results: list[Labelled | Failed] = []
    step = settings.batch.micro_batch_size
    for start in range(0, len(items), step):
        began = time.monotonic()
        got = batch_or_each(label_items, items[start:start + step], what="labelling")
        results += [Failed(describe(r), "prompt") if isinstance(r, Exception) else r for r in got]
        parts.on_inference(time.monotonic() - began)
    return results


def build_events(valid: Sequence[Item], updates: Sequence[TurnUpdate], results: Sequence[Labelled | Failed],
                 settings: Settings, parts: Parts, dead: list[DeadLetter],
                 ) -> list[tuple[Polled, EmotionEvent, ChatMessage]]:
    """One event per labelled message; a failed result dead-letters its message at the stage it failed in."""
    events: list[tuple[Polled, EmotionEvent, ChatMessage]] = []
    for (item, msg), update, result in zip(valid, updates, results):
        if isinstance(result, Failed):
            error_type = "inference" if result.stage == "inference" else "processing"
            dead.append(_dead_letter(item, settings, error_type, result.error, result.stage))
            continue
        try:
            events.append((item, event(item, msg, update, result, settings, parts), msg))
        except ValueError as e:  # a backend answer that breaks the event's invariants: that item only
            dead.append(_dead_letter(item, settings, "inference", f"invalid result: {e}", "event"))
        except Exception as e:  # noqa: BLE001 - this message only
            dead.append(failed(item, settings, "event", e))
    return events


def evaluate_alerts(labelled: Sequence[tuple[Polled, EmotionEvent, ChatMessage]], settings: Settings, parts: Parts,
                    dead: list[DeadLetter]) -> list[Alert]:
    """The alerts the events raise that were not sent yet. An event whose rules fail keeps its event and is
    dead-lettered too (stage ``alerts``): replaying it evaluates them again (same alert ids, same event id)."""
    events = [(e, m) for _, e, m in labelled]
    try:
        try:
            raised = parts.alerts.evaluate(events)
        except Exception as e:  # noqa: BLE001 - one event's rules failed the batch: each event alone, in order
            if redis_outage(e):
                raise
            log.warning("alert rules failed for a batch; evaluating each event alone", error=describe(e))
            raised = []
            for item, ev, msg in labelled:
                try:
                    raised += parts.alerts.evaluate([(ev, msg)])
                except Exception as item_error:  # noqa: BLE001 - this event's rules only
                    if redis_outage(item_error):
                        raise
                    dead.append(failed(item, settings, "alerts", item_error))
        return parts.alerts.unsent(list({a.alert_id: a for a in raised}.values()))
    except REDIS_DOWN as e:  # nothing was emitted yet: wait for Redis, redo the batch
        raise RedisDown(f"{type(e).__name__}: {e}", "alerts") from e


def event(item: Polled, msg: ChatMessage, update: TurnUpdate, result: Labelled, settings: Settings,
          parts: Parts) -> EmotionEvent:
    labeler = parts.routes.labeler(msg.tenant)
    label_set = labeler.label_set
    return EmotionEvent(
        event_id=EmotionEvent.make_id(tenant=msg.tenant, conversation_id=msg.conversation_id,
                                      message_id=msg.message_id, model=parts.model_id, adapter=labeler.adapter_key),
        message_id=msg.message_id,
        conversation_id=msg.conversation_id,
        turn=update.turn if update.turn is not None else msg.turn,
        speaker=msg.speaker,
        role=msg.role,
        reply_to=msg.reply_to,
        tenant=msg.tenant,
        label=result.label,
        probabilities=result.probabilities,
        label_set=label_set.name,
        model=parts.model_id,
        adapter=labeler.adapter,
        adapter_version=labeler.adapter_version,
        window=result.turns_used,
        latency_ms=round((time.monotonic() - item.received) * 1000, 3),
        emitted_at=utcnow(),
        gold_label=label_set.map_gold(msg.gold_label) if msg.gold_label else None,
        window_degraded=update.degraded(update.turn if update.turn is not None else msg.turn,
                                        WindowShape(settings.window.size, settings.window.hop),
                                        reply=msg.reply_to is not None),
    )


def failed(item: Polled, settings: Settings, stage: str, e: BaseException) -> DeadLetter:
    """The dead letter of a message that failed at ``stage`` with ``e`` (``error_type`` ``processing``)."""
    r = item.record
    log.error("message failed in the pipeline; dead-lettered", stage=stage, error=describe(e), topic=r.topic,
              partition=r.partition, offset=r.offset)
    return _dead_letter(item, settings, "processing", describe(e), stage)


def _dead_letter(item: Polled, settings: Settings, error_type: str, reason: str, stage: str | None = None) -> DeadLetter:
    r = item.record
    return DeadLetter.for_record(error_type=error_type, reason=reason, topic=r.topic, partition=r.partition,
                                 offset=r.offset, value=r.value, key=r.key, stage=stage,
                                 max_original_bytes=settings.kafka.dlq_max_original_bytes)
