"""``erc-stream export --format parquet|csv``: the emotion events as a dataset a BI tool reads.

Layout (Hive style, read by pyarrow, DuckDB, Spark, Athena, …)::

    OUT/date=2026-01-05/tenant=acme/part-20260105T090000-1a2b3c4d.parquet
    OUT/date=2026-01-05/tenant=__none__/part-….csv
    OUT/date=2026-01-05/tenant=~sha256-9f86d081884c7d659a2feaa0c55ad015/part-….parquet

``date`` is the UTC day of ``emitted_at``; ``tenant`` is URL-encoded (``__none__`` for events without
one) — unless that would make a folder name some file system refuses or that could be mistaken for another
tenant's (longer than :data:`TENANT_DIR_MAX` bytes encoded, empty, ending in a dot, ``__none__`` itself, or
starting with :data:`HASHED`): then it is :data:`HASHED` and 32 hex digits of the name's SHA-256, the same on
every run. Whatever the folder, every row carries the tenant's real name in its ``tenant_name`` column (what a
BI tool should group by; null for events without one). Parquet files leave ``date`` and ``tenant`` to the
path (the Hive convention; read them with :func:`read_dataset`, which types both as strings and takes the
tenant from ``tenant_name``); CSV files repeat them as columns, because most tools that read a folder of CSV
files ignore the path.

CSV cells are safe to open in a spreadsheet: a string cell starting with ``=``, ``+``, ``-``, ``@``, a tab or
a carriage return — which a spreadsheet would run as a formula — gets a leading ``'`` (OWASP's advice), and
so does one starting with ``'`` (so that the quote comes off again unambiguously: :func:`read_dataset` does).

Resumable: the exporter reads ``chat.emotions`` under its own consumer group (``export.group_id``) and
commits the offsets only after the files holding those events are durably written (written to a hidden
temporary name, fsynced, renamed, directory fsynced; readers skip names starting with ``.``). A next run
starts at the committed offsets. Copies (redelivered events, same ``event_id``) are dropped, also across
runs: a run starts by reading the ``event_id`` column of the files already there, so a crash between
writing files and committing offsets does not export anything twice.

One exporter per group at a time: it assigns itself every partition of the topic (no group membership,
no rebalance wait).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from core.readers import Deduper, isolation_level
from core.records import EmotionEvent
from core.settings import Settings

log = structlog.get_logger(__name__)

Format = Literal["parquet", "csv"]
NO_TENANT = "__none__"

#: Columns of every file, in order (CSV files add ``date`` and ``tenant``).
SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("message_id", pa.string()),
    ("conversation_id", pa.string()),
    ("turn", pa.int64()),
    ("speaker", pa.string()),
    ("label", pa.string()),
    ("confidence", pa.float64()),  # the label's probability
    ("probabilities", pa.string()),  # every label's probability, a JSON object
    ("label_set", pa.string()),
    ("model", pa.string()),
    ("adapter", pa.string()),
    ("window", pa.int32()),
    ("latency_ms", pa.float64()),
    ("emitted_at", pa.timestamp("us", tz="UTC")),
    ("gold_label", pa.string()),
    ("window_degraded", pa.bool_()),
    ("source_partition", pa.int32()),  # where the event is on chat.emotions (lineage)
    ("source_offset", pa.int64()),
    ("tenant_name", pa.string()),  # the real name, whatever its folder's (files of earlier versions lack it)
])
PARTITIONING = pa.schema([("date", pa.string()), ("tenant", pa.string())])
#: Longest URL-encoded tenant used as its folder's value, in bytes: well under the 255 of most file systems (and
#: the 143 of eCryptfs), with room for ``tenant=``.
TENANT_DIR_MAX = 120
#: The folder value of a tenant that cannot be its own (``~`` is never escaped by URL-encoding, so a tenant whose
#: encoding starts with this is hashed too: the two kinds never meet).
HASHED = "~sha256-"
#: What a spreadsheet would start a formula with (OWASP, "CSV injection"), and the quote that neutralises it.
FORMULA_START = r"^([=+\-@\t\r'])"


def tenant_value(tenant: str | None) -> str:
    """The folder value of ``tenant`` (``tenant=<this>``): URL-encoded, or a stable hash where that cannot be."""
    if tenant is None:
        return NO_TENANT
    encoded = quote(tenant, safe="", errors="surrogatepass")
    if (len(encoded) > TENANT_DIR_MAX or encoded in ("", NO_TENANT) or encoded.endswith(".")
            or encoded.startswith(HASHED)):
        return HASHED + hashlib.sha256(tenant.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return encoded


def tenant_dir(tenant: str | None) -> str:
    return "tenant=" + tenant_value(tenant)


def neutralise(table: pa.Table) -> pa.Table:
    """Every string cell a spreadsheet would run as a formula (or that starts with a quote) gets a leading ``'``."""
    for i, f in enumerate(table.schema):
        if pa.types.is_string(f.type):
            table = table.set_column(i, f.name, pc.replace_substring_regex(
                table.column(i), pattern=FORMULA_START, replacement=r"'\1"))
    return table


def _restore(table: pa.Table) -> pa.Table:
    """:func:`neutralise` undone: the one leading quote it added comes off every string cell."""
    for i, f in enumerate(table.schema):
        if pa.types.is_string(f.type):
            table = table.set_column(i, f.name, pc.replace_substring_regex(
                table.column(i), pattern="^'", replacement="", max_replacements=1))
    return table


def _row(event: EmotionEvent, partition: int, offset: int) -> dict[str, object]:
    return {
        "event_id": event.event_id, "message_id": event.message_id, "conversation_id": event.conversation_id,
        "turn": event.turn, "speaker": event.speaker, "label": event.label,
        "confidence": event.probabilities[event.label],
        "probabilities": json.dumps(event.probabilities, separators=(",", ":")),
        "label_set": event.label_set, "model": event.model, "adapter": event.adapter, "window": event.window,
        "latency_ms": event.latency_ms, "emitted_at": event.emitted_at.astimezone(UTC),
        "gold_label": event.gold_label, "window_degraded": event.window_degraded,
        "source_partition": partition, "source_offset": offset, "tenant_name": event.tenant,
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(directory: Path, table: pa.Table, fmt: Format, date: str, tenant: str | None) -> Path:
    """One file, atomically and durably: hidden temp name, fsync, rename, fsync of the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.{fmt}"
    tmp = directory / f".{name}.tmp"
    if fmt == "parquet":
        pq.write_table(table, tmp, compression="zstd")
    else:
        n = table.num_rows
        table = table.set_column(table.schema.get_field_index("emitted_at"), "emitted_at",
                                 pa.array([t.isoformat() for t in table.column("emitted_at").to_pylist()],
                                          pa.string()))
        table = table.append_column("date", pa.array([date] * n, pa.string()))
        table = table.append_column("tenant", pa.array([tenant] * n, pa.string()))
        pacsv.write_csv(neutralise(table), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    final = directory / name
    tmp.rename(final)
    _fsync_dir(directory)
    return final


def data_files(root: Path) -> list[Path]:
    """The dataset's finished files (hidden temporaries skipped), in a stable order."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("part-*") if p.is_file() and p.suffix in (".parquet", ".csv")
                  and not p.name.startswith("."))


def read_dataset(root: Path) -> pa.Table:
    """An exported dataset as one table with ``date`` and ``tenant`` columns (strings; the tenant's real name,
    None for events without one), whichever the format, CSV cells as they were before :func:`neutralise`."""
    files = data_files(root)
    parquet = [f for f in files if f.suffix == ".parquet"]
    csv = [f for f in files if f.suffix == ".csv"]
    tables: list[pa.Table] = []
    if parquet:
        dataset = ds.dataset([str(f) for f in parquet], schema=pa.unify_schemas([SCHEMA, PARTITIONING]),
                             format="parquet",
                             partitioning=ds.partitioning(PARTITIONING, flavor="hive"),
                             partition_base_dir=str(root))
        tables.append(dataset.to_table())
    for f in csv:
        types = {**{name: SCHEMA.field(name).type for name in SCHEMA.names if name != "emitted_at"},
                 "emitted_at": pa.timestamp("us", tz="UTC"), "date": pa.string(), "tenant": pa.string()}
        table = _restore(pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=types,
                                                                                 strings_can_be_null=True)))
        if "tenant_name" not in table.column_names:  # written by an earlier version
            table = table.append_column("tenant_name", pa.nulls(table.num_rows, pa.string()))
        tables.append(table)
    if not tables:
        return SCHEMA.empty_table().append_column("date", pa.array([], pa.string())).append_column(
            "tenant", pa.array([], pa.string()))
    table = pa.concat_tables([t.select(SCHEMA.names + ["date", "tenant"]) for t in tables])
    # the real name; files of earlier versions have none: their folder's (decoded) or CSV column's value
    tenants = [name if name is not None else None if folder in (None, NO_TENANT) else folder
               for name, folder in zip(table.column("tenant_name").to_pylist(), table.column("tenant").to_pylist(),
                                       strict=True)]
    return table.set_column(table.schema.get_field_index("tenant"), "tenant", pa.array(tenants, pa.string()))


def existing_event_ids(root: Path) -> Iterator[str]:
    for f in data_files(root):
        if f.suffix == ".parquet":
            column = pq.read_table(f, columns=["event_id"]).column("event_id")
        else:
            column = _restore(pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                include_columns=["event_id"], column_types={"event_id": pa.string()}))).column("event_id")
        yield from column.to_pylist()


@dataclass
class ExportReport:
    events: int = 0  # rows written by this run
    copies: int = 0  # redelivered events dropped (within the run or already exported)
    skipped: int = 0  # records that are not emotion events (logged)
    files: list[Path] = field(default_factory=list)
    committed: dict[int, int] = field(default_factory=dict)  # partition -> next offset


class Exporter:
    """Reads the output topic from the group's committed offsets and writes partitioned files."""

    def __init__(self, settings: Settings, out: Path, fmt: Format, *, group_id: str | None = None) -> None:
        self.settings = settings
        self.out = out
        self.fmt = fmt
        self.group_id = group_id or settings.export.group_id
        self.report = ExportReport()
        self.dedupe = Deduper(settings.export.dedupe_ids)
        for event_id in existing_event_ids(out):
            self.dedupe.first(event_id)
        self.dedupe.copies = 0
        self._rows: dict[tuple[str, str | None], list[dict[str, object]]] = defaultdict(list)
        self._offsets: dict[TopicPartition, int] = {}

    def run(self, *, follow: bool = False, idle_grace_s: float = 1.0, stop=lambda: False) -> ExportReport:
        s = self.settings
        consumer = KafkaConsumer(
            group_id=self.group_id, client_id=f"{s.kafka.client_id}-export", enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level=isolation_level(s),
            fetch_max_bytes=max(52_428_800, s.kafka.max_message_bytes * 4),
            max_partition_fetch_bytes=max(1_048_576, s.kafka.max_message_bytes * 4),
            **s.kafka.client_options(),
        )
        try:
            topic = s.kafka.output_topic
            partitions: set[int] = set()
            deadline = time.monotonic() + 30
            while not partitions:
                partitions = consumer.partitions_for_topic(topic) or set()
                if not partitions and time.monotonic() > deadline:
                    raise RuntimeError(f"topic {topic!r} not found on {s.kafka.bootstrap_servers}")
                time.sleep(0 if partitions else 0.1)
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)  # resumes at the group's committed offsets (earliest where none)
            last_flush = time.monotonic()
            quiet_since: float | None = None
            while not stop():
                got = False
                for tp, records in consumer.poll(timeout_ms=300).items():
                    for r in records:
                        got = True
                        self._take(r)
                        self._offsets[tp] = r.offset + 1
                buffered = sum(len(v) for v in self._rows.values())
                if buffered >= s.export.flush_events or time.monotonic() - last_flush >= s.export.flush_interval_s:
                    self._flush(consumer)
                    last_flush = time.monotonic()
                if follow:
                    continue
                if all((high := consumer.highwater(tp)) is not None and consumer.position(tp) >= high for tp in tps):
                    break
                now = time.monotonic()  # a partition never fetched (empty) has no highwater: stop once quiet
                quiet_since = None if got else (quiet_since or now)
                if quiet_since is not None and now - quiet_since >= idle_grace_s and all(
                        consumer.highwater(tp) is None or consumer.position(tp) >= consumer.highwater(tp)
                        for tp in tps):
                    break
            self._flush(consumer)
        finally:
            consumer.close(autocommit=False)
        return self.report

    def _take(self, record) -> None:
        try:
            event = EmotionEvent.from_bytes(record.value)
        except (ValidationError, ValueError, TypeError) as e:
            self.report.skipped += 1
            log.warning("not an emotion event; skipped", partition=record.partition, offset=record.offset,
                        error=str(e)[:200])
            return
        if not self.dedupe.first(event.event_id):
            self.report.copies += 1
            return
        date = event.emitted_at.astimezone(UTC).strftime("%Y-%m-%d")
        self._rows[(date, event.tenant)].append(_row(event, record.partition, record.offset))

    def _flush(self, consumer: KafkaConsumer) -> None:
        """Write the buffered rows (one file per date and tenant), then commit the offsets read so far."""
        for (date, tenant), rows in sorted(self._rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            path = _write_file(self.out / f"date={date}" / tenant_dir(tenant), table, self.fmt, date, tenant)
            self.report.files.append(path)
            self.report.events += len(rows)
        self._rows.clear()
        if self._offsets:
            consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in self._offsets.items()})
            for tp, o in self._offsets.items():
                self.report.committed[tp.partition] = o
            self._offsets.clear()
