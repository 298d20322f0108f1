"""Averaging LoRA adapters of one task into one: a uniform "model soup" (Wortsman et al., 2022).

Two runs of the same recipe that differ in length (the 2-epoch and the 3-epoch MELD runs) end in different
places of one basin; the mean of their weight updates scored higher on MELD dev than either (docs/model_store.md,
"The shipped MELD adapter on the dev split"). LoRA's update of a weight is ``scale * B @ A``, and averaging
``A`` and ``B`` separately is not the average of the updates, so each module's updates are averaged as
matrices and factored back by SVD into the adapters' rank: the closest rank-r update (Eckart–Young), so the
average serves at the same cost, and under the same ``vllm.max_lora_rank``, as its inputs.

Only adapters that a consumer serves identically may be averaged: the same base, label set, prompt layout and
LoRA shape. The averaged adapter's label-prior correction is fitted again (``post_training.calibrate``, in
the serving dtype) on the held-out training utterances its inputs share, which is why their data and held-out
draw must match too.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Sequence

#: ``erc_meta.json`` fields (and ``config`` keys) in which averaged adapters must agree: what they serve
#: (base, labels, prompt) and what their held-out calibration draw depends on.
MUST_MATCH = ("base", "label_set", "window", "hop", "max_tokens", "demonstrations", "demo_position", "layout", "data_hash")
CONFIG_MUST_MATCH = ("holdout_seed", "calibration", "mix", "fraction", "limit")  # holdout_seed: the draw's
#: ``adapter_config.json`` fields that fix the adapter's shape and scale.
LORA_MUST_MATCH = ("r", "lora_alpha", "target_modules", "peft_type")


def _read(path: Path, name: str) -> dict:
    return json.loads((path / name).read_text())


def check_compatible(sources: Sequence[Path]) -> None:
    """Raise ``ValueError`` naming the first field in which the adapters differ."""
    if len(sources) < 2:
        raise ValueError("averaging needs at least two adapters")
    from model_store.training import held_out_seed

    def config(meta: dict) -> dict:  # the seed of the held-out draw as the run used it (seed + 2 by default)
        return {**meta.get("config", {}), "holdout_seed": held_out_seed(meta.get("config", {}))}

    first_meta, first_lora = _read(sources[0], "erc_meta.json"), _read(sources[0], "adapter_config.json")
    for src in sources[1:]:
        meta, lora = _read(src, "erc_meta.json"), _read(src, "adapter_config.json")
        pairs = ([(k, first_meta.get(k), meta.get(k)) for k in MUST_MATCH]
                 + [(f"config.{k}", config(first_meta).get(k), config(meta).get(k)) for k in CONFIG_MUST_MATCH]
                 + [(k, first_lora.get(k), lora.get(k)) for k in LORA_MUST_MATCH])
        for key, a, b in pairs:
            if (sorted(a) if isinstance(a, list) else a) != (sorted(b) if isinstance(b, list) else b):
                raise ValueError(f"{sources[0]} and {src} differ in {key} ({a!r} vs {b!r}): "
                                 "only adapters served with one base, label set and prompt can be averaged")


def average_lora_weights(states: Sequence[dict], weights: Sequence[float]) -> dict:
    """The weighted mean of the adapters' per-module updates ``B @ A``, factored back to their rank.

    ``states``: the adapters' safetensors dicts (``...lora_A.weight`` (r x in), ``...lora_B.weight`` (out x r)).
    The rank-r factors split the singular values evenly (``B = U sqrt(S)``, ``A = sqrt(S) V^T``); flipping a
    singular vector pair's sign is exact in floating point, so the fixed signs change no score.
    """
    import torch

    out = {}
    for key_a in states[0]:
        if ".lora_A." not in key_a:
            continue
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        rank = states[0][key_a].shape[0]
        delta = sum(w * (s[key_b].double() @ s[key_a].double()) for s, w in zip(states, weights))
        u, sing, vh = torch.linalg.svd(delta, full_matrices=False)
        # SVD's singular vectors have arbitrary signs (they flip between LAPACK builds); fix them, so that one
        # average is one file (and one store version): each column of U has its largest entry positive
        sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
        u, vh = u * sign, vh * sign.T
        root = sing[:rank].sqrt()
        dtype = states[0][key_a].dtype
        out[key_b] = (u[:, :rank] * root).to(dtype).contiguous()
        out[key_a] = (root[:, None] * vh[:rank]).to(dtype).contiguous()
    return out


def average_adapters(sources: Sequence[Path], name: str, store_dir: Path, data_dir: Path,
                     weights: Sequence[float] | None = None) -> Path:
    """Average ``sources`` (adapter directories), calibrate the result, publish it as a new version of ``name``;
    its directory. ``weights`` default to uniform and are normalised to sum to 1; ``data_dir`` holds the
    training data the adapters trained on (``Settings().data.dir``)."""
    from safetensors.torch import load_file, save_file

    from model_store.post_training import calibrate, serving_dtype
    from model_store.recalibration import held_out, held_out_config
    from model_store.registry import adapter_version, publish

    check_compatible(sources)
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError("one non-negative weight per adapter, not all zero")
    weights = [w / sum(weights) for w in weights]

    staging = store_dir / "adapters" / f".{name}.averaging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    states = [load_file(src / "adapter_model.safetensors") for src in sources]
    save_file(average_lora_weights(states, weights), staging / "adapter_model.safetensors")
    shutil.copy(sources[0] / "adapter_config.json", staging)
    metas = [_read(src, "erc_meta.json") for src in sources]
    meta = dict(metas[0])
    for key in ("calibration", "selected", "train", "command", "dev", "evals"):  # the first run's, not the average's
        meta.pop(key, None)
    meta.update(name=name, created=datetime.now(UTC).isoformat(timespec="seconds"), averaged={
        "adapters": [{"name": m.get("name"), "version": adapter_version(src), "train": m.get("train")}
                     for src, m in zip(sources, metas)],
        "weights": weights})
    (staging / "erc_meta.json").write_text(json.dumps(meta, indent=2))  # no correction yet: calibrate sees raw scores

    cfg = held_out_config(meta, name, data_dir)
    if cfg.calibration:
        meta["calibration"] = calibrate(cfg, store_dir, staging, held_out(cfg), serving_dtype()).as_dict()
        (staging / "erc_meta.json").write_text(json.dumps(meta, indent=2))
    return publish(staging, store_dir, name)
