"""The consumer's counters — its Prometheus metrics, the only ones it keeps — served with liveness and readiness
by :mod:`core.http_endpoint`.

Each :class:`~consumer.app.StreamApp` owns one :class:`ConsumerMetrics` on a registry of its own (several
apps in one process, as in the tests, never mix their counts); :meth:`ConsumerMetrics.stats` reads them back
as a :class:`StreamStats` for summaries (the demo's, ``consume``'s exit line, the benchmarks). ``erc-stream consume`` serves it with
:func:`start_http_server` on ``metrics.host:metrics.port``:

- ``/metrics``: the Prometheus text format;
- ``/healthz`` (liveness): 200 while the main loop completed an iteration within ``metrics.liveness_timeout_s``
  (a wedged loop, e.g. a hung broker call, fails it and the orchestrator restarts the worker);
- ``/readyz`` (readiness): 200 when the member holds partitions, Redis answers a PING and no part is down
  (``erc_part_down``: consumption paused for Redis, the model backend or the output topics).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest


if TYPE_CHECKING:
    from core.records import Alert, DeadLetter, EmotionEvent

log = structlog.get_logger(__name__)

#: Seconds; inference of one micro-batch on CPU takes 0.05-30 s, on a GPU milliseconds.
_INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Seconds from a message's receipt to its event's emission (batch wait + Redis + inference + send).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

DEAD_LETTER_REASONS = ("invalid_json", "invalid_utf8", "schema", "too_large", "empty", "conflict", "duplicate_id",
                       "inference", "processing", "unsupported_version", "undecodable_batch", "tenant_missing",
                       "tenant_mismatch")
#: Parts whose outage pauses consumption (nobody's message's fault): see :mod:`consumer.app`.
PARTS = ("redis", "backend", "output")
ALERT_RULES = ("negative_streak", "shift_to_anger", "tenant_negative_rate")
#: Where a Redis call failed: the window update, the alert rules, a health ping.
REDIS_OPERATIONS = ("window", "alerts", "ping")
#: Latencies kept for summaries (p50/p95 of the recent events); the histogram has them all.
RECENT_LATENCIES = 100_000


@dataclass(frozen=True)
class StreamStats:
    """The counters of one consumer at a moment, read from its metrics (:meth:`ConsumerMetrics.stats`)."""

    consumed: int
    events: int
    dead_letters: int
    batches: int
    dead_by_type: Tally[str]  # reason -> count; 0 for a reason not seen
    latencies_ms: tuple[float, ...]  # the most recent events' (RECENT_LATENCIES at most)
    rewinds: int  # batches given up and redone (Redis down, emit/commit failed, transaction aborted)
    redis_outages: int
    outages: Tally[str]  # part -> times consumption paused for it (redis, backend, output)
    degraded: int  # events whose window lacked turns
    truncated: int  # texts cut to the token budget
    commits_on_revoke: int
    alerts: int


class ConsumerMetrics:
    """Every metric of one consumer, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_consumed = Counter("erc_messages_consumed", "Input records consumed (valid or not).",
                                         registry=r)
        self.events_emitted = Counter("erc_events_emitted", "Emotion events emitted (acknowledged by the broker).",
                                      registry=r)
        self.dead_letters = Counter("erc_dead_letters", "Records dead-lettered, by reason (error type).",
                                    ["reason"], registry=r)
        self.alerts_emitted = Counter("erc_alerts_emitted", "Alerts emitted, by rule.", ["rule"], registry=r)
        self.stream_batch_records = Histogram(
            "erc_stream_batch_records", "Records per stream batch (one poll, one flush, one commit).",
            buckets=_BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("erc_inference_seconds", "Label scoring time of one micro-batch.",
                                           buckets=_INFERENCE_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram(
            "erc_end_to_end_latency_seconds", "From a message's sent_at (the producer's clock) to the broker's ack of "
            "its event: what a user waiting for a label or an alert feels.", buckets=_LATENCY_BUCKETS, registry=r)
        self.processing_seconds = Histogram(
            "erc_processing_latency_seconds", "From the poll that took a message to the broker's ack of its event.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.clock_skew = Counter(
            "erc_clock_skew", "Events whose sent_at was later than their ack (the producer's clock ahead of ours; "
            "their end-to-end latency counts as 0).", registry=r)
        self.consumer_lag = Gauge("erc_consumer_lag", "Records behind the partition's highwater (highwater - position).",
                                  ["topic", "partition"], registry=r)
        self.adapter_info = Gauge("erc_adapter_info",
                                  "The model and adapters labelling the stream, one series per route (value 1).",
                                  ["backend", "model", "adapter", "version", "label_set"], registry=r)
        self.redis_errors = Counter("erc_redis_errors", "Redis operations that failed (each pauses the stream or is "
                                    "retried).", ["operation"], registry=r)
        self.broker_errors = Counter("erc_broker_errors", "Batches whose emit or commit failed (redone).", registry=r)
        self.rewinds = Counter("erc_rewinds", "Batches given up and redone from their first offsets.", registry=r)
        self.outages = Counter("erc_outages", "Times consumption paused until a part that was down answered again, "
                               "by part (redis, backend, output).", ["part"], registry=r)
        self.part_down = Gauge("erc_part_down", "1 while consumption is paused because this part is down (the member "
                               "is then not ready).", ["part"], registry=r)
        self.poll_errors = Counter("erc_poll_errors", "poll() failures other than an undecodable batch or a lost "
                                   "broker connection (the loop backs off and polls again).", registry=r)
        self.undecodable_batches = Counter(
            "erc_undecodable_batches", "Input record batches that could not be decoded (corrupt, unknown codec, over "
            "kafka.max_decompressed_batch_bytes): each is one dead letter and is skipped.", registry=r)
        self.revoked_records = Counter(
            "erc_revoked_records", "Records dropped from a stream batch because their partition was revoked before "
            "the batch was delivered (their next owner reads them again).", registry=r)
        self.alert_rule_failures = Counter(
            "erc_alert_rule_failures", "Events whose alert rules failed (dead-lettered with stage alerts; the event "
            "itself is emitted).", registry=r)
        self.commits_on_revoke = Counter("erc_commits_on_revoke",
                                         "Offset commits of finished batches when partitions were revoked.", registry=r)
        self.texts_truncated = Counter("erc_texts_truncated", "Message texts cut to the token budget.", registry=r)
        self.degraded_windows = Counter("erc_degraded_windows", "Events whose window lacked turns.", registry=r)
        self.assigned_partitions = Gauge("erc_assigned_partitions", "Input partitions held by this member.",
                                         registry=r)
        self.prompt_tokens = Counter("erc_prompt_tokens", "Prompt tokens the backend was asked to score.", registry=r)
        self.computed_tokens = Counter(
            "erc_computed_tokens", "Positions the model really computed (padding in, prefix-cache hits out): "
            "1 - computed/prompt is what prefix caching saves.", registry=r)
        self.loop_heartbeat = Gauge("erc_loop_heartbeat_timestamp_seconds",
                                    "Unix time of the main loop's last completed iteration.", registry=r)
        # Every known label value starts at 0, so a series exists (and rate() works) before its first increment.
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        for rule in ALERT_RULES:
            self.alerts_emitted.labels(rule)
        for operation in REDIS_OPERATIONS:
            self.redis_errors.labels(operation)
        for part in PARTS:
            self.outages.labels(part)
            self.part_down.labels(part).set(0)
        self._lag_labels: set[tuple[str, str]] = set()
        self._adapter_labels: set[tuple[str, str, str, str, str]] = set()
        self._tokens_seen = (0, 0)
        self._recent_latencies_ms: deque[float] = deque(maxlen=RECENT_LATENCIES)
        self.last_beat = time.monotonic()

    # -- updates ---------------------------------------------------------------------------

    def beat(self) -> None:
        """The main loop is alive (called once per iteration, also while paused for Redis)."""
        self.last_beat = time.monotonic()
        self.loop_heartbeat.set(time.time())

    def set_adapters(self, backend: str, model: str, routes: Iterable[tuple[str | None, str | None, str]]) -> None:
        """One series per route's (adapter, version, label set) now serving; series no longer served are removed."""
        current = {(backend, model, adapter or "none", version or "none", label_set)
                   for adapter, version, label_set in routes}
        for gone in self._adapter_labels - current:
            self.adapter_info.remove(*gone)
        for labels in current - self._adapter_labels:
            self.adapter_info.labels(*labels).set(1)
        self._adapter_labels = current

    def count_batch(self, consumed: int, events: "list[EmotionEvent]", alerts: "list[Alert]",
                    dead: "list[DeadLetter]", truncated: int, *, processing_s: Sequence[float] = (),
                    end_to_end_s: Sequence[float] = ()) -> None:
        """One delivered stream batch: its records, the events and alerts acknowledged, its dead letters, and
        each event's latencies to its ack (end to end: negative ones are clock skew, counted and clamped)."""
        for seconds in processing_s:
            self.processing_seconds.observe(seconds)
        for seconds in end_to_end_s:
            if seconds < 0:
                self.clock_skew.inc()
            self.end_to_end_seconds.observe(max(0.0, seconds))
        self.messages_consumed.inc(consumed)
        self.stream_batch_records.observe(consumed)
        self.events_emitted.inc(len(events))
        self.texts_truncated.inc(truncated)
        for event in events:
            self._recent_latencies_ms.append(event.latency_ms)
            if event.window_degraded:
                self.degraded_windows.inc()
        for alert in alerts:
            self.alerts_emitted.labels(alert.rule).inc()
        for d in dead:
            self.dead_letters.labels(d.error_type).inc()
            if d.stage == "alerts":
                self.alert_rule_failures.inc()

    def stats(self) -> StreamStats:
        """The counters now, as plain numbers."""
        dead_by_type = Tally({reason: n for reason in DEAD_LETTER_REASONS
                              if (n := int(self.value("erc_dead_letters_total", {"reason": reason})))})
        return StreamStats(
            consumed=int(self.value("erc_messages_consumed_total")),
            events=int(self.value("erc_events_emitted_total")),
            dead_letters=sum(dead_by_type.values()),
            batches=int(self.value("erc_stream_batch_records_count")),
            dead_by_type=dead_by_type,
            latencies_ms=tuple(self._recent_latencies_ms),
            rewinds=int(self.value("erc_rewinds_total")),
            redis_outages=int(self.value("erc_outages_total", {"part": "redis"})),
            outages=Tally({part: n for part in PARTS if (n := int(self.value("erc_outages_total", {"part": part})))}),
            degraded=int(self.value("erc_degraded_windows_total")),
            truncated=int(self.value("erc_texts_truncated_total")),
            commits_on_revoke=int(self.value("erc_commits_on_revoke_total")),
            alerts=int(sum(self.value("erc_alerts_emitted_total", {"rule": rule}) for rule in ALERT_RULES)),
        )

    def count_tokens(self, prompt_total: int, computed_total: int) -> None:
        """Advance the token counters to a backend's running totals (its ``TokenCounter``)."""
        seen_prompt, seen_computed = self._tokens_seen
        self.prompt_tokens.inc(max(0, prompt_total - seen_prompt))
        self.computed_tokens.inc(max(0, computed_total - seen_computed))
        self._tokens_seen = (prompt_total, computed_total)

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """Per-partition lag of the partitions held now; series of partitions no longer held are removed."""
        current = {(topic, str(partition)) for topic, partition in lags}
        for gone in self._lag_labels - current:
            self.consumer_lag.remove(*gone)
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(topic, str(partition)).set(lag)
        self._lag_labels = current

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent): ``value("erc_events_emitted_total")``."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
