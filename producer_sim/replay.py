"""Replay conversations onto the input topic as a live chat stream.

``to_messages`` turns loaded conversations into ``ChatMessage`` records, ``interleave`` mixes many
conversations the way a live service sees them (many open at once, each in turn order), and ``replay``
produces them to Kafka at a steady rate.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice

from kafka import KafkaProducer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from core.records import ChatMessage
from core.settings import Settings
from model_store.data import Conversation

# Gap between the sent_at stamps of consecutive turns of one conversation.
TURN_GAP = timedelta(seconds=1)


def to_messages(
    conversations: Iterable[Conversation],
    *,
    run_id: str,
    tenant: str | None = None,
    start: datetime | None = None,
) -> list[list[ChatMessage]]:
    """One list of messages per conversation, in turn order.

    Ids are prefixed with ``run_id`` and the dataset so replays of the same data never collide in Redis:
    ``conversation_id = f"{run_id}:{dataset}:{conversation_id}"`` and ``message_id = f"{conversation_id}:{turn}"``.
    ``sent_at`` is ``start`` (default now, UTC) plus ``turn`` times ``TURN_GAP``.
    """
    if start is None:
        start = datetime.now(UTC)
    elif start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be timezone-aware")
    out: list[list[ChatMessage]] = []
    for conv in conversations:
        conv_id = f"{run_id}:{conv.dataset}:{conv.conversation_id}"
        out.append([
            ChatMessage(
                message_id=f"{conv_id}:{turn}",
                conversation_id=conv_id,
                turn=turn,
                speaker=utt.speaker or "unknown",  # ChatMessage needs a speaker; a few corpora have blanks
                text=utt.text,
                sent_at=start + turn * TURN_GAP,
                tenant=tenant,
                gold_label=utt.label,
            )
            for turn, utt in enumerate(conv.utterances)
        ])
    return out


def interleave(
    per_conversation: Sequence[Sequence[ChatMessage]], *, concurrency: int, seed: int
) -> Iterator[ChatMessage]:
    """Mix conversations like live traffic: at most ``concurrency`` open at once, in the given order.

    When a conversation ends the next one opens; each message is drawn uniformly at random among the open
    conversations, so each conversation's turns stay in order while conversations interleave. The same
    ``seed`` gives the same stream.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency}")
    rng = random.Random(seed)
    pending = (conv for conv in per_conversation if len(conv) > 0)
    # Each open conversation is [messages, index of its next message].
    open_: list[tuple[Sequence[ChatMessage], list[int]]] = [
        (conv, [0]) for conv in islice(pending, concurrency)
    ]
    while open_:
        slot = rng.randrange(len(open_))
        conv, pos = open_[slot]
        yield conv[pos[0]]
        pos[0] += 1
        if pos[0] == len(conv):
            nxt = next(pending, None)
            if nxt is None:
                open_.pop(slot)
            else:
                open_[slot] = (nxt, [0])


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did: ``sent`` records acknowledged in ``seconds``, i.e. ``rate`` records/s."""

    sent: int
    seconds: float
    rate: float
    topic: str


class ReplayError(RuntimeError):
    """The broker rejected or failed to acknowledge at least one record."""


class _Failures:
    """Errors from send futures, which kafka-python reports on its I/O thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.first: BaseException | None = None

    def __call__(self, exc: BaseException) -> None:
        with self._lock:
            self.count += 1
            if self.first is None:
                self.first = exc

    def raise_if_any(self) -> None:
        if self.count:
            raise ReplayError(f"{self.count} record(s) failed to send; first error: {self.first!r}") from self.first


def replay(
    settings: Settings,
    messages: Iterable[ChatMessage],
    *,
    rate: float | None,
    total: int | None = None,
    topic: str | None = None,
    progress: bool = True,
    flush_timeout_s: float = 120.0,
) -> ReplayReport:
    """Produce ``messages`` to ``topic`` (default the input topic), keyed by conversation id.

    ``rate`` is messages per second on a fixed schedule (message i is due at ``start + i / rate``, so
    slow sends do not accumulate drift); None sends as fast as the producer accepts. ``total`` caps the
    number sent (so an endless generator can be replayed) and sizes the progress bar; without it the bar
    uses ``len(messages)`` when known. Raises ``ReplayError`` as soon as any send fails, and after the final
    flush if a late one did; the report counts records acknowledged by the broker.
    """
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 messages/s or None, not {rate}")
    if total is not None and total < 0:
        raise ValueError(f"total must be >= 0, not {total}")
    topic = topic or settings.kafka.input_topic
    if total is not None:
        messages = islice(messages, total)
    bar_total = total if total is not None else (len(messages) if isinstance(messages, Sized) else None)

    failures = _Failures()
    producer = KafkaProducer(
        **settings.kafka.client_options(),
        client_id=f"{settings.kafka.client_id}-replay",
        acks="all",
        linger_ms=5,
    )
    sent = 0
    try:
        with _progress(progress) as bar:
            task = bar.add_task(f"replay -> {topic}", total=bar_total)
            started = time.monotonic()
            for i, msg in enumerate(messages):
                if rate is not None:
                    delay = started + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                producer.send(
                    topic, key=msg.conversation_id.encode("utf-8"), value=msg.to_bytes()
                ).add_errback(failures)
                sent += 1
                bar.advance(task)
                failures.raise_if_any()
            producer.flush(timeout=flush_timeout_s)
            seconds = time.monotonic() - started
        failures.raise_if_any()
    finally:
        # After a failure, don't wait out the retries of records that will not be reported anyway.
        producer.close(timeout=5 if failures.count == 0 else 0)
    return ReplayReport(sent=sent, seconds=seconds, rate=sent / seconds if seconds > 0 else 0.0, topic=topic)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays free for the caller's report
        disable=not enabled,
        transient=False,
    )


class _RateColumn(ProgressColumn):
    """Messages per second, as rich measures it over the last half minute."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} msg/s" if task.speed is not None else "", style="progress.data.speed")
