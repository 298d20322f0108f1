"""The console command: its subcommands, and the main job (demo) end to end on the test broker."""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from erc_stream.cli import main
from erc_stream.settings import Settings


def test_help_lists_the_subcommands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("services", "simulate", "consume", "demo", "models"):
        assert f"  {name} " in result.output


def _env(settings: Settings) -> dict[str, str]:
    k = settings.kafka
    return {
        **os.environ,
        "ERC_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "ERC_KAFKA__INPUT_TOPIC": k.input_topic,
        "ERC_KAFKA__OUTPUT_TOPIC": k.output_topic,
        "ERC_KAFKA__DLQ_TOPIC": k.dlq_topic,
        "ERC_KAFKA__ALERTS_TOPIC": k.alerts_topic,
        "ERC_METRICS__PORT": "0",
        "ERC_KAFKA__GROUP_ID": k.group_id,
        "ERC_REDIS__URL": settings.redis.url.get_secret_value(),
        "ERC_REDIS__KEY_PREFIX": settings.redis.key_prefix,
        "ERC_SERVICES__RUN_DIR": str(settings.services.run_dir),
        "COLUMNS": "200",
    }


def test_demo_runs_end_to_end_and_prints_the_summary(settings: Settings, tmp_path) -> None:
    env = {**_env(settings), "ERC_DATA__DIR": str(tmp_path / "no-data")}  # forces the synthetic fallback
    proc = subprocess.run(
        [sys.executable, "-m", "erc_stream", "demo", "--backend", "null", "--dialogues", "3", "--rate", "40",
         "--timeout", "120"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "falling back to 3 built-in synthetic conversations" in out
    assert "summary" in out and "events out" in out and "latency p50 / p95" in out and "weighted F1" in out
    # Two malformed records are part of the demo: both must be dead-lettered with a reason.
    assert "invalid_json" in out and "schema" in out
