"""A trained adapter's label-prior correction fitted again (``erc-stream models calibrate``) in another dtype, on
the utterances its run held out, and published as a new version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from erc_stream.cli import main
from model_store.registry import adapter_version


@pytest.mark.slow
def test_models_calibrate_fits_the_correction_again_in_the_dtype_asked_for(
        two_runs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from scoring.hardware import auto_dtype

    store, short, _ = two_runs
    serving = auto_dtype()  # model.dtype "auto": what the training's own fit ran in
    other = "float32" if serving == "bfloat16" else "bfloat16"
    before = json.loads((short / "erc_meta.json").read_text())["calibration"]
    assert before["dtype"] == serving and before["n"] == 6  # fitted once, in the serving dtype
    monkeypatch.setenv("ERC_STORE__DIR", str(store))

    result = CliRunner().invoke(main, ["models", "calibrate", "short", "--dtype", other])
    assert result.exit_code == 0, result.output
    out = Path(result.output.split()[-1])
    assert out.parent == short.parent and out != short  # a new version of the adapter, the old one kept
    meta = json.loads((out / "erc_meta.json").read_text())
    assert meta["calibration"]["dtype"] == other and meta["calibration"]["n"] == 6
    assert meta["calibration"]["prior"] != before["prior"]  # scored by other weights
    assert meta["calibration_before"] == {**before, "version": adapter_version(short)}
    assert (out / "adapter_model.safetensors").read_bytes() == (short / "adapter_model.safetensors").read_bytes()

    # in the serving dtype the fit is the training's own again: the same correction, so the same version (the
    # correction is part of it), not a new one
    result = CliRunner().invoke(main, ["models", "calibrate", f"short@{adapter_version(short)}"])
    assert result.exit_code == 0, result.output
    assert Path(result.output.split()[-1]) == short


def test_models_calibrate_refuses_an_adapter_without_held_out_utterances(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = tmp_path / "plain"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "erc_meta.json").write_text(json.dumps({"name": "plain", "config": {"calibration": 0}}))
    monkeypatch.setenv("ERC_STORE__DIR", str(tmp_path / "store"))
    result = CliRunner().invoke(main, ["models", "calibrate", str(adapter)])
    assert result.exit_code != 0 and "without held-out calibration utterances" in result.output
