"""A merged adapter scores what the adapter scores (fp32), and is built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from model_store.base_models import ensure_embedded
from model_store.merging import merged_model_dir
from scoring.backends.base import ScoreRequest
from scoring.backends.hf import HFBackend


@pytest.mark.slow
def test_merged_weights_score_like_base_plus_adapter(lora_adapter: Path, tmp_path: Path) -> None:
    base = ensure_embedded(Settings().store.dir)
    merged = merged_model_dir(base, lora_adapter, tmp_path)
    assert merged_model_dir(base, lora_adapter, tmp_path) == merged  # cached: built once
    requests = [ScoreRequest("Speaker_0: I can't believe you did that! The emotion is", ("angry", "joyful", "sad"))]
    with_adapter = HFBackend(base, threads=1)
    with_adapter.add_adapter("a", lora_adapter)
    adapted = with_adapter.score([ScoreRequest(r.prompt, r.choices, "a") for r in requests])
    bare = with_adapter.score(requests)
    with_adapter.close()
    folded = HFBackend(merged, threads=1).score(requests)
    assert folded[0] == pytest.approx(adapted[0], abs=1e-4)
    assert max(abs(x - y) for x, y in zip(bare[0], adapted[0])) > 1e-3  # the adapter really changes the scores
