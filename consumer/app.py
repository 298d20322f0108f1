"""The stream's main loop: poll a batch → :mod:`~consumer.pipeline` → :mod:`~consumer.checkpoint`, until stopped.

The loop only runs the parts: the pipeline turns a batch into events, alerts and dead letters; the
checkpoint emits them and commits the batch's offsets (at-least-once by default, or one Kafka transaction per
batch: ``delivery.mode``, :mod:`consumer.delivery`); :mod:`~consumer.partitions` follows rebalances, rewinds
and pauses. Processing is synchronous within ``poll``'s thread, so a rebalance never finds a half-done batch.

Failures, and what the loop does (README, "Operations"):

- Redis unreachable: the batch is rewound (nothing of it was emitted), every assigned partition is
  paused and ``poll`` keeps the member in its group while Redis is retried with backoff; consumption
  resumes by itself once Redis answers.
- Redis restarted empty: windows restart from the next turn; events whose window lacks turns say
  ``window_degraded: true``.
- Emit or commit failed (broker down, transaction aborted): the batch is rewound and redone after a
  backoff; the consumer reconnects by itself and resumes from the committed offsets.
- Inference failed: the batch is retried item by item; an item that still fails is dead-lettered.
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

from consumer import pipeline, redis_client
from consumer.alerts import AlertEngine
from consumer.checkpoint import Checkpoint
from consumer.conversation_store import ConversationStore
from consumer.delivery import DeliveryError, Emitter, FatalDeliveryError, make_emitter
from consumer.metrics import ConsumerMetrics, HealthServer, StreamStats, start_http_server
from consumer.partitions import Partitions
from consumer.pipeline import Polled, RedisDown
from core.records import Alert, ChatMessage, EmotionEvent
from core.settings import Settings
from model_store.loading import choose_adapter
from model_store.registry import Registry
from scoring.backends.base import Backend
from scoring.labeler import Labeler
from scoring.routes import Routes

log = structlog.get_logger(__name__)


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
        self.conversations = ConversationStore(
            self.redis, prefix=settings.redis.key_prefix, size=settings.window.span,
            retain=settings.conversation.retain_turns, ttl_s=settings.conversation.ttl_s,
        )
        self.alerts = AlertEngine(self.redis, settings.alerts, prefix=settings.redis.key_prefix,
                                  ttl_s=settings.conversation.ttl_s)
        self.parts = pipeline.Parts(conversations=self.conversations, routes=self.routes, alerts=self.alerts,
                                    model_id=backend.model_id, count_tokens=backend.count_tokens,
                                    on_inference=self.metrics.inference_seconds.observe)
        k = settings.kafka
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
        self.consumer.subscribe([k.input_topic], listener=self.partitions)
        self.checkpoint = Checkpoint(settings, self.emitter, self.consumer, self.alerts, self.metrics)
        self._kafka_delay = 0.0
        self._redis_failures = 0  # consecutive batches that failed on Redis
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
        """Ready = this member holds input partitions and Redis answers (called from the HTTP thread)."""
        partitions = int(self.metrics.value("erc_assigned_partitions"))
        try:
            redis_ok = bool(self.redis.ping())
        except redis.RedisError as e:
            self.metrics.redis_errors.labels("ping").inc()
            return False, {"partitions": partitions, "redis": f"{type(e).__name__}: {e}"}
        return partitions > 0 and redis_ok, {"partitions": partitions, "redis": "ok"}

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self, *, idle_exit_s: float | None = None) -> StreamStats:
        """Process until stopped (or, with ``idle_exit_s``, until no input arrived for that long).

        Raises FatalDeliveryError when this worker must not go on (fenced, commit watchdog)."""
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
                except KafkaConnectionError as e:
                    # The broker is away (restart, network): kafka-python's coordinator lookup can raise out
                    # of poll. Nothing of a batch was taken yet; wait and poll again, the client reconnects.
                    log.warning("broker unreachable while polling; retrying", error=str(e))
                    self._stop.wait(1.0)
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
            self.checkpoint.deliver(batch, outcome)
            self._kafka_delay = 0.0
            self._redis_failures = 0
        except RedisDown as e:
            self.metrics.redis_errors.labels(e.operation).inc()
            self.partitions.rewind(batch)
            self._wait_for_redis(e.__cause__)
            return
        except DeliveryError as e:
            self.metrics.broker_errors.inc()
            self.partitions.rewind(batch)
            cap = self.settings.delivery.kafka_backoff_max_s
            self._kafka_delay = min(cap, max(0.2, self._kafka_delay * 2))
            log.warning("batch not delivered; redoing it", error=str(e), retry_in_s=self._kafka_delay)
            self._stop.wait(self._kafka_delay)
            return
        self._report(len(batch), outcome, acked=time.monotonic(), acked_at=time.time())

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

    def _wait_for_redis(self, error: BaseException | None) -> None:
        self._redis_failures += 1
        cap = self.settings.delivery.redis_backoff_max_s
        delay = min(cap, 0.1 * 2 ** min(self._redis_failures - 1, 16))  # answers PING, fails again: back off more
        log.warning("redis unavailable; consumption paused", error=str(error))
        self.partitions.wait_for_redis(self.redis, self._stop, delay, cap)
        if not self._stop.is_set():
            log.info("redis is back; consumption resumed")
