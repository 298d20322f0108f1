"""Record batches as other producers send them: every codec decoded, none decompressed past a bound, and a batch
that cannot be read named by its partition and offsets, so the stream dead-letters it and goes past it.

kafka-python decodes a fetched batch lazily, while ``poll()`` hands out its records. A batch it cannot read (a
codec whose library is missing, a corrupt payload, a CRC mismatch) raises out of ``poll()`` without naming the
partition or the offsets, and leaves the consumer's position on that batch: every later poll raises again (a
crash loop, or a stream that stops). And it inflates gzip without a bound: a 2 MiB fetch can expand to GBs.

:func:`install` (once per process; the consumer calls it) hooks two places of kafka-python 3.0 (pinned ``<3.1``
in pyproject.toml; tests/consumer/test_record_batches.py fails if the hooks stop taking effect):

- the decoders its batch classes call become bounded ones: a batch whose decompressed size would pass
  ``kafka.max_decompressed_batch_bytes`` fails like a corrupt one *before* that memory is taken (gzip, lz4 and
  zstd are inflated as streams with a limit; snappy blocks declare their length up front);
- the fetcher's record unpacking turns any failure of a batch into :class:`UndecodableBatch`: the partition, the
  batch's first offset and the offset after it, read from the batch header (never compressed, so readable when
  the payload is not). A header that itself cannot be parsed is skipped one offset at a time.

The stream (:mod:`consumer.partitions`) catches :class:`UndecodableBatch`, seeks past the batch and hands it on
as one :class:`SkippedBatch` item: the pipeline dead-letters it (``undecodable_batch``) and the checkpoint
commits past it with the batch it came in. Nothing of a readable batch is touched.
"""

from __future__ import annotations

import functools
import io
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import lz4.frame
import zstandard
from kafka import errors as Errors
from kafka.codec import _detect_xerial_stream  # noqa: PLC2701 - kafka-python's own xerial framing check
from kafka.codec import snappy_decode as _snappy_decode
from kafka.consumer.fetcher import Fetcher
from kafka.record import default_records, legacy_records
from kafka.record.memory_records import MemoryRecords

#: The decompressed-size cap (bytes) the bounded decoders enforce; set by :func:`install`.
_limit = 64 * 1024 * 1024
_installed = False
_lock = threading.Lock()


class BatchTooLarge(Errors.CorruptRecordError):
    """A compressed batch would inflate past the cap (a decompression bomb, or a cap set too low)."""


class UndecodableBatch(Errors.KafkaError):
    """A fetched batch that cannot be decoded: which partition, which offsets (``first`` to ``end`` - 1), why."""

    def __init__(self, topic: str, partition: int, first: int, end: int, reason: str) -> None:
        super().__init__(f"{topic}/{partition} offsets {first}..{end - 1}: {reason}")
        self.topic = topic
        self.partition = partition
        self.first = first
        self.end = end
        self.reason = reason


@dataclass(frozen=True)
class SkippedBatch:
    """An undecodable batch in a stream batch, shaped like the consumer records around it (topic, partition,
    offset = its first offset, ``end`` = the offset after it; no key, no value)."""

    topic: str
    partition: int
    offset: int
    end: int
    reason: str
    key: None = None
    value: None = None
    headers: tuple = ()

    @classmethod
    def of(cls, e: UndecodableBatch) -> "SkippedBatch":
        return cls(e.topic, e.partition, e.first, e.end, e.reason)


# -- bounded decoders ------------------------------------------------------------------------------

def _codec(name: str) -> Callable[[Callable[[bytes], bytes]], Callable[[bytes], bytes]]:
    """Name the codec in whatever its library raises on a corrupt payload (zlib.error, ZstdError, ...)."""
    def wrap(decode: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        @functools.wraps(decode)
        def named(payload) -> bytes:
            try:
                return decode(payload)
            except Errors.KafkaError:
                raise
            except Exception as e:  # noqa: BLE001 - every library has its own error class
                raise Errors.CorruptRecordError(f"corrupt {name} payload: {type(e).__name__}: {e}") from e
        return named
    return wrap


def _too_large(codec: str) -> BatchTooLarge:
    return BatchTooLarge(f"{codec} batch inflates past {_limit:,} bytes (kafka.max_decompressed_batch_bytes)")


@_codec("gzip")
def gzip_decode(payload) -> bytes:
    """gzip, member after member (a producer may concatenate several), never more than the cap."""
    out = bytearray()
    data = bytes(payload)
    while data:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        out += inflater.decompress(data, _limit + 1 - len(out))
        if len(out) > _limit:
            raise _too_large("gzip")
        if not inflater.eof:
            raise Errors.CorruptRecordError("gzip stream ends before its end marker")
        data = inflater.unused_data.lstrip(b"\x00")  # padding after the last member, as gzip(1) allows
    return bytes(out)


@_codec("lz4")
def lz4_decode(payload) -> bytes:
    """An LZ4 frame (the format of Kafka ≥ 0.10's lz4 batches), never more than the cap."""
    inflater = lz4.frame.LZ4FrameDecompressor()
    out = inflater.decompress(bytes(payload), max_length=_limit + 1)
    if len(out) > _limit:
        raise _too_large("lz4")
    if not inflater.eof:
        raise Errors.CorruptRecordError("lz4 frame ends before its end mark")
    return out


@_codec("zstd")
def zstd_decode(payload) -> bytes:
    """zstd frames (read across frames, as kafka-python does), never more than the cap."""
    out = bytearray()
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(payload)), read_across_frames=True)
    with reader:
        while chunk := reader.read(min(1 << 20, _limit + 1 - len(out))):
            out += chunk
            if len(out) > _limit:
                raise _too_large("zstd")
    return bytes(out)


def _varint(block: bytes) -> int:
    """The uncompressed length a raw snappy block starts with (a little-endian base-128 varint)."""
    value = shift = 0
    for byte in block[:5]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    raise Errors.CorruptRecordError("snappy block without a length")


def _snappy_blocks(payload: bytes) -> list[bytes]:
    """The raw snappy blocks of a payload: one, or the blocks of a xerial stream (Java clients' framing)."""
    if not _detect_xerial_stream(payload):
        return [payload]
    blocks, cursor = [], 16
    while cursor < len(payload):
        (length,) = struct.unpack_from("!i", payload, cursor)
        blocks.append(payload[cursor + 4:cursor + 4 + length])
        cursor += 4 + length
    return blocks


@_codec("snappy")
def snappy_decode(payload) -> bytes:
    """snappy, raw or xerial-framed: the blocks' declared lengths are checked against the cap first."""
    data = bytes(payload)
    try:
        declared = sum(_varint(b) for b in _snappy_blocks(data))
    except struct.error as e:
        raise Errors.CorruptRecordError(f"snappy framing: {e}") from e
    if declared > _limit:
        raise _too_large("snappy")
    return _snappy_decode(data)


def lz4_decode_old_kafka(payload) -> bytes:
    """Kafka 0.8/0.9's lz4 (a wrong header checksum): refused, as no producer of a supported broker writes it."""
    raise Errors.UnsupportedCodecError("lz4 with the pre-0.10 header checksum (message format v0)")


# -- which batch failed ----------------------------------------------------------------------------

def locate(buffer, offset: int) -> tuple[int, int]:
    """The offsets (first, end) of the batch of ``buffer`` (a partition's fetched bytes) that holds ``offset``,
    or, where no header can be read there, ``(offset, offset + 1)``. Reads headers only: nothing is inflated."""
    try:
        scan = MemoryRecords(bytes(buffer))
        while (batch := scan.next_batch()) is not None:
            end = getattr(batch, "next_offset", batch.base_offset + 1)  # a v0/v1 wrapper: its last offset
            if end > offset:
                return max(batch.base_offset, offset), end
    except Exception:  # noqa: BLE001 - an unreadable header: skip one offset
        pass
    return offset, offset + 1


_original_unpack = Fetcher.PartitionRecords._unpack_records


def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
    """kafka-python's record unpacking, with any failure named by partition and batch offsets."""
    try:
        yield from _original_unpack(self, tp, records, key_deserializer, value_deserializer)
    except Exception as e:
        first, end = locate(getattr(records, "_buffer", b""), self.next_fetch_offset)
        raise UndecodableBatch(tp.topic, tp.partition, first, end, f"{type(e).__name__}: {e}") from e


def install(max_decompressed_bytes: int) -> None:
    """Hook the bounded decoders and the failure naming into kafka-python (idempotent; the cap is per process:
    the last call's wins)."""
    global _limit, _installed
    with _lock:
        _limit = max_decompressed_bytes
        if _installed:
            return
        for module in (default_records, legacy_records):
            module.gzip_decode = gzip_decode
            module.snappy_decode = snappy_decode
            module.lz4_decode = lz4_decode
        default_records.zstd_decode = zstd_decode
        legacy_records.lz4_decode_old_kafka = lz4_decode_old_kafka
        Fetcher.PartitionRecords._unpack_records = _unpack_records
        _installed = True


def installed() -> bool:
    """Whether the hooks are in place (and still the ones kafka-python calls)."""
    return _installed and Fetcher.PartitionRecords._unpack_records is _unpack_records \
        and default_records.gzip_decode is gzip_decode
