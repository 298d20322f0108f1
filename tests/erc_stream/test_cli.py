"""The console command: its subcommands, and the main job (demo) end to end on the test broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import matplotlib.image as mpimg
import pytest
from click.testing import CliRunner

from core.readers import read_alerts, read_events
from core.settings import Settings
from erc_stream.cli import main
from erc_stream.export import read_dataset
from producer_sim.synthetic import call_center_messages, synthetic_conversations
from tests.procs import service_env


def test_help_lists_the_subcommands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("services", "simulate", "consume", "demo", "models", "export", "report", "config"):
        assert f"  {name} " in result.output


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **service_env(settings), "ERC_SERVICES__RUN_DIR": str(settings.services.run_dir),
            "COLUMNS": "200"}


def _metric(out: str, name: str) -> str:
    """The value cell of a row of the demo's metrics table."""
    match = re.search(rf"{name}\s*│\s*([^│]+?)\s*│", out)
    assert match, f"{name} not in the metrics table:\n{out[-3000:]}"
    return match.group(1)


def _demo(settings: Settings, tmp_path, *args: str, **env: str) -> str:
    env = {**_env(settings), "ERC_DATA__DIR": str(tmp_path / "no-data"), **env}  # forces the synthetic fallback
    proc = subprocess.run([sys.executable, "-m", "erc_stream", "demo", *args], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_runs_end_to_end_and_prints_the_summary(settings: Settings, tmp_path) -> None:
    out = _demo(settings, tmp_path, "--backend", "null", "--dialogues", "3", "--rate", "40", "--timeout", "120")
    assert "falling back to 3 built-in synthetic conversations" in out
    assert "summary" in out and "events out" in out and "latency p50 / p95" in out and "weighted F1" in out
    # Two malformed records are part of the demo: both must be dead-lettered with a reason.
    assert "invalid_json" in out and "schema" in out

    # The metrics endpoint, read by the demo before it stops the consumer: the stream's figures, non-zero.
    # + the scripted streak and the scripted support call
    valid = sum(len(c.utterances) for c in synthetic_conversations(3, seed=0)) + 5 + len(call_center_messages("x", tenant=None))
    assert re.search(r"consumer metrics: http://127\.0\.0\.1:\d+/metrics", out)
    assert _metric(out, "erc_messages_consumed_total") == str(valid + 2)
    assert _metric(out, "erc_events_emitted_total") == str(valid)
    assert _metric(out, "erc_dead_letters_total") == "invalid_json=1, schema=1"
    for name in ("erc_stream_batch_records", "erc_inference_seconds", "erc_end_to_end_latency_seconds"):
        count, mean = re.fullmatch(r"count (\d+), mean ([\d.e-]+)( s)?", _metric(out, name)).group(1, 2)
        assert int(count) > 0 and float(mean) > 0, name
    assert re.fullmatch(r"now 0 over 4 partitions, peak seen \d+", _metric(out, "erc_consumer_lag"))
    assert _metric(out, "erc_adapter_info") == "adapter=none, backend=NullBackend, label_set=meld, model=null, version=none"
    assert "the null backend labels every message alike" in out

    # export, then report, on this run: a Parquet dataset and charts, checked by their contents.
    events = read_events(settings, timeout_s=20).events
    assert len(events) == valid
    env = {**_env(settings), "ERC_EXPORT__GROUP_ID": f"{settings.kafka.group_id}-export"}
    dataset, charts = tmp_path / "dataset", tmp_path / "charts"
    for cmd in (["export", "--format", "parquet", "--out", str(dataset)],
                ["report", "--input", str(dataset), "--out", str(charts)]):
        proc = subprocess.run([sys.executable, "-m", "erc_stream", *cmd], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    table = read_dataset(dataset)
    assert sorted(table.column("event_id").to_pylist()) == sorted(e.event_id for e in events)
    assert set(table.column("tenant").to_pylist()) == {"demo", "callcenter"}  # + the support call's tenant
    assert {p.parent.name for p in dataset.rglob("part-*.parquet")} == {"tenant=demo", "tenant=callcenter"}
    assert Counter(table.column("label").to_pylist()) == Counter(e.label for e in events)
    summary = json.loads((charts / "summary.json").read_text())
    assert summary["events"] == valid and summary["conversations"] == 5  # 3 synthetic, the streak, the call
    assert summary["confusion"]["n"] == valid  # the synthetic conversations carry gold labels
    pngs = sorted(p.name for p in charts.glob("*.png"))
    assert len(pngs) == 6 and "confusion_matrix.png" in pngs and "emotion_distribution.png" in pngs
    for name in pngs:
        image = mpimg.imread(charts / name)
        assert image.shape[0] > 200 and image.shape[1] > 400 and float(image[..., :3].std()) > 0.01
    html = (charts / "report.html").read_text()
    assert html.count('<img alt=') == 6 and f'<span id="events">{valid}</span>' in html


@pytest.mark.slow
def test_the_demo_on_the_real_model_raises_one_alert_for_the_scripted_streak(settings: Settings, tmp_path) -> None:
    out = _demo(settings, tmp_path, "--backend", "hf", "--dialogues", "2", "--rate", "20", "--timeout", "300",
                ERC_MODEL__THREADS="1")
    assert "scripted negative streak (negative-streak, 5 angry turns): 1 alert(s): negative_streak (expected" in out, \
        out[-4000:]
    alerts, _ = read_alerts(settings, timeout_s=20)
    streak = [a for a in alerts if (a.conversation_id or "").endswith(":negative-streak")]
    assert len(streak) == 1, [a.summary for a in alerts]
    alert = streak[0]
    assert alert.rule == "negative_streak" and alert.metrics["streak_length"] == 3
    assert [e.message_id.rsplit(":", 1)[-1] for e in alert.evidence] == ["0", "1", "2"]
    assert all(e.label in ("angry", "disgust", "fear", "sad") and e.probability > 0.2 for e in alert.evidence)
    assert all(abs(sum(e.probabilities.values()) - 1) < 1e-2 for e in alert.evidence)
    assert alert.trigger_message_id == alert.evidence[-1].message_id and alert.model == "smollm2-135m"
    # The support call (version 2, roles, no turns, ids "1".."7"): the customer's streak across the agent's
    # calm replies raises exactly one alert, its evidence the customer's turns only.
    call = [a for a in alerts if (a.conversation_id or "").endswith(":support-call")]
    assert [a.rule for a in call] == ["negative_streak"], [a.summary for a in alerts]
    assert [e.speaker for e in call[0].evidence] == ["Dana"] * 3 and call[0].tenant == "callcenter"
    assert int(_metric(out, "erc_events_emitted_total")) > 0
    assert "negative_streak=" in _metric(out, "erc_alerts_emitted_total")
