"""Training on several datasets under the unified label set: sources, ratio vs total mixing, full fine-tuning."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from core.labels import get_label_set
from core.settings import Settings
from model_store.training import TrainConfig, load_sources, split_targets, train, with_epochs
from tests.datasets import write_data_dir


def _cfg(data: Path, **kw) -> TrainConfig:
    kw.setdefault("name", "mix")
    return TrainConfig(dataset="meld", train_file=str(data / "meld" / "train_sent_emo.csv"),
                       more_sources=(("emorynlp", str(data / "emorynlp" / "emorynlp_train_final.csv")),),
                       label_set="unified", demonstrations=False, **kw)


def test_sources_keep_their_dataset_and_distinct_ids(tmp_path: Path) -> None:
    data = write_data_dir(tmp_path, conversations=3)
    convs = load_sources(_cfg(data))
    assert Counter(c.dataset for c in convs) == {"meld": 3, "emorynlp": 3}
    assert len({c.conversation_id for c in convs}) == 6
    assert all(c.conversation_id.startswith(c.dataset + "/") for c in convs)
    # gold labels map through each dataset's own table: MELD's surprise and EmoryNLP's Powerful are both powerful
    ts, _ = split_targets(_cfg(data), convs, get_label_set("unified"))
    labels = {(t.conversation.dataset, t.label) for t in ts}
    assert ("meld", "powerful") in labels and ("emorynlp", "powerful") in labels and ("emorynlp", "mad") in labels


def test_ratio_mix_keeps_each_datasets_share_and_total_mix_pools(tmp_path: Path) -> None:
    data = write_data_dir(tmp_path, conversations=12)
    convs = load_sources(_cfg(data))
    unified = get_label_set("unified")
    per_dataset = Counter(t.conversation.dataset for t in split_targets(_cfg(data), convs, unified)[0])
    ratio = [t.conversation.dataset for t in split_targets(_cfg(data, mix="ratio", fraction=0.25), convs, unified)[0]]
    # ratio: exactly the fraction of each dataset
    assert Counter(ratio) == {d: round(n * 0.25) for d, n in per_dataset.items()}
    totals = [Counter(t.conversation.dataset for t in split_targets(_cfg(data, mix="total", fraction=0.25, seed=s),
                                                                    convs, unified)[0]) for s in range(8)]
    assert all(sum(c.values()) == round(sum(per_dataset.values()) * 0.25) for c in totals)
    # total: the shares move with the draw (some seed gives an uneven split)
    assert any(c["meld"] != c["emorynlp"] for c in totals)
    # deterministic by seed
    again = [t.conversation.dataset for t in split_targets(_cfg(data, mix="ratio", fraction=0.25), convs, unified)[0]]
    assert again == ratio


def test_the_held_out_draw_follows_its_own_seed(tmp_path: Path) -> None:
    data = write_data_dir(tmp_path, conversations=6)
    convs = load_sources(_cfg(data))
    unified = get_label_set("unified")

    def held(**kw) -> list[tuple[str, int]]:
        _, out = split_targets(_cfg(data, calibration=10, **kw), convs, unified)
        return [(t.conversation.conversation_id, t.index) for t in out]

    assert len(held()) == 10 and held() != held(seed=1)  # by default the draw moves with the seed
    assert held(seed=1, holdout_seed=2) == held()  # seed 0's draw (0 + 2) under another seed
    assert held(holdout_seed=5) == held(seed=3) != held()


def test_epochs_size_the_main_stage(tmp_path: Path) -> None:
    data = write_data_dir(tmp_path, conversations=4)
    cfg = with_epochs(_cfg(data, fraction=0.5, batch_size=4), 2.0)
    n = len(split_targets(cfg, load_sources(cfg), get_label_set("unified"))[0])
    assert cfg.impact_per_batch == 2 and cfg.aux_weight > 0
    assert cfg.steps == -(-2 * n // 2)  # a batch of draws holds 4 - 2 impact = 2 main examples
    blocks = with_epochs(_cfg(data, fraction=0.5, batch_size=4, batching="blocks"), 2.0)
    assert blocks.steps == -(-2 * n // 4)  # a batch of blocks holds batch_size main examples


@pytest.mark.slow
def test_full_fine_tuning_writes_a_whole_model_served_as_a_base(tmp_path: Path) -> None:
    from model_store.base_models import resolve_base

    data = write_data_dir(tmp_path / "data", conversations=2)
    cfg = _cfg(data, full=True, speaker_steps=0, steps=1, batch_size=2, impact_per_batch=0, max_tokens=96,
               lr=5e-5, threads=1, name="full-tiny")
    out = train(cfg, store_dir=Settings().store.dir, out_dir=tmp_path / "full-tiny", progress=False)
    meta = json.loads((out / "erc_meta.json").read_text())
    assert meta["kind"] == "full" and meta["datasets"] == ["meld", "emorynlp"] and meta["label_set"] == "unified"
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()
    assert resolve_base(str(out), tmp_path) == out
    with pytest.raises(ValueError, match="calibration"):
        train(_cfg(data, full=True, calibration=4), store_dir=Settings().store.dir, out_dir=tmp_path / "x")
