"""The stream: consume → validate → window in Redis → prompt → micro-batched inference → alert rules → emit → commit.

Delivery is chosen by ``delivery.mode`` (see :mod:`consumer.delivery`): at-least-once by default (a
batch's offsets are committed only after every event and dead letter of it was acknowledged by the
broker; a replay yields the same ``event_id``s, so readers drop the copies), or one Kafka transaction
per batch. Processing is synchronous within ``poll``'s thread, so a rebalance never finds a half-done
batch; offsets that are finished but not yet committed (``delivery.commit_interval_ms``) are committed
when partitions are revoked.

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

Alerts (:mod:`consumer.alerts`) are evaluated after labelling, before anything is emitted, and travel
with the batch's events; their ids are recorded in Redis once acknowledged. Metrics
(:mod:`consumer.metrics`) are updated as the batch completes; ``serve_metrics`` starts the endpoint.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import redis
import structlog
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaConnectionError
from kafka.structs import OffsetAndMetadata

from consumer import redis_client
from consumer.alerts import AlertEngine
from consumer.delivery import DeliveryError, Emitter, FatalDeliveryError, make_emitter
from consumer.labeler import Failed, Labeler
from consumer.metrics import ConsumerMetrics, HealthServer, start_http_server
from consumer.routes import Routes
from consumer.sanitize import clean_text
from consumer.validation import decode
from consumer.window_store import WindowStore, WindowTurn
from erc_stream.schemas import Alert, ChatMessage, DeadLetter, EmotionEvent, utcnow
from erc_stream.settings import Settings
from model_store.backends.base import Backend
from model_store.registry import Registry

log = structlog.get_logger(__name__)

#: Any Redis failure pauses the stream until Redis answers again (unreachable, loading, out of memory…).
REDIS_DOWN = (redis.RedisError,)


@dataclass
class StreamStats:
    """Counters of one consumer process (the demo's summary and, later, the metrics endpoint read them)."""

    consumed: int = 0
    events: int = 0
    dead_letters: int = 0
    batches: int = 0
    dead_by_type: Counter = field(default_factory=Counter)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=100_000))
    started: float = field(default_factory=time.monotonic)
    rewinds: int = 0  # batches given up and redone (Redis down, emit/commit failed, transaction aborted)
    redis_outages: int = 0
    degraded: int = 0  # events whose window lacked turns
    truncated: int = 0  # texts cut to the token budget
    commits_on_revoke: int = 0
    alerts: int = 0


@dataclass(frozen=True)
class _Polled:
    record: object  # kafka ConsumerRecord
    received: float  # time.monotonic() at poll return


class _RedisDown(Exception):
    def __init__(self, message: str, operation: str) -> None:
        super().__init__(message)
        self.operation = operation


class _Rebalance(AsyncConsumerRebalanceListener):
    """Runs on the consumer's IO thread: commits finished-but-uncommitted offsets of revoked partitions."""

    def __init__(self, app: "StreamApp") -> None:
        self.app = app

    async def on_partitions_revoked(self, revoked):
        app = self.app
        pending = {tp: meta for tp, meta in app.emitter.pending().items() if tp in revoked}
        if pending:
            try:
                await app.consumer.commit_async(offsets=pending)
                app.stats.commits_on_revoke += 1
                log.info("committed on revoke", offsets={f"{tp.topic}/{tp.partition}": m.offset
                                                        for tp, m in pending.items()})
            except Exception as e:  # noqa: BLE001 - their new owner redelivers from the last commit
                log.warning("commit on revoke failed; those records will be redelivered", error=repr(e))
            app.emitter.drop_pending(pending)
        app._held.difference_update(revoked)
        app.metrics.assigned_partitions.set(len(app._held))
        log.info("partitions revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))

    async def on_partitions_assigned(self, assigned):
        if self.app._paused_for_redis and assigned:
            self.app.consumer.pause(*assigned)
        self.app._held.update(assigned)
        self.app.metrics.assigned_partitions.set(len(self.app._held))
        self.app._lag_at = 0.0  # recompute the lag of the new assignment at the next iteration
        log.info("partitions assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))

    async def on_partitions_lost(self, lost):
        self.app.emitter.drop_pending(lost)  # evicted: a commit would be refused
        self.app._held.difference_update(lost)
        self.app.metrics.assigned_partitions.set(len(self.app._held))
        log.warning("partitions lost", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in lost))


class StreamApp:
    """One consumer-group member running the whole pipeline."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        *,
        adapter: str | None = None,
        on_event: Callable[[EmotionEvent, ChatMessage], None] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.stats = StreamStats()
        self.metrics = ConsumerMetrics()
        self.on_event = on_event
        #: Called with each alert the batch emitted, after the broker acknowledged it.
        self.on_alert: Callable[[Alert], None] | None = None
        #: Fault injection for tests: called with a stage name ("after_send") inside each batch.
        self.fault: Callable[[str], None] | None = None
        self._stop = threading.Event()
        self._paused_for_redis = False
        #: Which labeler (adapter, label set) labels each tenant's messages; adapters are loaded by
        #: ``routes.choose_adapters()`` (``consumer.runner.build_app`` does), not here.
        self.routes = Routes(settings, backend, adapter=adapter)
        self._registry = Registry(settings.store.dir)
        self._registry_version = self._registry.version()
        self._registry_checked = time.monotonic()
        self.redis = redis_client.connect(settings.redis)  # standalone, or Redis Cluster with redis.cluster
        self.windows = WindowStore(
            self.redis,
            prefix=settings.redis.key_prefix,
            size=settings.window.size,
            retain=settings.window.retain,
            ttl_s=settings.window.ttl_s,
        )
        self.alerts = AlertEngine(self.redis, settings.alerts, prefix=settings.redis.key_prefix,
                                  ttl_s=settings.window.ttl_s)
        k = settings.kafka
        # The emitter first: in transactional mode init_transactions fences an older instance of this worker.
        self.emitter: Emitter = make_emitter(settings)
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
            max_poll_records=settings.batch.stream_size,
            fetch_max_bytes=max(52_428_800, k.max_message_bytes * 2),
            max_partition_fetch_bytes=max(1_048_576, k.max_message_bytes * 2),
            **k.client_options(),
        )
        self.consumer.subscribe([k.input_topic], listener=_Rebalance(self))
        self._kafka_delay = 0.0
        self._redis_failures = 0  # consecutive batches that failed on Redis
        self._lag_at = 0.0
        self._http: HealthServer | None = None
        self._held: set[TopicPartition] = set()  # kept by the rebalance listener, read by readiness

    @property
    def labeler(self) -> Labeler:
        """The default route's labeler (the only one without ``model.tenants``)."""
        return self.routes.default.labeler

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
                                       liveness_timeout_s=m.liveness_timeout_s, ready=self.readiness)
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
        fatal = False
        self._publish_adapter()
        try:
            while not self._stop.is_set():
                self.metrics.beat()
                self._update_lag()
                self._follow_registry()
                self.emitter.commit_pending(self.consumer)
                try:
                    batch = self._poll_batch()
                except KafkaConnectionError as e:
                    # The broker is away (restart, network): kafka-python's coordinator lookup can raise out
                    # of poll. Nothing of a batch was taken yet; wait and poll again, the client reconnects.
                    log.warning("broker unreachable while polling; retrying", error=str(e))
                    self._stop.wait(1.0)
                    continue
                if batch:
                    self._handle(batch)
                    self._update_lag(force=True)  # positions moved: the gauge follows each batch
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
            if not fatal:
                self.emitter.commit_pending(self.consumer, force=True)
            self.emitter.close(timeout_s=1 if fatal else 10)
        finally:
            self.consumer.close(autocommit=False)  # leaves the group
            self.redis.close()
            if self._http is not None:
                self._http.close()
            log.info("consumer stopped", consumed=self.stats.consumed, events=self.stats.events,
                     dead_letters=self.stats.dead_letters, rewinds=self.stats.rewinds)

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
                                  [(r.labeler.adapter, r.labeler.label_set.name) for r in self.routes.routes])

    def _update_lag(self, force: bool = False) -> None:
        """Per-partition lag, highwater (from fetch responses) minus position, every ``metrics.lag_interval_s``."""
        now = time.monotonic()
        if not force and now - self._lag_at < self.settings.metrics.lag_interval_s:
            return
        self._lag_at = now
        lags: dict[tuple[str, int], int] = {}
        for tp in self.consumer.assignment():
            try:
                high = self.consumer.highwater(tp)
                position = self.consumer.position(tp, timeout_ms=200)
            except Exception:  # noqa: BLE001 - revoked meanwhile, or no position yet: next time
                continue
            if high is not None and position is not None:
                lags[(tp.topic, tp.partition)] = max(0, high - position)
            else:
                lags[(tp.topic, tp.partition)] = 0
        self.metrics.set_lag(lags)

    # -- the pipeline ----------------------------------------------------------------------

    def _poll_batch(self) -> list[_Polled]:
        """Up to ``batch.stream_size`` records, waiting at most ``batch.max_wait_ms`` after the first one."""
        max_size = self.settings.batch.stream_size
        max_wait = self.settings.batch.max_wait_ms / 1000
        batch: list[_Polled] = []
        deadline: float | None = None
        while len(batch) < max_size and not self._stop.is_set():
            timeout_s = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_size - len(batch))
            except KafkaConnectionError:
                if batch:  # records already taken must be processed, or the next commit would skip them
                    return batch
                raise
            now = time.monotonic()
            for records in polled.values():
                batch.extend(_Polled(r, now) for r in records)
            if not batch:
                return batch
            if deadline is None:
                deadline = now + max_wait
            if now >= deadline:
                break
        return batch

    def _handle(self, batch: list[_Polled]) -> None:
        """Process a batch; on a recoverable failure rewind it (nothing of it is committed) and recover."""
        try:
            self._process(batch)
            self._kafka_delay = 0.0
            self._redis_failures = 0
        except _RedisDown as e:
            self.metrics.redis_errors.labels(e.operation).inc()
            self._rewind(batch)
            self._wait_for_redis(e.__cause__)
        except DeliveryError as e:
            self.metrics.broker_errors.inc()
            self._rewind(batch)
            cap = self.settings.delivery.kafka_backoff_max_s
            self._kafka_delay = min(cap, max(0.2, self._kafka_delay * 2))
            log.warning("batch not delivered; redoing it", error=str(e), retry_in_s=self._kafka_delay)
            self._stop.wait(self._kafka_delay)

    def _process(self, batch: list[_Polled]) -> None:
        k = self.settings.kafka
        w = self.settings.window
        valid: list[tuple[_Polled, ChatMessage]] = []
        dead: list[DeadLetter] = []
        for item in batch:
            r = item.record
            decoded = decode(r.value, key=r.key, topic=r.topic, partition=r.partition, offset=r.offset,
                             max_bytes=k.max_message_bytes, max_original_bytes=k.dlq_max_original_bytes)
            if isinstance(decoded, DeadLetter):
                dead.append(decoded)
            else:
                valid.append((item, decoded))

        turns = []
        truncated = 0
        for _, m in valid:
            text, cut = clean_text(m.text, max_chars=w.max_turn_chars, max_tokens=w.max_turn_tokens,
                                   count_tokens=self.backend.count_tokens)
            truncated += cut
            turns.append((m.conversation_id, WindowTurn(m.turn, m.speaker, text, m.message_id)))
        try:
            updates = self.windows.append_many(turns)
        except REDIS_DOWN as e:  # wait for it, lose nothing
            raise _RedisDown(f"{type(e).__name__}: {e}", "window") from e
        valid, updates = self._drop_conflicts(valid, updates, dead)
        windows = [[t.as_prompt_turn() for t in u.window] for u in updates]
        tenants = [m.tenant for _, m in valid]
        results = []
        step = self.settings.batch.max_size
        for start in range(0, len(windows), step):  # one backend call per micro-batch of the stream batch
            inference_started = time.monotonic()
            results += self.routes.label(windows[start:start + step], tenants[start:start + step])
            self.metrics.inference_seconds.observe(time.monotonic() - inference_started)
        self.metrics.count_tokens(self.backend.tokens.prompt_tokens, self.backend.tokens.computed)

        labelled: list[tuple[EmotionEvent, ChatMessage]] = []
        for (item, msg), update, result in zip(valid, updates, results):
            r = item.record
            if isinstance(result, Failed):
                dead.append(DeadLetter.for_record(
                    error_type="inference", reason=result.error, topic=r.topic, partition=r.partition,
                    offset=r.offset, value=r.value, key=r.key, max_original_bytes=k.dlq_max_original_bytes,
                ))
                continue
            try:
                labelled.append((self._event(item, msg, update, result), msg))
            except ValueError as e:  # a backend answer that breaks the event's invariants: that item only
                dead.append(DeadLetter.for_record(
                    error_type="inference", reason=f"invalid result: {e}", topic=r.topic, partition=r.partition,
                    offset=r.offset, value=r.value, key=r.key, max_original_bytes=k.dlq_max_original_bytes,
                ))
        try:
            alerts = self.alerts.unsent(self.alerts.evaluate(labelled))
        except REDIS_DOWN as e:  # nothing was emitted yet: wait for Redis, redo the batch
            raise _RedisDown(f"{type(e).__name__}: {e}", "alerts") from e

        delivered: list[tuple[EmotionEvent, ChatMessage]] = []
        self.emitter.begin()
        try:
            for event, msg in labelled:
                self.emitter.send(k.output_topic, msg.conversation_id.encode(), event.to_bytes())
                delivered.append((event, msg))
            for alert in alerts:
                key = alert.conversation_id if alert.conversation_id is not None else (alert.tenant or "")
                self.emitter.send(k.alerts_topic, key.encode(), alert.to_bytes())
            for d in dead:
                self.emitter.send(k.dlq_topic, None, d.to_bytes())
            if self.fault:
                self.fault("after_send")
            self.emitter.finish(self._offsets(batch), self.consumer)
        except DeliveryError:
            self.emitter.abort()
            raise
        except FatalDeliveryError:
            raise
        except BaseException:
            self.emitter.abort()
            raise

        try:
            self.alerts.mark_sent(alerts)
        except REDIS_DOWN as e:  # delivered already; at worst a redelivery sends them again, same ids
            self.metrics.redis_errors.labels("alerts").inc()
            log.warning("could not record sent alerts", error=str(e), alerts=[a.alert_id for a in alerts])

        self.stats.consumed += len(batch)
        self.stats.batches += 1
        self.stats.events += len(delivered)
        self.stats.dead_letters += len(dead)
        self.stats.truncated += truncated
        self.stats.alerts += len(alerts)
        m = self.metrics
        m.messages_consumed.inc(len(batch))
        m.batch_size.observe(len(batch))
        m.events_emitted.inc(len(delivered))
        log_texts = self.settings.log_texts
        for event, msg in delivered:
            self.stats.latencies_ms.append(event.latency_ms)
            self.stats.degraded += event.window_degraded
            m.end_to_end_seconds.observe(event.latency_ms / 1000)
            if event.window_degraded:
                m.degraded_windows.inc()
            log.debug("event", conversation_id=event.conversation_id, message_id=event.message_id,
                      turn=event.turn, label=event.label, p=round(event.probabilities[event.label], 3),
                      degraded=event.window_degraded, **({"text": msg.text} if log_texts else {}))
            if self.on_event:
                self.on_event(event, msg)
        for alert in alerts:
            m.alerts_emitted.labels(alert.rule).inc()
            log.info("alert", rule=alert.rule, alert_id=alert.alert_id, conversation_id=alert.conversation_id,
                     tenant=alert.tenant, message_ids=[e.message_id for e in alert.evidence],
                     labels=[e.label for e in alert.evidence])
            if self.on_alert:
                self.on_alert(alert)
        for d in dead:
            self.stats.dead_by_type[d.error_type] += 1
            m.dead_letters.labels(d.error_type).inc()
            log.warning("dead letter", error_type=d.error_type, reason=d.reason[:200], topic=d.source_topic,
                        partition=d.source_partition, offset=d.source_offset)


    def _event(self, item: _Polled, msg: ChatMessage, update, result) -> EmotionEvent:
        w = self.settings.window
        labeler = self.routes.labeler(msg.tenant)
        label_set = labeler.label_set
        return EmotionEvent(
            event_id=EmotionEvent.make_id(msg.message_id, self.backend.model_id, labeler.adapter),
            message_id=msg.message_id,
            conversation_id=msg.conversation_id,
            turn=msg.turn,
            speaker=msg.speaker,
            tenant=msg.tenant,
            label=result.label,
            probabilities=result.probabilities,
            label_set=label_set.name,
            model=self.backend.model_id,
            adapter=labeler.adapter,
            window=result.turns_used,
            latency_ms=round((time.monotonic() - item.received) * 1000, 3),
            emitted_at=utcnow(),
            gold_label=label_set.map_gold(msg.gold_label) if msg.gold_label else None,
            window_degraded=update.degraded(msg.turn, w.size),
        )

    def _drop_conflicts(self, valid, updates, dead: list[DeadLetter]):
        """Dead-letter what must not be labelled: a message id already stored at another turn of the
        conversation (``duplicate_id``), or a different message claiming a stored turn (``conflict``).

        A redelivery of the same message (same id, same turn) is fine: it gets its event again, same id.
        """
        keep = []
        max_original = self.settings.kafka.dlq_max_original_bytes
        for (item, msg), u in zip(valid, updates):
            r = item.record
            if u.duplicate_of_turn is not None:
                dead.append(DeadLetter.for_record(
                    error_type="duplicate_id",
                    reason=f"message id {msg.message_id!r} is already turn {u.duplicate_of_turn} of conversation "
                           f"{msg.conversation_id!r}, not turn {msg.turn}",
                    topic=r.topic, partition=r.partition, offset=r.offset, value=r.value, key=r.key,
                    max_original_bytes=max_original,
                ))
                continue
            stored = u.window[-1].message_id
            if not u.added and stored != msg.message_id:
                dead.append(DeadLetter.for_record(
                    error_type="conflict",
                    reason=f"turn {msg.turn} of conversation {msg.conversation_id!r} already holds message {stored!r}",
                    topic=r.topic, partition=r.partition, offset=r.offset, value=r.value, key=r.key,
                    max_original_bytes=max_original,
                ))
            else:
                keep.append(((item, msg), u))
        return [p for p, _ in keep], [u for _, u in keep]

    @staticmethod
    def _offsets(batch: list[_Polled]) -> dict[TopicPartition, OffsetAndMetadata]:
        offsets: dict[TopicPartition, int] = {}
        for item in batch:
            r = item.record
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        return {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}

    def _rewind(self, batch: list[_Polled]) -> None:
        """Seek every partition of the batch back to its first record: the next poll returns it again."""
        first: dict[TopicPartition, int] = {}
        for item in batch:
            r = item.record
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
        self.stats.rewinds += 1
        self.metrics.rewinds.inc()

    def _wait_for_redis(self, error: BaseException | None) -> None:
        """Pause every partition, keep polling (the member stays in its group), retry Redis with backoff."""
        self.stats.redis_outages += 1
        self._redis_failures += 1
        self._paused_for_redis = True
        cap = self.settings.delivery.redis_backoff_max_s
        delay = min(cap, 0.1 * 2 ** min(self._redis_failures - 1, 16))  # answers PING, fails again: back off more
        log.warning("redis unavailable; consumption paused", error=str(error))
        try:
            while not self._stop.is_set():
                self.metrics.beat()  # paused on purpose, not wedged
                assigned = self.consumer.assignment()
                if assigned:
                    self.consumer.pause(*assigned)
                began = time.monotonic()
                polled = self.consumer.poll(timeout_ms=int(delay * 1000))
                for tp, records in polled.items():  # none expected (paused); never skip any
                    self.consumer.seek(tp, min(r.offset for r in records))
                rest = delay - (time.monotonic() - began)
                if rest > 0:
                    self._stop.wait(rest)
                try:
                    self.redis.ping()
                    break
                except REDIS_DOWN as e:
                    self.metrics.redis_errors.labels("ping").inc()
                    delay = min(cap, delay * 2)
                    log.warning("redis still unavailable", error=str(e), retry_in_s=delay)
        finally:
            self._paused_for_redis = False
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.resume(*assigned)
        if not self._stop.is_set():
            log.info("redis is back; consumption resumed")
