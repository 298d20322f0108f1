"""How a batch's outputs (events, dead letters) and its consumed offsets reach Kafka: two emitters, one interface.

``AtLeastOnce`` (the default, for any Kafka-protocol broker): produce, flush, check every ack, then
commit the offsets. A crash between the acks and the commit replays the batch; its events carry
the same deterministic ``event_id``, and readers of ``chat.emotions`` drop the copies. Its producer is
idempotent (``kafka.producer_idempotence``): a retried request is written once, and with at most 5 requests in
flight per connection the broker keeps each partition's order, so one conversation's events (one key, one
partition) stay in turn order through retries; without idempotence one request is kept in flight instead.
Every send error — a ``KafkaTimeoutError`` while the broker or the topic's leader is away included — becomes a
:class:`DeliveryError`: the batch is redone, and the loop pauses consumption while the output stays down.

``Transactional`` (for Apache Kafka ≥ 2.5): one Kafka transaction per batch holds the batch's
outputs and its offsets (``send_offsets_to_transaction`` with the consumer's group metadata, so a
zombie member of an old generation is fenced, KIP-447). The transactional id is stable per worker,
``<prefix>-<worker_id>``: a restarted worker fences its predecessor. An abortable error aborts the
transaction and the caller seeks back and redoes the batch; fencing and other fatal errors raise
:class:`FatalDeliveryError` (the worker must exit: its replacement takes over). kafka-python waits
for ``commit_transaction``/``abort_transaction``/``send_offsets_to_transaction`` without a timeout,
so each runs under a watchdog; one that overruns ``delivery.commit_watchdog_s`` is fatal too.
Readers must use ``isolation_level="read_committed"``.

What only Apache Kafka guarantees: read_committed readers skip aborted records (the broker sends
the aborted-transaction index with each fetch) and offset commits from stale group members are
refused. The local tansu broker does neither, so there the transactional mode's mechanics (commit,
abort, fencing) can be tested but not its exactly-once output (see README, "Operations").
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Protocol, TypeVar

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as Errors
from kafka.partitioner.default import DefaultPartitioner, murmur2
from kafka.structs import OffsetAndMetadata

from core.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")
Offsets = dict[TopicPartition, OffsetAndMetadata]

#: Producer errors after which a transactional producer cannot go on (the worker must exit).
FATAL_ERRORS: tuple[type[Exception], ...] = (
    Errors.ProducerFencedError,
    Errors.InvalidProducerEpochError,
    Errors.InvalidTxnStateError,
    Errors.TransactionalIdAuthorizationFailedError,
    Errors.ClusterAuthorizationFailedError,
    Errors.UnsupportedVersionError,
    Errors.FencedInstanceIdError,
)


class DeliveryError(Exception):
    """The batch's outputs or offsets did not make it: nothing of it was committed; seek back and redo it."""


class FatalDeliveryError(Exception):
    """The worker cannot deliver any more (fenced, watchdog expired, …): stop, exit, let a restart take over."""


class Emitter(Protocol):
    """One batch at a time: ``begin``, ``send`` its outputs, ``finish`` with its offsets (or ``abort``)."""

    mode: str

    def begin(self) -> None: ...

    def send(self, topic: str, key: bytes | None, value: bytes) -> None: ...

    def finish(self, offsets: Offsets, consumer: KafkaConsumer) -> None:
        """Make the batch's outputs durable and its offsets committed (or pending, see ``commit_pending``).

        Raises DeliveryError (redo the batch) or FatalDeliveryError (exit)."""
        ...

    def abort(self) -> None:
        """Give up the current batch (after a failure anywhere in it)."""
        ...

    def commit_pending(self, consumer: KafkaConsumer, *, force: bool = False) -> None:
        """Commit offsets of finished batches that are not committed yet (at-least-once with an interval)."""
        ...

    def pending(self) -> Offsets: ...

    def drop_pending(self, partitions) -> None: ...

    def close(self, timeout_s: float) -> None: ...


class CachingPartitioner(DefaultPartitioner):
    """kafka-python's default partitioner (murmur2 of the key, as the Java client: a conversation's records go
    where any other Kafka producer would put them), remembering each key's hash: kafka-python computes
    murmur2 in pure Python, ~20 µs a record, and a conversation's key repeats with each of its events."""

    MAX_KEYS = 100_000

    def __init__(self) -> None:
        self._hashes: dict[bytes, int] = {}

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        if serialized_key is None or topic not in cluster.topics():
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        h = self._hashes.get(serialized_key)
        if h is None:
            if len(self._hashes) >= self.MAX_KEYS:
                self._hashes.clear()
            h = self._hashes[serialized_key] = murmur2(serialized_key) & 0x7FFFFFFF
        all_partitions = sorted(cluster.partitions_for_topic(topic))
        return all_partitions[h % len(all_partitions)]


def producer_options(settings: Settings) -> dict[str, object]:
    """Options every emitter's producer shares: acks from all replicas, room for the largest dead letter,
    batching as ``kafka.producer_*`` says."""
    k = settings.kafka
    dlq_bytes = k.dlq_max_original_bytes * 4 // 3 + 8192  # base64 + the dead letter's fields
    max_request = max(1_048_576, k.max_message_bytes * 2 + 4096, dlq_bytes)
    return {
        "acks": "all",
        "linger_ms": k.producer_linger_ms,
        "batch_size": min(k.producer_batch_bytes, max_request),
        "compression_type": None if k.producer_compression == "none" else k.producer_compression,
        "max_request_size": max_request,
        "partitioner": CachingPartitioner(),
        **k.client_options(),
    }


def worker_id(settings: Settings) -> str:
    return settings.delivery.worker_id or socket.gethostname()


def transactional_id(settings: Settings) -> str:
    return f"{settings.delivery.transactional_id_prefix}-{worker_id(settings)}"


def with_watchdog(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run a blocking call that has no timeout of its own; past ``timeout_s`` raise FatalDeliveryError.

    The call goes on in a daemon thread (it cannot be interrupted); the caller must stop using the
    client it was made on and exit.
    """
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    thread = threading.Thread(target=target, name=f"watchdog:{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise FatalDeliveryError(f"{what} did not finish within {timeout_s:g} s (watchdog)")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")  # type: ignore[return-value]


def close_producer(producer: KafkaProducer, timeout_s: float) -> None:
    """Close, and if the broker does not take the last records in time, drop them (they were never
    committed: the batch is redone by whoever owns the partition next)."""
    try:
        producer.close(timeout=timeout_s)
    except Errors.KafkaError as e:
        log.warning("producer did not flush on close; unsent records dropped", error=f"{type(e).__name__}: {e}")
        sender = getattr(producer, "_sender", None)  # kafka-python's close() raises before its force-close
        if sender is not None and sender.is_alive():
            sender.force_close()


def _merge(into: Offsets, offsets: Offsets) -> None:
    for tp, meta in offsets.items():
        if tp not in into or into[tp].offset < meta.offset:
            into[tp] = meta


class AtLeastOnce:
    """Produce, flush, check acks, then commit offsets (every batch, or every ``commit_interval_ms``)."""

    mode = "at_least_once"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = self._new_producer()
        self._futures: list = []
        self._pending: Offsets = {}
        self._last_commit = time.monotonic()
        self._lock = threading.Lock()  # pending offsets are also read by the rebalance listener (IO thread)

    def _new_producer(self) -> KafkaProducer:
        k = self.settings.kafka
        ordered = ({"enable_idempotence": True, "max_in_flight_requests_per_connection": 5}
                   if k.producer_idempotence else
                   {"enable_idempotence": False, "max_in_flight_requests_per_connection": 1, "retries": 5})
        # send() waits at most a request timeout for metadata (kafka-python's default is 60 s)
        return KafkaProducer(max_block_ms=k.request_timeout_ms, **ordered, **producer_options(self.settings))

    def begin(self) -> None:
        self._futures = []

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        try:
            self._futures.append(self.producer.send(topic, key=key, value=value))
        except Errors.KafkaError as e:  # KafkaTimeoutError: no metadata for the topic within max_block_ms
            raise DeliveryError(f"send failed: {type(e).__name__}: {e}") from e

    def finish(self, offsets: Offsets, consumer: KafkaConsumer) -> None:
        timeout_s = self.settings.kafka.request_timeout_ms / 1000
        try:
            self.producer.flush(timeout=timeout_s * 2)
            for f in self._futures:
                f.get(timeout=timeout_s)  # raises if the broker did not take it
        except Errors.KafkaError as e:
            self._renew_if_broken()
            raise DeliveryError(f"emit failed: {type(e).__name__}: {e}") from e
        finally:
            self._futures = []
        with self._lock:
            _merge(self._pending, offsets)
        self.commit_pending(consumer)

    def abort(self) -> None:
        # What was sent stays sent: the redo emits the same event ids, readers drop the copies.
        self._futures = []

    def _renew_if_broken(self) -> None:
        """An idempotent producer in a fatal state refuses every later send: replace it (its unsent records
        belong to a batch that is redone anyway)."""
        manager = getattr(self.producer, "_transaction_manager", None)
        if manager is not None and manager.has_fatal_error():
            log.warning("producer in a fatal state; replacing it")
            close_producer(self.producer, 0)
            self.producer = self._new_producer()

    def commit_pending(self, consumer: KafkaConsumer, *, force: bool = False) -> None:
        interval_s = self.settings.delivery.commit_interval_ms / 1000
        if not self._pending or (not force and time.monotonic() - self._last_commit < interval_s):
            return
        with self._lock:
            offsets = dict(self._pending)
        try:
            consumer.commit(offsets=offsets)
        except Errors.CommitFailedError as e:
            # The group rebalanced under us: these partitions' new owners start from the last commit
            # and re-emit the same events (same ids).
            log.warning("offset commit refused after a rebalance; the batch will be redelivered", error=str(e))
            with self._lock:
                for tp in offsets:
                    if self._pending.get(tp) == offsets[tp]:
                        del self._pending[tp]
            return
        except Errors.KafkaError as e:
            log.warning("offset commit failed; kept pending", error=f"{type(e).__name__}: {e}")
            return
        with self._lock:
            for tp, meta in offsets.items():
                if self._pending.get(tp) == meta:
                    del self._pending[tp]
        self._last_commit = time.monotonic()

    def pending(self) -> Offsets:
        with self._lock:
            return dict(self._pending)

    def drop_pending(self, partitions) -> None:
        with self._lock:
            for tp in partitions:
                self._pending.pop(tp, None)

    def close(self, timeout_s: float) -> None:
        close_producer(self.producer, timeout_s)


class Transactional:
    """One Kafka transaction per batch: outputs and offsets commit together or not at all."""

    mode = "transactional"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transactional_id = transactional_id(settings)
        self.producer = KafkaProducer(
            transactional_id=self.transactional_id, enable_idempotence=True,
            max_block_ms=int(settings.delivery.commit_watchdog_s * 1000), **producer_options(settings),
        )
        self._watchdog_s = settings.delivery.commit_watchdog_s
        self._in_txn = False
        self._broken = False
        try:
            self.producer.init_transactions()  # fences any older producer with this id, aborts its open txn
        except Errors.KafkaError as e:
            close_producer(self.producer, 0)
            raise FatalDeliveryError(f"init_transactions failed for {self.transactional_id}: {e}") from e
        log.info("transactional producer ready", transactional_id=self.transactional_id)

    def _fatal_or(self, e: BaseException, what: str) -> Exception:
        if isinstance(e, FatalDeliveryError):
            self._broken = True
            return e
        # kafka-python often reports fencing indirectly ("Cannot execute transactional method because we
        # are in an error state: ProducerFencedError"): its transaction manager's state is the truth.
        manager = getattr(self.producer, "_transaction_manager", None)
        if isinstance(e, FATAL_ERRORS) or (manager is not None and manager.has_fatal_error()):
            self._broken = True
            return FatalDeliveryError(f"{what}: {type(e).__name__}: {e} (fenced or unrecoverable; exit)")
        return DeliveryError(f"{what}: {type(e).__name__}: {e}")

    def begin(self) -> None:
        try:
            self.producer.begin_transaction()
        except Exception as e:  # noqa: BLE001 - classified
            raise self._fatal_or(e, "begin_transaction") from e
        self._in_txn = True

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        try:
            self.producer.send(topic, key=key, value=value)
        except Exception as e:  # noqa: BLE001
            raise self._fatal_or(e, "send") from e

    def finish(self, offsets: Offsets, consumer: KafkaConsumer) -> None:
        try:
            with_watchdog(lambda: self.producer.send_offsets_to_transaction(offsets, consumer.group_metadata()),
                          self._watchdog_s, "send_offsets_to_transaction")
            with_watchdog(self.producer.commit_transaction, self._watchdog_s, "commit_transaction")
        except Exception as e:  # noqa: BLE001
            raise self._fatal_or(e, "commit") from e
        self._in_txn = False

    def abort(self) -> None:
        if not self._in_txn:
            return
        self._in_txn = False
        if self._broken:
            return
        try:
            with_watchdog(self.producer.abort_transaction, self._watchdog_s, "abort_transaction")
        except Exception as e:  # noqa: BLE001
            raise self._fatal_or(e, "abort_transaction") from e
        log.info("transaction aborted", transactional_id=self.transactional_id)

    def commit_pending(self, consumer: KafkaConsumer, *, force: bool = False) -> None:
        return None  # offsets are committed inside each batch's transaction

    def pending(self) -> Offsets:
        return {}

    def drop_pending(self, partitions) -> None:
        return None

    def close(self, timeout_s: float) -> None:
        if self._in_txn and not self._broken:
            try:
                self.abort()
            except Exception as e:  # noqa: BLE001 - closing anyway
                log.warning("abort on close failed", error=str(e))
        close_producer(self.producer, 0 if self._broken else timeout_s)


def make_emitter(settings: Settings) -> Emitter:
    if settings.delivery.mode == "transactional":
        return Transactional(settings)
    return AtLeastOnce(settings)
