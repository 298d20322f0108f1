"""Record batches as other teams' producers send them: every codec, a corrupt batch, a decompression bomb.

The decoders alone first (bounded, each codec), then the done-when of the stream: a foreign producer (librdkafka,
through confluent-kafka) sends conversations in gzip, snappy, lz4, zstd and uncompressed batches, with a corrupt
batch and a bomb among them, all on one partition, to a real ``erc-stream consume`` process on the real broker.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka import codec as kafka_codec
from kafka import errors as Errors
from kafka.record import default_records
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords

from consumer import record_batches
from core.readers import read_dead_letters, read_events
from core.records import ChatMessage
from core.settings import Settings
from tests.procs import ConsumerProc, stream_messages

confluent_kafka = pytest.importorskip("confluent_kafka")

CAP = 2 * 1024 * 1024  # the consumer's kafka.max_decompressed_batch_bytes in these tests


@pytest.fixture
def capped():
    """The hooks installed with a 2 MiB cap (restored to the default cap afterwards)."""
    record_batches.install(CAP)
    yield
    record_batches.install(Settings().kafka.max_decompressed_batch_bytes)


ENCODERS = {
    "gzip": (kafka_codec.gzip_encode, record_batches.gzip_decode),
    "snappy": (kafka_codec.snappy_encode, record_batches.snappy_decode),
    "lz4": (kafka_codec.lz4_encode, record_batches.lz4_decode),
    "zstd": (kafka_codec.zstd_encode, record_batches.zstd_decode),
}


@pytest.mark.parametrize("codec", sorted(ENCODERS))
def test_each_codec_decodes_below_the_cap_and_refuses_above_it(codec: str, capped) -> None:
    encode, decode = ENCODERS[codec]
    text = b"a customer says hello " * 1000
    assert decode(encode(text)) == text
    bomb = encode(b"\x00" * (CAP + 1))
    assert len(bomb) < CAP // 20  # small on the wire (snappy inflates ~21x at most, the others far more)...
    with pytest.raises(record_batches.BatchTooLarge):  # ...refused before it is inflated
        decode(bomb)
    with pytest.raises(Errors.CorruptRecordError, match=f"corrupt {codec} payload"):
        decode(encode(text)[:-7] + b"garbage")


def test_the_hooks_are_what_kafka_python_calls(capped) -> None:
    assert record_batches.installed()
    assert default_records.gzip_decode is record_batches.gzip_decode


def test_an_unreadable_batch_is_located_by_its_header() -> None:
    buffers = []
    for base in (10, 13):
        builder = DefaultRecordBatchBuilder(magic=2, compression_type=1, is_transactional=False, producer_id=-1,
                                            producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
        for i in range(3):
            builder.append(i, timestamp=None, key=None, value=b"v", headers=[])
        raw = bytearray(builder.build())
        raw[0:8] = base.to_bytes(8, "big")  # the batch's base offset
        buffers.append(bytes(raw))
    buffer = b"".join(buffers)
    assert MemoryRecords(buffer).next_batch().base_offset == 10
    assert record_batches.locate(buffer, 10) == (10, 13)
    assert record_batches.locate(buffer, 11) == (11, 13)  # the position inside a batch
    assert record_batches.locate(buffer, 14) == (14, 16)
    assert record_batches.locate(b"\x00" * 5, 7) == (7, 8)  # no readable header: one offset


def _confluent(settings: Settings, codec: str):
    return confluent_kafka.Producer({
        "bootstrap.servers": settings.kafka.bootstrap_servers, "compression.type": codec, "linger.ms": 50,
        "acks": "all", "message.max.bytes": 16 * 1024 * 1024,
    })


def _send_confluent(settings: Settings, codec: str, items: list[tuple[bytes, bytes]]) -> None:
    """One producer per codec; everything on partition 0, so the good batches come after the bad ones."""
    producer = _confluent(settings, codec)
    errors: list = []
    for key, value in items:
        producer.produce(settings.kafka.input_topic, value=value, key=key, partition=0,
                         on_delivery=lambda err, _msg: errors.append(err) if err else None)
    assert producer.flush(30) == 0
    assert not errors, errors


def _send_corrupt_gzip_batch(settings: Settings, items: list[tuple[bytes, bytes]],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer whose gzip codec is broken: the batch has a valid CRC (computed over the bad payload), so the
    broker stores it, and no consumer can inflate it."""
    monkeypatch.setattr(default_records, "gzip_encode", lambda payload, **kw: b"\x1f\x8b\x08\x00" + b"\xff" * 64)
    producer = KafkaProducer(compression_type="gzip", linger_ms=100, acks="all", **settings.kafka.client_options())
    try:
        futures = [producer.send(settings.kafka.input_topic, key=k, value=v, partition=0) for k, v in items]
        producer.flush(30)
        offsets = {f.get(30).offset for f in futures}
    finally:
        producer.close(5)
        monkeypatch.undo()
    assert len(offsets) == len(items)


def test_a_foreign_producer_in_every_codec_with_a_corrupt_batch_and_a_bomb(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = uuid.uuid4().hex[:8]
    msgs = stream_messages(5, 4, run_id=run)
    by_conv: dict[str, list[ChatMessage]] = {}
    for m in msgs:
        by_conv.setdefault(m.conversation_id, []).append(m)
    convs = list(by_conv.values())
    items = [[(m.conversation_id.encode(), m.to_bytes()) for m in conv] for conv in convs]
    broken = [(f"{run}:broken".encode(), m.model_copy(update={"conversation_id": f"{run}:broken"}).to_bytes())
              for m in convs[0][:3]]
    bomb_text = "a" * (CAP + 1024)  # one valid message, inflating past the consumer's cap
    bomb = ChatMessage(message_id=f"{run}:bomb", conversation_id=f"{run}:bomb", turn=0, speaker="x",
                       text=bomb_text, sent_at=convs[0][0].sent_at)

    consumer = ConsumerProc(settings, tmp_path, "codecs", ERC_KAFKA__MAX_DECOMPRESSED_BATCH_BYTES=str(CAP))
    consumer.start()
    try:
        consumer.wait_assigned()
        pid = consumer.proc.pid
        _send_confluent(settings, "gzip", items[0])
        _send_corrupt_gzip_batch(settings, broken, monkeypatch)
        _send_confluent(settings, "snappy", items[1])
        _send_confluent(settings, "gzip", [(bomb.conversation_id.encode(), bomb.to_bytes())])
        _send_confluent(settings, "lz4", items[2])
        _send_confluent(settings, "zstd", items[3])
        _send_confluent(settings, "none", items[4])

        deadline = time.monotonic() + 90
        while True:
            out = read_events(settings, timeout_s=5)
            if len({e.event_id for e in out.events}) >= len(msgs) or time.monotonic() > deadline:
                break
            assert consumer.alive, consumer.tail()
            time.sleep(1)
        letters, _ = read_dead_letters(settings, timeout_s=10)
        assert consumer.alive and consumer.proc.pid == pid and consumer.starts == 1, consumer.tail()
    finally:
        assert consumer.terminate() == 0, consumer.tail()

    # Every good message has exactly one event (one distinct id), whatever its batch's codec.
    assert sorted(e.message_id for e in out.events) == sorted(m.message_id for m in msgs)
    assert len({e.event_id for e in out.events}) == len(msgs)
    # The corrupt batch and the bomb: one dead letter each, naming partition and offsets, nothing else.
    assert sorted(d.error_type for d in letters) == ["undecodable_batch", "undecodable_batch"], letters
    corrupt, inflating = sorted(letters, key=lambda d: d.source_offset)
    assert (corrupt.source_partition, corrupt.source_offset, corrupt.source_end_offset) == (0, 4, 7)
    assert "corrupt gzip payload" in corrupt.reason, corrupt.reason
    assert (inflating.source_offset, inflating.source_end_offset) == (11, 12)
    assert "inflates past" in inflating.reason
    assert consumer.count("undecodable record batch; dead-lettered and skipped") == 2

