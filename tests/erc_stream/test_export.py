"""`erc-stream export --format parquet|csv` on the real broker: partitions, contents, copies, resumption."""

from __future__ import annotations

import csv
import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
from click.testing import CliRunner
from kafka import KafkaConsumer, TopicPartition

from core.records import EmotionEvent
from core.settings import Settings
from erc_stream.cli import main
from erc_stream.export import SCHEMA, Exporter, data_files, read_dataset
from tests.kafka_helpers import produce_raw

LABELS = ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry")
DAY1 = datetime(2026, 1, 5, 23, 59, 30, tzinfo=UTC)
DAY2 = DAY1 + timedelta(minutes=1)  # 2026-01-06


def _event(run: str, i: int, *, tenant: str | None, emitted_at: datetime, label: str = "angry",
           gold: str | None = None) -> EmotionEvent:
    probs = {name: (0.4 if name == label else 0.1) for name in LABELS}
    conv = f"{run}:c{i % 3}"
    mid = f"{conv}:{i}"
    return EmotionEvent(event_id=EmotionEvent.make_id(tenant=tenant, conversation_id=conv, message_id=mid, model="m", adapter="a"), message_id=mid, conversation_id=conv, turn=i,
                        speaker="A", tenant=tenant, label=label, probabilities=probs, label_set="meld", model="m",
                        adapter="a", window=3, latency_ms=12.5, emitted_at=emitted_at, gold_label=gold)


def _env(settings: Settings) -> dict[str, str]:
    k = settings.kafka
    return {"ERC_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers, "ERC_KAFKA__OUTPUT_TOPIC": k.output_topic,
            "ERC_EXPORT__GROUP_ID": f"{k.group_id}-export", "ERC_EXPORT__FLUSH_EVENTS": "4"}


def _export(settings: Settings, out: Path, fmt: str = "parquet", **extra: str) -> str:
    result = CliRunner().invoke(main, ["export", "--format", fmt, "--out", str(out)],
                                env={**_env(settings), **extra})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _committed(settings: Settings, group: str) -> dict[int, int | None]:
    c = KafkaConsumer(group_id=group, enable_auto_commit=False, **settings.kafka.client_options())
    try:
        return {p: c.committed(TopicPartition(settings.kafka.output_topic, p)) for p in range(settings.kafka.partitions)}
    finally:
        c.close(autocommit=False)


def test_parquet_export_is_partitioned_deduplicated_and_resumable(settings: Settings, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    tenants = ["acme", "b/c d", None]  # a tenant that needs encoding in a path, and none
    first = [_event(run, i, tenant=tenants[i % 3], emitted_at=DAY1 if i < 6 else DAY2,
                    label=LABELS[i % 7], gold="angry" if i % 2 else None) for i in range(9)]
    items = [(e.conversation_id.encode(), e.to_bytes()) for e in first]
    items.insert(3, items[1])  # a redelivered copy, same event_id
    items.insert(5, (b"junk", b"not an event"))  # never stops the export
    metas = produce_raw(settings, settings.kafka.output_topic, items)
    ends: dict[int, int] = {}
    for m in metas:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)

    out = tmp_path / "events"
    output = _export(settings, out)
    assert "exported 9 events" in output and "1 copies dropped, 1 skipped" in output

    # The layout a BI tool expects: date=/tenant= directories, tenant URL-encoded.
    dirs = {str(f.parent.relative_to(out)) for f in data_files(out)}
    assert dirs == {"date=2026-01-05/tenant=acme", "date=2026-01-05/tenant=b%2Fc%20d",
                    "date=2026-01-05/tenant=__none__", "date=2026-01-06/tenant=acme",
                    "date=2026-01-06/tenant=b%2Fc%20d", "date=2026-01-06/tenant=__none__"}
    assert not [p for p in out.rglob(".*")]  # no temporaries left behind
    one = pq.read_table(data_files(out)[0])
    assert one.schema.names == SCHEMA.names  # date and tenant live in the path

    table = read_dataset(out)
    rows = {r["event_id"]: r for r in table.to_pylist()}
    assert table.num_rows == 9 and set(rows) == {e.event_id for e in first}
    for e in first:
        r = rows[e.event_id]
        assert (r["message_id"], r["conversation_id"], r["turn"], r["label"], r["tenant"], r["gold_label"]) == (
            e.message_id, e.conversation_id, e.turn, e.label, e.tenant, e.gold_label)
        assert r["date"] == e.emitted_at.strftime("%Y-%m-%d") and r["emitted_at"] == e.emitted_at
        assert r["confidence"] == 0.4 and json.loads(r["probabilities"]) == e.probabilities
    assert sorted(table.column("label").to_pylist()) == sorted(e.label for e in first)
    # A plain hive-partitioned read (what DuckDB/Spark do) sees the same rows, tenant decoded.
    plain = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert plain.num_rows == 9 and "b/c d" in set(map(str, plain.column("tenant").to_pylist()))

    group = f"{settings.kafka.group_id}-export"
    assert _committed(settings, group) == {p: ends.get(p) for p in range(settings.kafka.partitions)}

    # A second run resumes: only what came since (a copy of an old event is dropped, from the files).
    more = [_event(run, i, tenant="acme", emitted_at=DAY2) for i in range(9, 12)]
    produce_raw(settings, settings.kafka.output_topic,
                [(e.conversation_id.encode(), e.to_bytes()) for e in more] + [items[0]])
    output = _export(settings, out)
    assert "exported 3 events" in output and "1 copies dropped" in output
    assert read_dataset(out).num_rows == 12

    # Offsets lost (a crash after the files, before the commit; here: a fresh group): nothing twice.
    again = Exporter(settings, out, "parquet", group_id=f"{group}-fresh").run()
    assert again.events == 0 and again.copies == 12 + 2 and again.files == []  # 12 events, 2 copies
    assert read_dataset(out).num_rows == 12


def test_csv_export_carries_date_and_tenant_columns(settings: Settings, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    events = [_event(run, i, tenant=["acme", None][i % 2], emitted_at=DAY1, label=LABELS[i % 7]) for i in range(5)]
    produce_raw(settings, settings.kafka.output_topic, [(e.conversation_id.encode(), e.to_bytes()) for e in events])
    out = tmp_path / "csv"
    assert "exported 5 events" in _export(settings, out, "csv")
    files = data_files(out)
    assert {f.suffix for f in files} == {".csv"} and len(files) == 2
    rows = [row for f in files for row in csv.DictReader(f.open())]
    assert sorted(r["event_id"] for r in rows) == sorted(e.event_id for e in events)
    assert {(r["date"], r["tenant"]) for r in rows} == {("2026-01-05", "acme"), ("2026-01-05", "")}
    assert all(datetime.fromisoformat(r["emitted_at"]) == DAY1 for r in rows)
    table = read_dataset(out)
    assert table.num_rows == 5 and sorted(table.column("tenant").to_pylist(), key=str) == sorted(
        [e.tenant for e in events], key=str)
    assert os.path.basename(files[0]).startswith("part-")
