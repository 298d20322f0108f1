"""VLLMBackend on the real embedded SmolLM2-135M (vllm-cpu): it scores like the transformers backend.

One engine per session (the ``vllm_backend`` fixture, ~40 s to start). The adapters are real peft
LoRA adapters with non-zero B matrices (peft initialises B to zero, which would make "same adapter"
trivially "no adapter"), built here from fixed seeds.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from core.labels import get_label_set
from producer_sim.synthetic import templates
from scoring.backends.base import Backend, ScoreRequest
from scoring.backends.hf import HFBackend
from scoring.prompts import PromptBuilder, Turn

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

N_PROMPTS = 200


@pytest.fixture(scope="module")
def qkvo_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA r=8, alpha 16 on q/k/v/o, A as peft initialises it (seed 0), B ~ N(0, 0.02) (seed 1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.settings import Settings
    from model_store.base_models import ensure_embedded

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(ensure_embedded(Settings().store.dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    out = tmp_path_factory.mktemp("vllm-adapters") / "qkvo"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_with_adapters(qkvo_adapter: Path, lora_adapter: Path):
    """A transformers backend of its own (adding adapters wraps the model; the session's one stays plain)."""
    from core.settings import Settings
    from model_store.base_models import ensure_embedded

    # Half the cores, as the session's backend (on 2 cores vLLM's worker is pinned to the other one).
    backend = HFBackend(ensure_embedded(Settings().store.dir), model_id="smollm2-135m",
                        threads=max(1, (os.cpu_count() or 2) // 2))
    backend.add_adapter("qkvo", qkvo_adapter)
    backend.add_adapter("qv", lora_adapter)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="module")
def vllm_with_adapters(vllm_backend, qkvo_adapter: Path, lora_adapter: Path):
    vllm_backend.add_adapter("qkvo", qkvo_adapter)
    vllm_backend.add_adapter("qv", lora_adapter)
    return vllm_backend


def fixed_prompts(count_tokens, n: int = N_PROMPTS) -> list[ScoreRequest]:
    """``n`` deterministic InstructERC prompts: every synthetic utterance as the target, with 1 to 4 turns
    of window, through the shared prompt builder; every fourth uses EmoryNLP's labels (Joy+ful, Peace+ful, Sc+ared)."""
    meld = PromptBuilder(get_label_set("meld"), count_tokens=count_tokens)
    emory = PromptBuilder(get_label_set("emorynlp"), count_tokens=count_tokens)
    out: list[ScoreRequest] = []
    for size in (1, 2, 3, 4):
        for conv in templates():
            turns = [Turn(u.speaker, u.text) for u in conv.utterances]
            for t in range(size - 1, len(turns)):  # a window of exactly ``size`` turns: no duplicates
                builder = emory if len(out) % 4 == 3 else meld
                prompt = builder.emotion(turns[max(0, t + 1 - size): t + 1])
                out.append(ScoreRequest(prompt.text, prompt.choices, "qkvo"))
                if len(out) == n:
                    return out
    raise AssertionError(f"only {len(out)} prompts")


def test_is_a_backend(vllm_backend) -> None:
    assert isinstance(vllm_backend, Backend)
    assert vllm_backend.model_id == "smollm2-135m"
    ids = vllm_backend.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert vllm_backend.count_tokens("hello world") == len(ids) > 0
    assert vllm_backend.score([]) == []


def test_the_cpu_lora_ops_plugin_is_active(vllm_backend) -> None:
    from scoring.backends import vllm_cpu_lora

    if vllm_backend.on_cpu:
        assert vllm_cpu_lora.is_active(), "the vllm.general_plugins entry point is not installed (pip install -e .)"


def test_vllm_and_transformers_agree_on_200_prompts_with_the_same_adapter(
    hf_with_adapters: HFBackend, vllm_with_adapters
) -> None:
    requests = fixed_prompts(hf_with_adapters.count_tokens)
    assert len(requests) == N_PROMPTS and len({r.prompt for r in requests}) == N_PROMPTS
    # Both at once: vLLM's engine runs in its own process (pinned to one core), transformers in this one.
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(vllm_with_adapters.score, requests)
        hf = [p for i in range(0, N_PROMPTS, 25) for p in hf_with_adapters.score(requests[i: i + 25])]
        vl = pending.result()
    top_agree = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
                    for a, b in zip(hf, vl)) / N_PROMPTS
    diffs = [abs(x - y) for a, b in zip(hf, vl) for x, y in zip(a, b)]
    mean_diff, max_diff = sum(diffs) / len(diffs), max(diffs)
    print(f"\nvLLM vs transformers, {N_PROMPTS} prompts, adapter qkvo: top-label agreement {top_agree:.1%}, "
          f"mean |dp| {mean_diff:.2e}, max |dp| {max_diff:.2e}")
    assert top_agree >= 0.95
    assert mean_diff <= 0.05
    if vllm_with_adapters.dtype == "float32":
        assert max_diff < 1e-3  # what fp32 on CPU gives (measured ~1e-5): the same computation

    # The adapter is not a no-op: the same prompts without it score differently.
    base = vllm_with_adapters.score([ScoreRequest(r.prompt, r.choices) for r in requests[:16]])
    moved = sum(abs(x - y) for a, b in zip(base, vl[:16]) for x, y in zip(a, b)) / sum(len(a) for a in base)
    assert moved > 0.005, moved


def test_a_mixed_adapter_batch_scores_like_each_request_alone(vllm_with_adapters) -> None:
    """Base rows next to rows of both adapters (every LoRA slot filled): each row gets only its own adapter."""
    meld = get_label_set("meld").labels
    prompt = PromptBuilder(get_label_set("meld"), count_tokens=vllm_with_adapters.count_tokens).emotion(
        [Turn("A", "I can't believe you did that for me!"), Turn("B", "Anything for you.")]).text
    requests = [ScoreRequest(prompt, meld, adapter) for adapter in (None, "qkvo", "qv", None)]
    mixed = vllm_with_adapters.score(requests)
    alone = [vllm_with_adapters.score([r])[0] for r in requests]
    for r, got, want in zip(requests, mixed, alone):
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (r.adapter, got, want)
    assert max(abs(a - b) for a, b in zip(alone[0], alone[1])) > 1e-3  # the adapters really differ
    assert max(abs(a - b) for a, b in zip(alone[1], alone[2])) > 1e-3
    assert alone[0] == pytest.approx(alone[3], abs=1e-6)


def test_multi_token_and_improbable_choices_match_transformers(
    hf_with_adapters: HFBackend, vllm_with_adapters
) -> None:
    """Choices sharing a first token (a second read after it), EmoryNLP's multi-token labels, and choices far
    outside the top-20 next tokens (vLLM returns log-probabilities of exactly the allowed tokens)."""
    choices_sets = [
        ("Scared", "Scary", "Happy"),
        get_label_set("emorynlp").labels,
        ("zebra", "quantum", "Mad"),
    ]
    plan = vllm_with_adapters.plan(choices_sets[0])
    assert len(plan.branches) == 2 and plan.branches[0] == ()  # the root, then after " Sc"
    assert vllm_with_adapters.plan(choices_sets[1]).branches == ((),)  # Joy+ful: first tokens all differ
    requests = [ScoreRequest(p, c, a) for p in ("The haunted house made her feel", "He won the cup! He felt")
                for c in choices_sets for a in (None, "qkvo")]
    hf = hf_with_adapters.score(requests)
    vl = vllm_with_adapters.score(requests)
    for r, a, b in zip(requests, hf, vl):
        assert len(b) == len(r.choices) and math.isclose(sum(b), 1.0, abs_tol=1e-5)
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (r.choices, r.adapter, a, b)


def test_refusals(vllm_with_adapters) -> None:
    with pytest.raises(KeyError, match="never added"):
        vllm_with_adapters.score([ScoreRequest("Hello:", ("yes", "no"), adapter="missing")])
    with pytest.raises(ValueError, match="max_model_len"):
        vllm_with_adapters.score([ScoreRequest("word " * 2000 + ":", ("yes", "no"))])
    with pytest.raises(ValueError, match="token prefix"):
        vllm_with_adapters.plan(("joy", "joyfully"))
    # the engine is still fine afterwards, and re-adding an adapter under its path is a no-op
    vllm_with_adapters.add_adapter("qkvo", vllm_with_adapters._adapters["qkvo"].lora_path)
    [probs] = vllm_with_adapters.score([ScoreRequest("Hello:", ("yes", "no"), adapter="qkvo")])
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-5)
