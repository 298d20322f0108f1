"""Prefix-tree packing computes what the rows alone compute, with each shared prefix once."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.labels import get_label_set
from core.settings import Settings
from model_store.packing import pack
from model_store.training import TrainConfig, Trainer, build_examples, schedule
from producer_sim.synthetic import synthetic_conversations
from scoring.prompts import PromptBuilder, WindowShape


def test_rows_sharing_a_prefix_share_its_nodes() -> None:
    packed = pack([[5, 6, 7], [5, 6, 8, 9], [5, 1], [4]], groups=["a", "a", "a", "b"])
    assert packed.input_ids.shape == (1, 7) and packed.nodes == 7  # 5,6,7,8,9,1 of "a", then 4 of "b"
    assert packed.paths[0][:2] == packed.paths[1][:2] == [0, 1] and packed.paths[2][0] == 0
    ids = packed.input_ids[0].tolist()
    assert [ids[n] for n in packed.paths[1]] == [5, 6, 8, 9] and ids[packed.paths[3][0]] == 4
    assert [packed.position_ids[0, n].item() for n in packed.paths[1]] == [0, 1, 2, 3]  # depth, not place
    assert packed.position_ids[0, packed.paths[3][0]].item() == 0  # a trie starts at position 0
    mask = packed.attention_mask[0, 0]
    nine = packed.paths[1][3]
    assert mask[nine].nonzero().flatten().tolist() == packed.paths[1]  # its own ancestors and itself only
    assert not mask[packed.paths[2][1], packed.paths[0][2]]  # never a sibling branch
    assert mask[packed.paths[3][0]].nonzero().flatten().tolist() == packed.paths[3]  # nor another trie


def test_tries_fill_sequences_of_at_most_the_width_and_padding_attends_to_itself() -> None:
    rows = [[1] * 5, [2] * 4, [3] * 3, [4] * 2, [5] * 9]
    packed = pack(rows, groups=range(5), width=8)
    assert packed.nodes == 23 and packed.input_ids.shape == (3, 9)  # [9], [5, 3], [4, 2, ...]: first-fit decreasing
    for row, g, path in zip(rows, packed.group_of, packed.paths):
        assert packed.input_ids[g, path].tolist() == row
    assert packed.attention_mask[:, 0].diagonal(dim1=-2, dim2=-1).all()  # no all-False row (NaN)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_each_row_alone(attention: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)
    model = LlamaForCausalLM(config).eval()
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 7, 7, 7, 7], [3, 3]]
    packed = pack(rows, groups=[0, 0, 0, 1])
    with torch.no_grad():
        together = model(input_ids=packed.input_ids, attention_mask=packed.mask_for(attention),
                         position_ids=packed.position_ids).logits
        for row, g, path in zip(rows, packed.group_of, packed.paths):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(together[g, path], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batching", ["blocks", "draws"])
def test_the_trainer_packed_and_padded_give_the_same_losses_and_gradients(tmp_path: Path, batching: str) -> None:
    """On the embedded model, a batch of one conversation's emotion and impact examples: the packed loss and its
    gradient equal the left-padded reference's (eval mode: no dropout to draw)."""
    from model_store.base_models import resolve_base

    settings = Settings()
    cfg = TrainConfig(name="p", dataset="jsonl", train_file="-", label_set="meld", speaker_steps=0, steps=2,
                      batch_size=6, batching=batching, threads=1, dtype="float32", window=4, hop=4)
    trainer = Trainer(cfg, resolve_base(cfg.base, settings.store.dir), tmp_path)
    builder = PromptBuilder(get_label_set("meld"), max_tokens=256, count_tokens=trainer.count_tokens,
                            window=WindowShape(4, 4))
    examples = build_examples(cfg, synthetic_conversations(2), builder, None)
    step = schedule(cfg, examples)[0]
    batch = [examples[t][i] for t, i in step]
    weights = [1.0 if t == "main" else 0.1 for t, _ in step]
    trainer.model.eval()
    results = []
    for packing in (True, False):
        trainer.cfg = replace(cfg, packing=packing)
        trainer.model.zero_grad()
        loss = trainer.batch_loss(batch, weights)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((trainer.example_losses(batch).detach(), loss.item(), grads))
    (per_a, loss_a, grads_a), (per_b, loss_b, grads_b) = results
    torch.testing.assert_close(per_a, per_b, rtol=1e-4, atol=1e-4)
    assert loss_a == pytest.approx(loss_b, rel=1e-4) and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:  # fp32 sums in another order (30 layers): a few entries differ by ~1e-5; a mask bug, by ~all
        scale = grads_b[name].abs().max().item()
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=2e-3 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")
    if batching == "blocks":  # what packing is for: the batch's shared history computed once
        rows, _ = trainer.rows(batch)
        assert pack(rows, [ex.block for ex in batch]).nodes < 0.7 * sum(len(r) for r in rows)
