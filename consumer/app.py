"""The stream's main loop: poll a batch → :mod:`~consumer.pipeline` → :mod:`~consumer.checkpoint`, until stopped.

The loop only runs the parts: the pipeline turns a batch into events, alerts and dead letters; the
checkpoint emits them and commits the batch's offsets (at-least-once by default, or one Kafka transaction per
batch: ``delivery.mode``, :mod:`consumer.delivery`); :mod:`~consumer.partitions` follows rebalances, rewinds
and pauses. Processing is synchronous within ``poll``'s thread; a stream batch built from several polls keeps
only the records of partitions the member still owns when it is delivered.

Failures, and what the loop does (README, "Operations"). A failure is either one message's — it goes to the
dead-letter topic and the stream goes on — or a part's that every message needs — Redis, the model backend, the
output topics — and then no message is blamed: the batch is rewound (nothing of it was committed), every
assigned partition is paused, ``poll`` keeps the member in its group, ``/readyz`` answers not ready and
``erc_part_down{part}`` is 1, and the part is probed with backoff until it answers; then consumption resumes
from the rewound batch by itself.

- Redis unreachable (or out of memory, loading, read-only): paused; the probe is a PING.
- Redis restarted empty: windows restart from the next turn; events whose window lacks turns say
  ``window_degraded: true``.
- Inference failed for a micro-batch: retried item by item. When an item fails alone, a known-good probe
  request goes to the backend (:mod:`scoring.fallback`): if it fails too the backend is down (a dead engine, a
  lost CUDA context, a server that stopped answering) and the stream pauses, probing it with backoff; if it
  answers, the failing items are dead-lettered (``inference``) and the rest of the batch goes on.
- Emit or commit failed (broker or topic unwritable, send timed out, transaction aborted): paused with backoff;
  the redo of the batch is the probe, and the part counts as down until a batch is delivered again.
- A record batch that cannot be decoded: one dead letter, skipped (:mod:`consumer.record_batches`); any other
  exception out of ``poll`` is logged and counted, and the loop polls again after a backoff.
- A rebalance while a batch was built or processed: records of partitions no longer held are dropped, not
  labelled, emitted or committed (:mod:`consumer.partitions`).
- Fenced, or a transaction that outlives its watchdog: :class:`FatalDeliveryError`; the worker exits.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import redis
import structlog
from kafka import KafkaConsumer
from kafka.errors import KafkaConnectionError

from consumer import pipeline, record_batches
from consumer.alerts import AlertEngine
from consumer.checkpoint import Checkpoint
from consumer.conversation_store import ConversationStore
from consumer.delivery import DeliveryError, Emitter, FatalDeliveryError, make_emitter
from consumer.metrics import ConsumerMetrics, StreamStats
from consumer.partitions import Partitions, PollFailed
from consumer.pipeline import REDIS_DOWN, Polled, RedisDown
from core import redis_client
from core.http_endpoint import HealthServer, start_http_server
from core.records import Alert, ChatMessage, EmotionEvent
from core.settings import Settings
from model_store.loading import choose_adapter
from model_store.registry import Registry
from scoring.backends.base import Backend
from scoring.fallback import PartDown, probe_backend
from scoring.labeler import Labeler
from scoring.routes import Routes

log = structlog.get_logger(__name__)


class BackendGone(Exception):
    """The model backend stayed down for ``delivery.backend_down_exit_s``: the worker exits so that its restart
    brings a fresh engine (nothing is lost: the paused batch was not committed)."""


class StreamApp:
    """One consumer-group member running the whole pipeline.

    ``emitter`` replaces the one ``delivery.mode`` makes (a test's, to inject a delivery failure)."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        *,
        adapter: str | None = None,
        on_event: Callable[[EmotionEvent, ChatMessage], None] | None = None,
        emitter: Emitter | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = ConsumerMetrics()
        self.on_event = on_event
        #: Called with each alert the batch emitted, after the broker acknowledged it.
        self.on_alert: Callable[[Alert], None] | None = None
        self._stop = threading.Event()
        #: Which labeler (adapter, label set) labels each tenant's messages; adapters are loaded by
        #: ``routes.choose_adapters()`` (``consumer.runner.build_app`` does), not here.
        self.routes = Routes(settings, backend, choose=choose_adapter, adapter=adapter)
        self._registry = Registry(settings.store.dir)
        self._registry_version = self._registry.version()
        self._registry_checked = time.monotonic()
        self.redis = redis_client.connect(settings.redis)  # standalone, or Redis Cluster with redis.cluster
        self.conversations = ConversationStore.configured(self.redis, settings)
        self.alerts = AlertEngine(self.redis, settings.alerts, prefix=settings.redis.key_prefix,
                                  ttl_s=settings.conversation.ttl_s)
        self.parts = pipeline.Parts(conversations=self.conversations, routes=self.routes, alerts=self.alerts,
                                    model_id=backend.model_id, count_tokens=backend.count_tokens,
                                    on_inference=self.metrics.inference_seconds.observe)
        k = settings.kafka
        record_batches.install(k.max_decompressed_batch_bytes)
        # The emitter first: in transactional mode init_transactions fences an older instance of this worker.
        self.emitter: Emitter = emitter or make_emitter(settings)
        self.consumer = KafkaConsumer(
            group_id=k.group_id,
            client_id=k.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Transactional mode reads committed input only (a chained exactly-once pipeline); at-least-once
            # keeps the default, so an input producer's stuck transaction cannot pin it (tansu never expires one).
            isolation_level="read_committed" if settings.delivery.mode == "transactional" else "read_uncommitted",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=settings.batch.stream_records,
            fetch_max_bytes=max(52_428_800, k.max_message_bytes * 2),
            max_partition_fetch_bytes=max(1_048_576, k.max_message_bytes * 2),
            **k.client_options(),
        )
        self.partitions = Partitions(self.consumer, self.emitter, self.metrics)
        if settings.tenancy.source == "topic":  # one topic per tenant: every topic the pattern matches, new ones too
            self.consumer.subscribe(pattern=settings.tenancy.topic_pattern, listener=self.partitions)
        else:
            self.consumer.subscribe([k.input_topic], listener=self.partitions)
        self.checkpoint = Checkpoint(settings, self.emitter, self.consumer, self.alerts, self.metrics)
        self._kafka_delay = 0.0
        self._redis_failures = 0  # consecutive batches that failed on Redis
        self._poll_delay = 0.0
        #: Parts down now (redis, backend, output): the member is not ready while any is.
        self._down: set[str] = set()
        self._http: HealthServer | None = None

    @property
    def labeler(self) -> Labeler:
        """The default route's labeler (the only one without ``model.tenants``)."""
        return self.routes.default.labeler

    @property
    def stats(self) -> StreamStats:
        """This member's counters now (read from its metrics)."""
        return self.metrics.stats()

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and leave the group (safe from any thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def serve_metrics(self) -> HealthServer:
        """Start the /metrics, /healthz, /readyz endpoint on ``metrics.host:metrics.port`` (closed with the app)."""
        m = self.settings.metrics
        self._http = start_http_server(self.metrics, host=m.host, port=m.port,
                                       liveness_timeout_s=m.liveness_timeout_s, ready=self.readiness,
                                       token=m.token.get_secret_value() if m.token else None)
        return self._http

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready = this member holds input partitions, Redis answers and no part is down (called from the HTTP
        thread)."""
        partitions = int(self.metrics.value("erc_assigned_partitions"))
        down = sorted(self._down)
        try:
            redis_ok = bool(self.redis.ping())
        except redis.RedisError as e:
            self.metrics.redis_errors.labels("ping").inc()
            return False, {"partitions": partitions, "redis": f"{type(e).__name__}: {e}", "down": down}
        return partitions > 0 and redis_ok and not down, {"partitions": partitions, "redis": "ok", "down": down}

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self, *, idle_exit_s: float | None = None) -> StreamStats:
        """Process until stopped (or, with ``idle_exit_s``, until no input arrived for that long).

        Raises FatalDeliveryError when this worker must not go on (fenced, commit watchdog), BackendGone when
        its model backend stayed down too long."""
        log.info("consumer running", group=self.settings.kafka.group_id, topic=self.settings.kafka.input_topic,
                 model=self.backend.model_id, adapter=self.labeler.adapter, label_set=self.settings.model.label_set,
                 tenant_routes={t: f"{r.label_set}:{r.adapter or 'registry'}"
                                for t, r in self.settings.model.tenants.items()},
                 delivery=self.emitter.mode)
        last_input = time.monotonic()
        lag_interval_s = self.settings.metrics.lag_interval_s
        fatal = False
        self._publish_adapter()
        try:
            while not self._stop.is_set():
                self.metrics.beat()
                self.partitions.update_lag(lag_interval_s)
                self._follow_registry()
                self.checkpoint.commit_pending()
                try:
                    batch = self.partitions.poll_batch(self.settings.batch, self._stop)
                    self._poll_delay = 0.0
                except KafkaConnectionError as e:
                    # The broker is away (restart, network): kafka-python's coordinator lookup can raise out
                    # of poll. Nothing of a batch was taken yet; wait and poll again, the client reconnects.
                    log.warning("broker unreachable while polling; retrying", error=str(e))
                    self._stop.wait(1.0)
                    continue
                except PollFailed as e:  # nothing taken; never the end of the loop
                    self._poll_delay = min(self.settings.delivery.kafka_backoff_max_s, max(0.2, self._poll_delay * 2))
                    log.error("poll failed; retrying", error=str(e)[:500], retry_in_s=self._poll_delay)
                    self._stop.wait(self._poll_delay)
                    continue
                if batch:
                    self._handle(batch)
                    self.partitions.update_lag(lag_interval_s, force=True)  # the gauge follows each batch
                    last_input = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last_input > idle_exit_s:
                    break
        except FatalDeliveryError as e:
            fatal = True
            log.error("delivery failed fatally; exiting", error=str(e))
            raise
        finally:
            self.close(fatal=fatal)
        return self.stats

    def close(self, *, fatal: bool = False) -> None:
        try:
            self.checkpoint.close(fatal=fatal)
        finally:
            self.consumer.close(autocommit=False)  # leaves the group
            self.redis.close()
            if self._http is not None:
                self._http.close()
            stats = self.stats
            log.info("consumer stopped", consumed=stats.consumed, events=stats.events,
                     dead_letters=stats.dead_letters, rewinds=stats.rewinds)

    def _follow_registry(self) -> None:
        """Between batches: switch each route whose adapter is not pinned in settings to a newly promoted one."""
        if not self.routes.follow_any:
            return
        now = time.monotonic()
        if now - self._registry_checked < self.settings.model.adapter_poll_s:
            return
        self._registry_checked = now
        version = self._registry.version()
        if version == self._registry_version:
            return
        self._registry_version = version
        if self.routes.follow_registry():
            self._publish_adapter()

    def _publish_adapter(self) -> None:
        self.metrics.set_adapters(type(self.backend).__name__, self.backend.model_id,
                                  [(r.labeler.adapter, r.labeler.adapter_version, r.labeler.label_set.name)
                                   for r in self.routes.routes])

    # -- one batch ---------------------------------------------------------------------------

    def _handle(self, batch: list[Polled]) -> None:
        """Process and deliver a batch; on a recoverable failure rewind it (nothing of it is committed) and recover."""
        try:
            outcome = pipeline.process(batch, self.settings, self.parts)
            self.metrics.count_tokens(self.backend.tokens.prompt_tokens, self.backend.tokens.computed)
            if self._lost_partitions(batch):
                return
            self.checkpoint.deliver(batch, outcome)
            self._kafka_delay = 0.0
            self._redis_failures = 0
            self._part_up("output")
        except RedisDown as e:
            self.metrics.redis_errors.labels(e.operation).inc()
            self.partitions.rewind(batch)
            self._wait_for_redis(e.__cause__)
            return
        except PartDown as e:
            self.partitions.rewind(batch)
            self._wait_for_backend(e)
            return
        except DeliveryError as e:
            self.metrics.broker_errors.inc()
            self.partitions.rewind(batch)
            cap = self.settings.delivery.kafka_backoff_max_s
            self._kafka_delay = min(cap, max(0.2, self._kafka_delay * 2))
            log.warning("batch not delivered; consumption paused, redoing it", error=str(e),
                        retry_in_s=self._kafka_delay)
            self._part_down("output")
            # The redo of the batch is the probe: the output counts as down until a batch is delivered.
            self.partitions.wait_for("output", lambda: None, self._stop, self._kafka_delay, cap)
            return
        self._report(len(batch), outcome, acked=time.monotonic(), acked_at=time.time())

    def _lost_partitions(self, batch: list[Polled]) -> bool:
        """Whether a rebalance took partitions of ``batch`` while it was processed: then nothing of it is
        delivered, and the records of the partitions still held are read again (the lost ones by their owner)."""
        gone = self.partitions.revoked_since(self.partitions.batch_mark)
        if not gone:
            return False
        held = self.partitions.without(batch, gone)
        log.info("rebalance while a batch was processed: not delivered", records=len(batch), still_held=len(held))
        self.partitions.rewind(held)
        return True

    def _report(self, consumed: int, outcome: pipeline.Outcome, *, acked: float, acked_at: float) -> None:
        """A delivered batch: count it, log it, hand its events and alerts to the callbacks."""
        self.metrics.count_batch(consumed, [e for e, _ in outcome.events], outcome.alerts, outcome.dead,
                                 outcome.truncated, processing_s=[acked - r for r in outcome.received],
                                 end_to_end_s=[acked_at - m.sent_at.timestamp() for _, m in outcome.events])
        log_texts = self.settings.log_texts
        for event, msg in outcome.events:
            log.debug("event", conversation_id=event.conversation_id, message_id=event.message_id,
                      turn=event.turn, label=event.label, p=round(event.probabilities[event.label], 3),
                      degraded=event.window_degraded, **({"text": msg.text} if log_texts else {}))
            if self.on_event:
                self.on_event(event, msg)
        for alert in outcome.alerts:
            log.info("alert", rule=alert.rule, alert_id=alert.alert_id, conversation_id=alert.conversation_id,
                     tenant=alert.tenant, message_ids=[e.message_id for e in alert.evidence],
                     labels=[e.label for e in alert.evidence])
            if self.on_alert:
                self.on_alert(alert)
        for d in outcome.dead:
            log.warning("dead letter", error_type=d.error_type, reason=d.reason[:200], topic=d.source_topic,
                        partition=d.source_partition, offset=d.source_offset)

    def _part_down(self, part: str) -> None:
        if part not in self._down:
            self._down.add(part)
            self.metrics.outages.labels(part).inc()
            self.metrics.part_down.labels(part).set(1)

    def _part_up(self, part: str) -> None:
        if part in self._down:
            self._down.discard(part)
            self.metrics.part_down.labels(part).set(0)
            log.info(f"{part} is back; consumption resumed")

    def _wait_for_redis(self, error: BaseException | None) -> None:
        self._redis_failures += 1
        cap = self.settings.delivery.redis_backoff_max_s
        delay = min(cap, 0.1 * 2 ** min(self._redis_failures - 1, 16))  # answers PING, fails again: back off more
        log.warning("redis unavailable; consumption paused", error=str(error))
        self._part_down("redis")
        if self.partitions.wait_for("redis", self._ping_redis, self._stop, delay, cap):
            self._part_up("redis")

    def _ping_redis(self) -> None:
        try:
            self.redis.ping()
        except REDIS_DOWN:
            self.metrics.redis_errors.labels("ping").inc()
            raise

    def _wait_for_backend(self, error: PartDown) -> None:
        log.error("model backend down; consumption paused", error=str(error)[:500])
        self._part_down("backend")
        d = self.settings.delivery
        if self.partitions.wait_for("backend", lambda: probe_backend(self.backend), self._stop, 0.5,
                                    d.backend_backoff_max_s, give_up_s=d.backend_down_exit_s):
            self._part_up("backend")
        elif not self._stop.is_set():
            raise BackendGone(f"the model backend has been down for {d.backend_down_exit_s:g} s "
                              f"(delivery.backend_down_exit_s): {error}")
