"""`erc-stream export` drops redelivered copies by event_id; `erc-stream replay-dlq` sends dead letters back."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from consumer.app import StreamApp
from consumer.delivery import make_emitter
from core.settings import Settings
from scoring.backends.null import NullBackend
from tests.app_threads import FailOnce, run_until
from tests.kafka_helpers import produce_raw, read_all
from tests.procs import PROJECT, consumer_env, stream_messages


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erc_stream", *args], cwd=PROJECT, env=consumer_env(settings),
                          capture_output=True, text=True, timeout=120)


def test_export_writes_each_event_once_and_replay_dlq_resends_originals(settings: Settings, tmp_path: Path) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 10, "max_wait_ms": 50}, store={"dir": tmp_path / "store"})
    msgs = stream_messages(4, 5, run_id=uuid.uuid4().hex[:6])
    bad = b'{"message_id": "oops", "turn": '
    items = [(m.conversation_id.encode(), m.to_bytes()) for m in msgs] + [(b"bad-key", bad)]
    produce_raw(settings, settings.kafka.input_topic, items)

    # The first batch is sent, then fails before its commit: copies.
    app = StreamApp(settings, NullBackend(), emitter=FailOnce(make_emitter(settings)))
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while app.stats.consumed < len(items) and time.monotonic() < deadline:
        time.sleep(0.05)
    app.stop()
    thread.join(30)
    raw = read_all(settings, settings.kafka.output_topic, expected=len(msgs), timeout_s=20)
    assert len(raw) > len(msgs)  # copies on the topic

    out = tmp_path / "events.jsonl"
    result = _cli(settings, "export", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(e["message_id"] for e in lines) == sorted(m.message_id for m in msgs)
    assert len({e["event_id"] for e in lines}) == len(lines)
    assert f"exported {len(msgs)} events ({len(raw) - len(msgs)} redelivered copies dropped)" in result.stderr

    dry = _cli(settings, "replay-dlq", "--dry-run")
    assert dry.returncode == 0 and "replaying 1 {'invalid_json': 1}" in dry.stderr, dry.stderr
    assert "replaying 0" in _cli(settings, "replay-dlq", "--error-type", "conflict").stderr
    result = _cli(settings, "replay-dlq", "--error-type", "invalid_json")
    assert result.returncode == 0 and "replayed 1 records" in result.stderr, result.stderr
    again = read_all(settings, settings.kafka.input_topic, expected=len(items) + 1, timeout_s=20)
    assert [(r.key, r.value) for r in again].count((b"bad-key", bad)) == 2


def test_conversations_and_tenants_that_number_messages_alike_keep_every_event(settings: Settings,
                                                                               tmp_path: Path) -> None:
    """Call-center and chat systems number messages per conversation: "1", "2", ... Two conversations, and the
    same conversation id under two tenants, all sending ids "1".."5", are twenty events with twenty ids."""
    from datetime import UTC, datetime

    from core.readers import read_events
    from core.records import ChatMessage

    settings = settings.with_overrides(batch={"micro_batch_size": 8, "max_wait_ms": 50})
    now = datetime.now(UTC)
    streams = [(None, "c1"), (None, "c2"), ("acme", "c1"), ("globex", "c1")]
    msgs = [ChatMessage(message_id=str(i), conversation_id=conv, turn=i - 1, speaker=f"S{i % 2}", text=f"turn {i}",
                        sent_at=now, tenant=tenant) for tenant, conv in streams for i in range(1, 6)]
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])
    app = StreamApp(settings, NullBackend())
    run_until(app, lambda: app.stats.consumed >= len(msgs))
    assert app.stats.events == len(msgs) and app.stats.dead_letters == 0, app.stats

    read = read_events(settings, timeout_s=20)
    assert len(read.events) == len(msgs) == len({e.event_id for e in read.events})
    assert sorted((e.tenant or "", e.conversation_id, e.message_id) for e in read.events) == sorted(
        (m.tenant or "", m.conversation_id, m.message_id) for m in msgs)
    assert all(not e.window_degraded for e in read.events)  # each conversation kept its own turns
    out = tmp_path / "events.jsonl"
    result = _cli(settings, "export", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(msgs) == len({e["event_id"] for e in lines})
