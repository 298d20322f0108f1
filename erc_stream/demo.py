"""The main job, end to end on real parts, with a live view and a closing summary.

``erc-stream demo`` brings the local broker and Redis up, starts ``erc-stream consume`` as a child
process (the same command production runs), replays a few MELD dev dialogues (or synthetic ones
when no data directory exists) with two malformed records and a scripted negative streak (five angry
turns: one ``negative_streak`` alert) mixed in, shows each emotion event as it arrives on
``chat.emotions``, then reads the consumer's metrics endpoint, stops the consumer with SIGTERM and
prints what came through, the alerts with their evidence and the metrics. Everything it reads back is
filtered by this run's id, so earlier runs on the same broker do not count.
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
from rich.markup import escape
from rich.table import Table

from core.records import Alert, DeadLetter, EmotionEvent
from core.settings import Settings
from local_services.supervisor import services_up
from producer_sim.replay import interleave, replay, to_messages
from producer_sim.sources import load_source, new_run_id
from producer_sim.synthetic import (
    CALL_CENTER_ID,
    NEGATIVE_STREAK_ID,
    call_center_messages,
    negative_streak_conversation,
)

#: The scripted support call's tenant: its negative-streak rule counts the customer's turns only.
CALL_CENTER_TENANT = "callcenter"

console = Console(stderr=False)


@dataclass
class _Seen:
    events: dict[str, EmotionEvent] = field(default_factory=dict)  # by event id (copies dropped)
    copies: int = 0
    dead: list[DeadLetter] = field(default_factory=list)
    alerts: dict[str, Alert] = field(default_factory=dict)  # by alert id (copies dropped)
    peak_lag: float = 0.0
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
    env = {**os.environ, "ERC_LOG_LEVEL": os.environ.get("ERC_LOG_LEVEL", "WARNING"), "ERC_LOG_JSON": "true",
           # Any free port unless one is configured: the demo prints the endpoint's URL.
           "ERC_METRICS__PORT": os.environ.get("ERC_METRICS__PORT", "0"),
           # The support call's tenant counts streaks over the customer's turns (a per-tenant override).
           "ERC_ALERTS__TENANTS": os.environ.get(
               "ERC_ALERTS__TENANTS", json.dumps({CALL_CENTER_TENANT: {"streak_roles": ["customer"]}}))}
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)


def _wait_for(ready: Path, proc: subprocess.Popen, log_path: Path, timeout_s: float = 30.0) -> str:
    """The dashboard's URL once it listens (or why not: it does not stop the demo)."""
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            return f"[yellow]did not start ({proc.returncode}); its log: {log_path}[/]"
        if time.monotonic() > deadline:
            return f"[yellow]not up after {timeout_s:.0f} s; its log: {log_path}[/]"
        time.sleep(0.2)
    return ready.read_text()


def _reader(settings: Settings) -> KafkaConsumer:
    k = settings.kafka
    reader = KafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **k.client_options())
    parts = [TopicPartition(t, p) for t in (k.output_topic, k.dlq_topic, k.alerts_topic)
             for p in sorted(reader.partitions_for_topic(t) or {0})]
    reader.assign(parts)
    reader.seek_to_beginning(*parts)
    return reader


def _table(seen: _Seen, expected: int, texts: dict[tuple[str, str], str]) -> Table:
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
                      texts.get((ev.conversation_id, ev.message_id), ""), f"[{mark}]{ev.label}[/]" if mark else ev.label,
                      f"{conf:.2f}", gold)
    return table


def _start_dashboard(settings: Settings, run_id: str, ready: Path, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "erc_stream", "dashboard", "--ready-file", str(ready)]
    env = {**os.environ, "ERC_LOG_LEVEL": os.environ.get("ERC_LOG_LEVEL", "WARNING"), "ERC_LOG_JSON": "true",
           "ERC_DASHBOARD__PORT": os.environ.get("ERC_DASHBOARD__PORT", "0"),
           # public corpus texts: shown unless configured otherwise; a group of its own per run
           "ERC_DASHBOARD__SHOW_TEXTS": os.environ.get("ERC_DASHBOARD__SHOW_TEXTS", "true"),
           "ERC_DASHBOARD__GROUP_ID": f"{settings.dashboard.group_id}-{run_id}"}
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)


def run_demo(settings: Settings, *, dialogues: int, synthetic: int | None, rate: float, timeout_s: float,
             dashboard: bool = True, keep_dashboard: bool = False) -> bool:
    console.rule("erc-stream demo")
    for s in services_up(settings):
        console.print(f"[bold]{s.name}[/] {s.address} ({'managed by erc-stream' if s.managed else 'external'}): {s.detail}")
    source = load_source(settings, dialogues=dialogues, synthetic=synthetic, fallback=True)
    console.print(("[yellow]" if source.synthetic else "") + source.description, soft_wrap=True)

    run_id = new_run_id("demo")
    # The scripted streak goes first: its alert shows up early in the run.
    per_conv = to_messages([negative_streak_conversation(), *source.conversations], run_id=run_id, tenant="demo")
    streak_id = per_conv[0][0].conversation_id
    # The support call: schema version 2, roles, no turn numbers, message ids "1", "2", ... of its own.
    call = call_center_messages(run_id, tenant=CALL_CENTER_TENANT)
    messages = list(interleave([per_conv[0], call, *per_conv[1:]], concurrency=4, seed=0))
    texts = {(m.conversation_id, m.message_id): m.text for m in messages}  # message ids repeat across calls
    bad = _malformed(run_id)

    workdir = Path(tempfile.mkdtemp(prefix="erc-demo-"))
    ready, log_path = workdir / "ready", workdir / "consumer.log"
    console.print(f"starting consumer (backend={settings.model.backend}); its log: {log_path}")
    proc = _start_consumer(settings, ready, log_path)
    board = _start_dashboard(settings, run_id, workdir / "dashboard-ready", workdir / "dashboard.log") \
        if dashboard else None
    try:
        while not ready.exists():
            if proc.poll() is not None:
                console.print(f"[red]consumer exited with {proc.returncode}:[/]\n{log_path.read_text()[-3000:]}")
                return False
            time.sleep(0.2)
        metrics_url = json.loads(ready.read_text()).get("metrics_url")
        console.print(f"consumer metrics: {metrics_url}/metrics (also /healthz, /readyz)" if metrics_url
                      else "consumer metrics: disabled (ERC_METRICS__ENABLED=false)")
        if board is not None:
            console.print(f"live dashboard: {_wait_for(workdir / 'dashboard-ready', board, workdir / 'dashboard.log')}",
                          soft_wrap=True)

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
        next_scrape = 0.0
        alerts_until: float | None = None  # alerts travel with their events: a short grace after the last one
        with Live(_table(seen, len(messages), texts), console=console, refresh_per_second=4,
                  transient=False, auto_refresh=console.is_terminal) as live:
            while time.monotonic() < deadline and (len(seen.events) < len(messages) or len(seen.dead) < len(bad)
                                                   or time.monotonic() < (alerts_until or deadline)):
                if len(seen.events) >= len(messages) and len(seen.dead) >= len(bad) and alerts_until is None:
                    alerts_until = time.monotonic() + 1.5
                if metrics_url and time.monotonic() >= next_scrape:
                    seen.peak_lag = max(seen.peak_lag, _total(_scrape(metrics_url), "erc_consumer_lag"))
                    next_scrape = time.monotonic() + 1.0
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
                            if ev.event_id in seen.events:
                                seen.copies += 1
                                continue
                            seen.events[ev.event_id] = ev
                            seen.first_at = seen.first_at or time.monotonic()
                            seen.last_at = time.monotonic()
                            if not console.is_terminal:
                                console.print(f"{ev.conversation_id.rsplit(':', 1)[-1]:>6} t{ev.turn:<3} "
                                              f"{ev.speaker[:10]:<10} {ev.label:<9} {ev.probabilities[ev.label]:.2f} "
                                              f"gold={ev.gold_label or '-':<8} {texts.get((ev.conversation_id, ev.message_id), '')[:60]}",
                                              no_wrap=True, overflow="ellipsis", soft_wrap=True)
                        elif tp.topic == settings.kafka.alerts_topic:
                            alert = Alert.from_bytes(r.value)
                            if any(e.conversation_id.startswith(run_id) for e in alert.evidence):
                                if alert.alert_id in seen.alerts:  # a redelivered copy, same id
                                    continue
                                seen.alerts[alert.alert_id] = alert
                                if not console.is_terminal:
                                    console.print(f"[bold red]ALERT[/] {alert.rule}: {escape(alert.summary)}",
                                                  soft_wrap=True)
                        else:
                            dl = DeadLetter.from_bytes(r.value)
                            if dl.key_b64 and base64.b64decode(dl.key_b64) in bad_keys:
                                seen.dead.append(dl)
                live.update(_table(seen, len(messages), texts), refresh=console.is_terminal)
        reader.close()
        samples = _scrape(metrics_url) if metrics_url else {}
        _summary(seen, len(messages) + len(bad), len(messages), time.monotonic() - started)
        _alerts(seen, streak_id, call[0].conversation_id, settings.model.backend)
        if metrics_url:
            _metrics_table(samples, metrics_url, seen.peak_lag)
        if board is not None and keep_dashboard and board.poll() is None:
            console.print(f"the dashboard stays up: {(workdir / 'dashboard-ready').read_text()} (Ctrl-C to stop)",
                          soft_wrap=True)
            try:
                board.wait()
            except KeyboardInterrupt:
                pass
        return len(seen.events) == len(messages)
    finally:
        if board is not None and board.poll() is None:
            board.send_signal(signal.SIGTERM)
            try:
                board.wait(timeout=15)
            except subprocess.TimeoutExpired:
                board.kill()
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


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The consumer's /metrics as {(sample name, sorted labels): value}; empty when it does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _by(samples, name: str, label: str) -> str:
    parts = [f"{dict(labels)[label]}={v:g}" for (n, labels), v in sorted(samples.items())
             if n == name and v and label in dict(labels)]
    return ", ".join(parts) or "0"


def _alerts(seen: _Seen, streak_id: str, call_id: str, backend: str) -> None:
    """Every alert of this run with its evidence, and whether the scripted streak raised exactly one."""
    table = Table(title=f"alerts  {len(seen.alerts)}", expand=True)
    for col in ("rule", "conversation / tenant", "evidence (message: label p)"):
        table.add_column(col, overflow="fold")
    for a in seen.alerts.values():
        evidence = "; ".join(f"{e.conversation_id.rsplit(':', 1)[-1]}:{e.message_id.rsplit(':', 1)[-1]} "
                             f"{e.label} {e.probability:.2f}" for e in a.evidence)
        table.add_row(a.rule, escape((a.conversation_id or "").rsplit(":", 1)[-1] or f"tenant {a.tenant}"),
                      escape(evidence))
    console.print(table)
    streak = [a for a in seen.alerts.values() if a.conversation_id == streak_id]
    rules = ", ".join(a.rule for a in streak) or "none"
    line = (f"scripted negative streak ({NEGATIVE_STREAK_ID}, 5 angry turns): {len(streak)} alert(s): {rules}"
            f" (expected exactly one negative_streak)")
    if backend == "null":
        line += " - the null backend labels every message alike, so no rule can fire"
    ok = len(streak) == 1 and streak[0].rule == "negative_streak"
    console.print(("[green]" if ok else "[yellow]") + escape(line), soft_wrap=True)
    call = [a for a in seen.alerts.values() if a.conversation_id == call_id]
    line = (f"scripted support call ({CALL_CENTER_ID}, 4 angry customer turns between calm agent replies, streaks "
            f"over the customer's turns): {len(call)} alert(s): {', '.join(a.rule for a in call) or 'none'} "
            f"(expected exactly one negative_streak)")
    ok = len(call) == 1 and call[0].rule == "negative_streak"
    console.print(("[green]" if ok else "[yellow]") + escape(line), soft_wrap=True)


def _metrics_table(samples, url: str, peak_lag: float) -> None:
    table = Table(title=f"metrics  {url}/metrics", show_header=False)
    table.add_row("erc_messages_consumed_total", f"{_total(samples, 'erc_messages_consumed_total'):g}")
    table.add_row("erc_events_emitted_total", f"{_total(samples, 'erc_events_emitted_total'):g}")
    table.add_row("erc_dead_letters_total", _by(samples, "erc_dead_letters_total", "reason"))
    table.add_row("erc_alerts_emitted_total", _by(samples, "erc_alerts_emitted_total", "rule"))
    for name, unit in (("erc_stream_batch_records", ""), ("erc_inference_seconds", " s"),
                       ("erc_end_to_end_latency_seconds", " s")):
        count, total = _total(samples, f"{name}_count"), _total(samples, f"{name}_sum")
        table.add_row(name, f"count {count:g}, mean {total / count:.3g}{unit}" if count else "count 0")
    table.add_row("erc_consumer_lag", f"now {_total(samples, 'erc_consumer_lag'):g} over "
                  f"{sum(1 for (n, _) in samples if n == 'erc_consumer_lag')} partitions, peak seen {peak_lag:g}")
    info = next((dict(labels) for (n, labels), v in samples.items() if n == "erc_adapter_info" and v), {})
    table.add_row("erc_adapter_info", ", ".join(f"{k}={v}" for k, v in sorted(info.items())))
    table.add_row("erc_redis_errors_total", _by(samples, "erc_redis_errors_total", "operation"))
    table.add_row("erc_broker_errors_total", f"{_total(samples, 'erc_broker_errors_total'):g}")
    console.print(table)
