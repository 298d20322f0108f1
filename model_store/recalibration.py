"""An existing adapter's label-prior correction fitted again (``erc-stream models calibrate``, and an average's
in ``model_store/averaging.py``): the held-out training utterances of its run drawn again from its metadata.

The correction is fitted where the adapter is served (``post_training.serving_dtype``); an adapter trained on
one machine and served on another, or in another dtype, can have its correction refitted there without training
again, as long as the training data is the same (``data_hash``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from core.labels import get_label_set
from model_store.post_training import calibrate

if TYPE_CHECKING:
    from model_store.examples import Target
    from model_store.training import TrainConfig


def held_out_config(meta: dict, name: str, data_dir: Path) -> TrainConfig:
    """The training config of the adapter whose ``erc_meta.json`` is ``meta``, renamed ``name``; a data file no
    longer where it trained is looked for under this machine's data directory (it may have trained elsewhere).
    Its held-out calibration draw (``split_targets``) is then the one the training left out, as long as the data
    is the same, which ``data_hash`` checks."""
    from dataclasses import fields

    from model_store.data import default_file
    from model_store.training import TrainConfig, sources_hash

    def here(dataset: str, path: str) -> str:  # the recorded file, or the dataset's under this data directory
        return path if Path(path).exists() else str(default_file(data_dir, dataset, "train"))

    known = {f.name for f in fields(TrainConfig)}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("config", {}).items() if k in known}
    config.update(name=name, train_file=here(config["dataset"], config["train_file"]),
                  more_sources=tuple((d, here(d, f)) for d, f in config.get("more_sources", ())))
    cfg = TrainConfig(**config)
    if cfg.calibration and sources_hash(cfg) != meta.get("data_hash"):
        raise ValueError(f"the training data under {data_dir} is not the data this adapter trained on "
                         f"(hash {sources_hash(cfg)} vs {meta.get('data_hash')}): its held-out calibration "
                         "utterances cannot be drawn again")
    return cfg


def held_out(cfg: TrainConfig) -> list[Target]:
    """The training utterances ``cfg``'s run held out for calibration."""
    from model_store.training import load_sources, split_targets

    return split_targets(cfg, load_sources(cfg), get_label_set(cfg.label_set))[1]


def recalibrate(source: Path, store_dir: Path, data_dir: Path, dtype: str) -> Path:
    """Fit ``source``'s (an adapter directory's) label-prior correction again, in ``dtype``, on the training
    utterances its run held out; publish the adapter with it as a new version of its name; that directory.

    The previous correction is kept in ``erc_meta.json`` (``calibration_before``). ``ValueError`` where the run
    held nothing out or its data is not under ``data_dir``."""
    from model_store.registry import adapter_version, publish

    meta = json.loads((source / "erc_meta.json").read_text())
    if not meta.get("config", {}).get("calibration"):
        raise ValueError(f"{source} was trained without held-out calibration utterances (calibration=0)")
    cfg = held_out_config(meta, meta["name"], data_dir)
    staging = store_dir / "adapters" / f".{cfg.name}.calibrating"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    before = meta.pop("calibration", None)
    (staging / "erc_meta.json").write_text(json.dumps(meta, indent=2))  # calibrate sees the raw scores
    meta["calibration"] = calibrate(cfg, store_dir, staging, held_out(cfg), dtype).as_dict()
    meta["calibration_before"] = {**(before or {}), "version": adapter_version(source)}
    (staging / "erc_meta.json").write_text(json.dumps(meta, indent=2))
    return publish(staging, store_dir, cfg.name)
