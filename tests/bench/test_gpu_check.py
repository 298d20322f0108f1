"""bench.gpu_check (the device script) runs here too: its CPU smoke mode, on a tiny model, checks pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_check


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_in_quick_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--dtypes", "float32", "--batches", "1,3", "--layers", "1",
                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    assert result["ok"] and result["checks"]["float32"]["ok"]
    assert result["checks"]["float32"]["padded_vs_alone_max_dp"] < 1e-4
    assert result["checks"]["float32"]["adapter_moves_max_dp"] > 1e-4
    assert [(r["batch"], r["adapter"]) for r in result["timings"]] == [(1, None), (1, "lora"), (3, None), (3, "lora")]
    assert "tokens/s" in printed and "gpu_check: OK" in printed
