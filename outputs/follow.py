"""A consumer group that follows erc-stream's topics and hands each record on, decoded and deduplicated.

The people-facing parts (the dashboard, the notifier) read the emotion and alert topics the way every reader of
the project must (``core.readers``): ``read_committed`` in transactional mode, and keeping the first copy of each
``event_id`` / ``alert_id`` (at-least-once delivery re-emits a batch with the same ids). A group that has no
committed offset yet starts ``lookback_s`` back in time (``offsets_for_times``: a live view wants the last hour,
not the topic's whole retention; ``None`` starts at the beginning). A record that does not decode is logged and
skipped: a reader of outputs never stops on one record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer

from core.readers import Deduper, isolation_level
from core.records import Alert, ChatMessage, EmotionEvent
from core.settings import Settings

log = structlog.get_logger(__name__)

Record = EmotionEvent | Alert | ChatMessage


class _Assigned(ConsumerRebalanceListener):
    """Notes newly assigned partitions; where they start is decided after the poll (a listener runs on the client's
    IO thread, where kafka-python forbids the blocking calls that decision needs)."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower

    def on_partitions_revoked(self, revoked) -> None:
        pass

    def on_partitions_assigned(self, assigned) -> None:
        self.follower.assigned = len(assigned)
        self.follower._fresh |= set(assigned)


class Follower:
    """Follows ``topics`` in consumer group ``group_id``; ``handle(record)`` gets each first copy, in order per
    partition. Offsets are committed by the client every few seconds (a view: a restart may show a record twice)
    unless ``commit=False``, where the caller commits (``consumer.commit()``) once it has acted on what it got."""

    def __init__(self, settings: Settings, *, group_id: str, topics: Sequence[str], handle: Callable[[Record], None],
                 lookback_s: float | None = 3600.0, auto_commit: bool = True, client: str = "follower") -> None:
        self.settings = settings
        self.topics = list(topics)
        self.handle = handle
        self.lookback_s = lookback_s
        self.assigned: int | None = None
        self.skipped = 0
        self.last_lag: int | None = None  # after each poll, from the polling thread (the client is not thread-safe)
        self.current = None  # the ConsumerRecord being handed on (its partition and offset)
        self._seen = {"event": Deduper(200_000), "alert": Deduper(200_000), "message": Deduper(200_000)}
        k = settings.kafka
        self.consumer = KafkaConsumer(
            **k.client_options(), client_id=f"{k.client_id}-{client}", group_id=group_id,
            enable_auto_commit=auto_commit, auto_offset_reset="earliest", isolation_level=isolation_level(settings),
            session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
        )
        self._fresh: set = set()  # assigned in the last poll, start not decided yet
        self.consumer.subscribe(self.topics, listener=_Assigned(self))

    def poll(self, timeout_ms: int = 200) -> int:
        """One poll: every new record handed on; how many were."""
        handed = 0
        batches = self.consumer.poll(timeout_ms=timeout_ms)
        if self._fresh:
            moved = self._start_back(self._fresh)
            self._fresh = set()
            batches = {tp: rs for tp, rs in batches.items() if tp not in moved}  # read again from the new start
        for tp, records in batches.items():
            for r in records:
                record = self._decode(tp.topic, r.value)
                self.current = r
                if record is not None:
                    self.handle(record)
                    handed += 1
        self.last_lag = self.lag()
        return handed

    def _start_back(self, assigned: set) -> set:
        """Partitions of ``assigned`` without a committed offset start ``lookback_s`` back; the ones moved."""
        if self.lookback_s is None:
            return set()
        fresh = [tp for tp in assigned if self.consumer.committed(tp) is None]
        if not fresh:
            return set()
        since = int((time.time() - self.lookback_s) * 1000)
        found = self.consumer.offsets_for_times({tp: since for tp in fresh})
        for tp in fresh:
            at = found.get(tp)
            if at is not None and at.timestamp >= 0:
                self.consumer.seek(tp, at.offset)
            else:  # nothing that recent (tansu answers offset 0 with timestamp -1): from the end (on tansu: the
                self.consumer.seek_to_end(tp)  # start of its last batch, a few records early)
        return set(fresh)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - a view keeps following; the client reconnects itself
                log.warning("follower poll failed; retrying", error=f"{type(e).__name__}: {e}")
                stop.wait(1.0)

    def lag(self) -> int | None:
        """Records behind the newest ones, over the assigned partitions (from fetch highwaters; None before any)."""
        total = 0
        known = False
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            known = True
            total += max(0, high - self.consumer.position(tp))
        return total if known else None

    def close(self) -> None:
        self.consumer.close()

    def _decode(self, topic: str, raw: bytes | None) -> Record | None:
        k = self.settings.kafka
        try:
            if topic == k.output_topic:
                event = EmotionEvent.from_bytes(raw or b"")
                return event if self._seen["event"].first(event.event_id) else None
            if topic == k.alerts_topic:
                alert = Alert.from_bytes(raw or b"")
                return alert if self._seen["alert"].first(alert.alert_id) else None
            message = ChatMessage.from_bytes(raw or b"")
            key = f"{message.tenant}\x1f{message.conversation_id}\x1f{message.message_id}"
            return message if self._seen["message"].first(key) else None
        except Exception as e:  # noqa: BLE001 - one bad record is skipped, not fatal
            self.skipped += 1
            log.warning("record skipped: it does not decode", topic=topic, error=f"{type(e).__name__}: {e}")
            return None
