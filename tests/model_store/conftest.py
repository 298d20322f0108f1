"""Fixtures of the model-store tests that train: trained once, shared by the modules that read them."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from model_store.base_models import ensure_embedded
from model_store.training import TrainConfig, train
from tests.model_store.test_training import _write_jsonl


@pytest.fixture(scope="package")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(store, short, long): two trained adapters of one recipe, 2 and 4 steps, six utterances held out."""
    root = tmp_path_factory.mktemp("runs")
    data = _write_jsonl(root / "train.jsonl", 4)
    store = root / "store"
    base = str(ensure_embedded(Settings().store.dir))  # a local HF directory: no conversion into this store
    cfg = TrainConfig(name="short", dataset="jsonl", train_file=str(data), label_set="meld", base=base,
                      speaker_steps=0, steps=2, batch_size=2, impact_per_batch=0, aux_weight=0.0, max_tokens=128,
                      demonstrations=False, calibration=6, threads=1)
    short = train(cfg, store_dir=store, progress=False, command="test")
    long = train(TrainConfig(**{**cfg.__dict__, "name": "long", "steps": 4}), store_dir=store, progress=False,
                 command="test")
    return store, short, long
