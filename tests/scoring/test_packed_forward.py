"""The packed forward (scoring/backends/packed.py) against the model's own padded forward, on the embedded SmolLM2."""

from __future__ import annotations

import pytest
import torch

from core.labels import get_label_set
from scoring.backends.base import ScoreRequest
from scoring.backends.hf import token_chunks
from scoring.backends.packed import PackedRow, packed_forward, supports
from scoring.prompts import PromptBuilder
from tests.conftest import _embedded_hf_backend
from tests.scoring.test_hf_backend import CONVERSATION, _assert_close

pytestmark = pytest.mark.slow


def _stream_requests(backend, label_set: str = "meld", adapter: str | None = None) -> list[ScoreRequest]:
    """A conversation turn by turn in the stream layout: each prompt is the previous one plus one line."""
    builder = PromptBuilder(get_label_set(label_set), count_tokens=backend.count_tokens, layout="stream")
    return [ScoreRequest(p.text, p.choices, adapter)
            for p in (builder.emotion(CONVERSATION[: i + 1]) for i in range(len(CONVERSATION)))]


def test_rows_with_and_without_pasts_match_each_row_alone(hf_backend) -> None:
    """Three rows in one packed sequence: a whole prompt, one continuing a past of 40 tokens by 9, one by 1."""
    model = hf_backend.model
    ids = hf_backend.encode_prompts([r.prompt for r in _stream_requests(hf_backend)])
    with torch.inference_mode():
        past = model(input_ids=torch.tensor([ids[3][:40]]), use_cache=True).past_key_values
        kv = [(layer.keys[0], layer.values[0]) for layer in past.layers]
        got, kv_out = packed_forward(model, [PackedRow(ids[1]), PackedRow(ids[3][40:49], 40, kv),
                                             PackedRow(ids[3][40:41], 40, kv)])
        for row, want_ids in zip(got, [ids[1], ids[3][:49], ids[3][:41]]):
            want = model(input_ids=torch.tensor([want_ids]), logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
            assert torch.allclose(row, want, atol=2e-4), (row - want).abs().max()
        full = model(input_ids=torch.tensor([ids[3][:49]]), use_cache=True).past_key_values
    assert len(kv_out[1]) == model.config.num_hidden_layers
    assert kv_out[1][0][0].shape == full.layers[0].keys[0].shape  # the row's whole KV, past and new
    assert torch.allclose(kv_out[1][5][1], full.layers[5].values[0], atol=1e-4)


def test_packed_and_padded_backends_score_a_stream_alike_and_packed_computes_no_padding() -> None:
    """The same stream in micro-batches of two conversations' turns through both forwards, prefix cache on: the
    same distributions; the packed one computes exactly the tokens after each prompt's cached prefix."""
    with _embedded_hf_backend(prefix_cache_mb=64) as packed, \
            _embedded_hf_backend(prefix_cache_mb=64, packed=False) as padded:
        assert packed.packed and not padded.packed
        meld, emory = _stream_requests(packed), _stream_requests(packed, "emorynlp")
        batches = [[meld[0], emory[0]], [meld[1], emory[1], meld[2]], [emory[2], meld[3], emory[3], meld[4]]]
        for batch in batches:
            before = packed.tokens.computed
            _assert_close(packed.score(batch), padded.score(batch))
            ids = packed.encode_prompts([r.prompt for r in batch])
            assert packed.tokens.computed - before <= sum(map(len, ids))
        assert packed.tokens.computed < padded.tokens.computed
        assert packed.prefix_cache.reused_tokens == padded.prefix_cache.reused_tokens


def test_a_lora_adapter_applies_in_the_packed_forward(lora_adapter) -> None:
    with _embedded_hf_backend(prefix_cache_mb=64) as packed, \
            _embedded_hf_backend(prefix_cache_mb=64, packed=False) as padded:
        for b in (packed, padded):
            b.add_adapter("meld-lora", lora_adapter)
        tuned = _stream_requests(packed, adapter="meld-lora")
        plain = _stream_requests(packed)
        for batch in (tuned[:2], tuned[2:] + plain[2:4]):
            _assert_close(packed.score(batch), padded.score(batch))


def test_only_llama_shaped_models_are_packed() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1)
    assert supports(LlamaForCausalLM(LlamaConfig(**tiny)))
    assert not supports(Gemma3ForCausalLM(Gemma3TextConfig(**tiny, head_dim=16)))


def test_token_chunks_bound_each_forward() -> None:
    assert token_chunks([10, 20, 30, 5], 35) == [[0, 1], [2, 3]]
    assert token_chunks([50, 5], 35) == [[0], [1]]  # a longer row alone
    assert token_chunks([], 35) == []
