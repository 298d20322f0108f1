"""The main job, end to end on real parts, with a live view and a closing summary.

``erc-stream demo`` brings the local broker and Redis up, starts ``erc-stream consume`` as a child
process (the same command production runs), replays a few MELD dev dialogues (or synthetic ones
when no data directory exists) with two malformed records mixed in, shows each emotion event as it
arrives on ``chat.emotions``, then stops the consumer with SIGTERM and prints what came through.
Everything it reads back is filtered by this run's id, so earlier runs on the same broker do not
count.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from rich.console import Console
from rich.live import Live
from rich.table import Table

from erc_stream.schemas import DeadLetter, EmotionEvent
from erc_stream.services import services_up
from erc_stream.settings import Settings
from producer_sim.replay import interleave, replay, to_messages
from producer_sim.sources import load_source, new_run_id

console = Console(stderr=False)


@dataclass
class _Seen:
    events: dict[str, EmotionEvent] = field(default_factory=dict)  # by message id (copies dropped)
    copies: int = 0
    dead: list[DeadLetter] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None


def _malformed(run_id: str) -> list[tuple[bytes, bytes]]:
    """Two bad records, keyed with the run id so the summary can find their dead letters."""
    key = f"{run_id}:malformed".encode()
    return [
        (key, b'{"message_id": "oops", "conversation_id": '),  # truncated JSON
        (key, json.dumps({"message_id": f"{run_id}:bad", "conversation_id": f"{run_id}:bad",
                          "turn": -1, "speaker": "x", "text": "no timestamp"}).encode()),
    ]


def _start_consumer(settings: Settings, ready: Path, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "erc_stream", "consume", "--ready-file", str(ready),
           "--backend", settings.model.backend]
    env = {**os.environ, "ERC_LOG_LEVEL": os.environ.get("ERC_LOG_LEVEL", "WARNING")}
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)


def _reader(settings: Settings) -> KafkaConsumer:
    k = settings.kafka
    reader = KafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **k.client_options())
    parts = [TopicPartition(t, p) for t in (k.output_topic, k.dlq_topic)
             for p in sorted(reader.partitions_for_topic(t) or {0})]
    reader.assign(parts)
    reader.seek_to_beginning(*parts)
    return reader


def _table(seen: _Seen, expected: int, texts: dict[str, str]) -> Table:
    table = Table(title=f"emotion events  {len(seen.events)}/{expected}   dead letters {len(seen.dead)}",
                  expand=True)
    for col, kw in (("conversation", {"max_width": 14}), ("turn", {"justify": "right"}), ("speaker", {"max_width": 12}),
                    ("text", {"ratio": 1, "overflow": "ellipsis", "no_wrap": True}), ("emotion", {}),
                    ("conf", {"justify": "right"}), ("gold", {})):
        table.add_column(col, **kw)
    for ev in list(seen.events.values())[-15:]:
        conf = ev.probabilities[ev.label]
        gold = ev.gold_label or ""
        mark = "green" if gold == ev.label else "red" if gold else ""
        table.add_row(ev.conversation_id.rsplit(":", 1)[-1], str(ev.turn), ev.speaker[:12],
                      texts.get(ev.message_id, ""), f"[{mark}]{ev.label}[/]" if mark else ev.label,
                      f"{conf:.2f}", gold)
    return table


def run_demo(settings: Settings, *, dialogues: int, synthetic: int | None, rate: float, timeout_s: float) -> bool:
    console.rule("erc-stream demo")
    for s in services_up(settings):
        console.print(f"[bold]{s.name}[/] {s.address} ({'managed by erc-stream' if s.managed else 'external'}): {s.detail}")
    source = load_source(settings, dialogues=dialogues, synthetic=synthetic, fallback=True)
    console.print(("[yellow]" if source.synthetic else "") + source.description, soft_wrap=True)

    run_id = new_run_id("demo")
    per_conv = to_messages(source.conversations, run_id=run_id, tenant="demo")
    messages = list(interleave(per_conv, concurrency=4, seed=0))
    texts = {m.message_id: m.text for m in messages}
    bad = _malformed(run_id)

    workdir = Path(tempfile.mkdtemp(prefix="erc-demo-"))
    ready, log_path = workdir / "ready", workdir / "consumer.log"
    console.print(f"starting consumer (backend={settings.model.backend}); its log: {log_path}")
    proc = _start_consumer(settings, ready, log_path)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                console.print(f"[red]consumer exited with {proc.returncode}:[/]\n{log_path.read_text()[-3000:]}")
                return False
            time.sleep(0.2)

        producer_errors: list[BaseException] = []

        def produce() -> None:
            try:
                p = KafkaProducer(**settings.kafka.client_options(), acks="all")
                for key, value in bad:
                    p.send(settings.kafka.input_topic, key=key, value=value)
                p.flush()
                p.close()
                replay(settings, iter(messages), rate=rate, total=len(messages), progress=False)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                producer_errors.append(e)

        started = time.monotonic()
        threading.Thread(target=produce, daemon=True).start()
        seen = _Seen()
        reader = _reader(settings)
        deadline = started + timeout_s
        bad_keys = {k for k, _ in bad}
        with Live(_table(seen, len(messages), texts), console=console, refresh_per_second=4,
                  transient=False, auto_refresh=console.is_terminal) as live:
            while time.monotonic() < deadline and (len(seen.events) < len(messages) or len(seen.dead) < len(bad)):
                if producer_errors:
                    raise producer_errors[0]
                if proc.poll() is not None:
                    console.print(f"[red]consumer died ({proc.returncode}); log tail:[/]\n{log_path.read_text()[-3000:]}")
                    return False
                for tp, records in reader.poll(timeout_ms=500).items():
                    for r in records:
                        if tp.topic == settings.kafka.output_topic:
                            ev = EmotionEvent.from_bytes(r.value)
                            if not ev.conversation_id.startswith(run_id):
                                continue
                            if ev.message_id in seen.events:
                                seen.copies += 1
                                continue
                            seen.events[ev.message_id] = ev
                            seen.first_at = seen.first_at or time.monotonic()
                            seen.last_at = time.monotonic()
                            if not console.is_terminal:
                                console.print(f"{ev.conversation_id.rsplit(':', 1)[-1]:>6} t{ev.turn:<3} "
                                              f"{ev.speaker[:10]:<10} {ev.label:<9} {ev.probabilities[ev.label]:.2f} "
                                              f"gold={ev.gold_label or '-':<8} {texts.get(ev.message_id, '')[:60]}",
                                              no_wrap=True, overflow="ellipsis", soft_wrap=True)
                        else:
                            dl = DeadLetter.from_bytes(r.value)
                            if dl.key_b64 and base64.b64decode(dl.key_b64) in bad_keys:
                                seen.dead.append(dl)
                live.update(_table(seen, len(messages), texts), refresh=console.is_terminal)
        reader.close()
        _summary(seen, len(messages) + len(bad), len(messages), time.monotonic() - started)
        return len(seen.events) == len(messages)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        console.print("services keep running; stop them with `erc-stream services down`")


def _summary(seen: _Seen, sent: int, expected: int, seconds: float) -> None:
    from sklearn.metrics import accuracy_score, f1_score

    events = list(seen.events.values())
    lat = sorted(e.latency_ms for e in events)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    span = (seen.last_at - seen.first_at) if seen.first_at and seen.last_at and seen.last_at > seen.first_at else seconds
    gold = [(e.gold_label, e.label) for e in events if e.gold_label]
    table = Table(title="summary", show_header=False)
    table.add_row("messages in", f"{sent} ({expected} valid, {sent - expected} malformed)")
    table.add_row("events out", f"{len(events)} (+{seen.copies} redelivered copies)")
    table.add_row("dead letters", ", ".join(f"{d.error_type}: {d.reason[:60]}" for d in seen.dead) or "0")
    table.add_row("throughput", f"{len(events) / span:.2f} events/s over {span:.1f}s" if events else "-")
    table.add_row("latency p50 / p95", f"{pct(0.5):.0f} ms / {pct(0.95):.0f} ms")
    if gold:
        y, p = zip(*gold)
        table.add_row("weighted F1", f"{100 * f1_score(y, p, average='weighted', zero_division=0):.1f} "
                                     f"(accuracy {100 * accuracy_score(y, p):.1f}, n={len(gold)})")
    console.print(table)
