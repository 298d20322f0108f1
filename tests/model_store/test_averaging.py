"""Averaging LoRA adapters: the updates' mean at the adapters' rank, refusals, and a real average of two trained
adapters through ``erc-stream models average``, calibrated again and published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from erc_stream.cli import main
from model_store.averaging import average_lora_weights, check_compatible

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = KEY_A.replace("lora_A", "lora_B")


def _state(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {KEY_A: a, KEY_B: b}


def test_the_mean_of_updates_in_one_subspace_is_exact_at_the_same_rank() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4, 32), torch.randn(24, 4)
    out = average_lora_weights([_state(a, b), _state(a, 3 * b)], [0.5, 0.5])
    assert out[KEY_A].shape == (4, 32) and out[KEY_B].shape == (24, 4) and out[KEY_A].dtype == torch.float32
    torch.testing.assert_close(out[KEY_B] @ out[KEY_A], 2 * b @ a, atol=1e-4, rtol=1e-4)


def test_the_mean_of_unrelated_updates_is_their_best_approximation_at_the_rank() -> None:
    torch.manual_seed(1)
    states = [_state(torch.randn(4, 32), torch.randn(24, 4)) for _ in range(2)]
    out = average_lora_weights(states, [0.25, 0.75])
    mean = 0.25 * states[0][KEY_B] @ states[0][KEY_A] + 0.75 * states[1][KEY_B] @ states[1][KEY_A]
    sing = torch.linalg.svdvals(mean.double())
    error = torch.linalg.matrix_norm((out[KEY_B] @ out[KEY_A] - mean).double())
    # Eckart–Young: the rank-4 truncation's error is the norm of the singular values it leaves out, and no less
    assert error == pytest.approx(float(sing[4:].square().sum().sqrt()), rel=1e-4)
    assert error < 0.5 * float(sing.square().sum().sqrt())  # a real part of the update survives


def _adapter(root: Path, name: str, meta: dict, lora: dict) -> Path:
    path = root / name
    path.mkdir()
    (path / "erc_meta.json").write_text(json.dumps(meta))
    (path / "adapter_config.json").write_text(json.dumps(lora))
    return path


def test_adapters_served_differently_are_refused_with_the_field_that_differs(tmp_path: Path) -> None:
    meta = {"base": "smollm2-135m", "label_set": "meld", "window": 12, "hop": 12, "config": {"seed": 0}}
    lora = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    one = _adapter(tmp_path, "one", meta, lora)
    same = _adapter(tmp_path, "same", meta, {**lora, "target_modules": ["v_proj", "q_proj"]})  # a set: same
    check_compatible([one, same])
    # another seed (data order, LoRA initialisation) that holds out the same utterances: a soup of equals
    check_compatible([one, _adapter(tmp_path, "reseeded", {**meta, "config": {"seed": 1, "holdout_seed": 2}}, lora)])
    for name, (m, lo), field in [
        ("labels", ({**meta, "label_set": "emorynlp"}, lora), "label_set"),
        ("rank", (meta, {**lora, "r": 8}), "r"),
        ("seed", ({**meta, "config": {"seed": 1}}, lora), "config.holdout_seed"),  # so another held-out draw
        ("draw", ({**meta, "config": {"seed": 0, "holdout_seed": 3}}, lora), "config.holdout_seed"),
    ]:
        with pytest.raises(ValueError, match=rf"differ in {field} "):
            check_compatible([one, _adapter(tmp_path, name, m, lo)])
    with pytest.raises(ValueError, match="at least two"):
        check_compatible([one])


@pytest.mark.slow
def test_models_average_publishes_a_calibrated_average_of_two_trained_adapters(
        two_runs: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scoring.hardware import auto_dtype

    store, short, long = two_runs
    monkeypatch.setenv("ERC_STORE__DIR", str(store))
    result = CliRunner().invoke(main, ["models", "average", "short", str(long), "--name", "soup"])
    assert result.exit_code == 0, result.output
    out = Path(result.output.split()[-1])
    assert out.parent == store / "adapters" / "soup"
    meta = json.loads((out / "erc_meta.json").read_text())
    assert meta["averaged"]["weights"] == [0.5, 0.5]
    assert [(a["name"], a["train"]["steps"]) for a in meta["averaged"]["adapters"]] == [("short", 2), ("long", 4)]
    # fitted again, on the runs' held-out six, in the dtype consumers serve in
    assert meta["calibration"]["n"] == 6 and meta["calibration"]["dtype"] == auto_dtype()  # model.dtype "auto"
    assert not {"train", "dev", "evals", "selected"} & meta.keys()  # the first run's records are not the average's

    from safetensors.torch import load_file

    states = [load_file(p / "adapter_model.safetensors") for p in (short, long, out)]
    key = next(k for k in states[0] if ".lora_A." in k)
    keyb = key.replace("lora_A", "lora_B")
    mean = sum(0.5 * s[keyb] @ s[key] for s in states[:2])
    assert not torch.allclose(states[0][keyb] @ states[0][key], states[1][keyb] @ states[1][key])
    assert torch.linalg.matrix_norm(states[2][keyb] @ states[2][key] - mean) < 0.1 * torch.linalg.matrix_norm(mean)

    relabelled = tmp_path / "relabelled"
    shutil.copytree(long, relabelled)
    meta = json.loads((relabelled / "erc_meta.json").read_text())
    (relabelled / "erc_meta.json").write_text(json.dumps({**meta, "label_set": "emorynlp"}))
    result = CliRunner().invoke(main, ["models", "average", "short", str(relabelled), "--name", "soup"])
    assert result.exit_code != 0 and "differ in label_set" in result.output
