"""HFBackend on the real embedded SmolLM2-135M: label distributions, left padding, choice tries."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.labels import get_label_set
from core.settings import Settings
from scoring.backends.base import Backend, ScoreRequest
from scoring.backends.choices import ChoicePlan
from scoring.backends.hf import HFBackend
from scoring.prompts import PromptBuilder, Turn

pytestmark = pytest.mark.slow

WINDOW = [
    Turn("Customer", "My order was supposed to arrive on Monday and it's now Thursday."),
    Turn("Agent", "Sorry about that! Could you share your order number?"),
    Turn("Customer", "It's 48213. This is the third time this has happened, honestly."),
]


def _reference(backend: HFBackend, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities after ``ids``, from a plain forward of the row alone (no padding, no mask)."""
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    return logits.float().log_softmax(-1)


def _encode(backend: HFBackend, text: str) -> list[int]:
    return backend.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_is_a_backend(hf_backend: HFBackend) -> None:
    assert isinstance(hf_backend, Backend)
    assert hf_backend.model_id == "smollm2-135m"
    assert hf_backend.count_tokens("hello world") == len(_encode(hf_backend, "hello world")) > 0
    assert hf_backend.score([]) == []


@pytest.mark.parametrize("label_set", ["meld", "emorynlp", "iemocap", "unified"])
def test_probabilities_sum_to_one_and_align_with_choices(hf_backend: HFBackend, label_set: str) -> None:
    ls = get_label_set(label_set)
    prompt = PromptBuilder(ls, count_tokens=hf_backend.count_tokens).emotion(WINDOW[-2:])
    [probs] = hf_backend.score([ScoreRequest(prompt.text, prompt.choices)])
    assert len(probs) == len(ls.labels)
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-5)
    assert all(0.0 <= p <= 1.0 for p in probs)
    # Each label's first token differs in these sets, so the distribution is the next-token softmax
    # restricted to the labels' first tokens, in the order of the choices.
    plan = hf_backend.plan(prompt.choices)
    assert plan.branches == ((),)
    first = [seq[0] for seq in plan.token_ids]
    ref = _reference(hf_backend, hf_backend.encode_prompts([prompt.text])[0])[first].softmax(0)
    assert torch.allclose(torch.tensor(probs), ref, atol=1e-4), (probs, ref.tolist())


def test_the_distribution_follows_the_prompt(hf_backend: HFBackend) -> None:
    """Not a uniform placeholder: the prompt moves the mass towards the answer it suggests."""
    choices = ("happy", "sad")
    happy, sad = hf_backend.score([
        ScoreRequest("I won the lottery and I am so happy! Emotion (happy or sad):", choices),
        ScoreRequest("My dog died yesterday and I cried all night. Emotion (happy or sad):", choices),
    ])
    assert abs(happy[0] - 0.5) > 1e-3
    assert happy[0] > sad[0]


def test_a_batch_scores_like_each_prompt_alone(hf_backend: HFBackend) -> None:
    """Left padding with explicit positions: a padded row scores as it does alone (prompts kept short: CPU)."""
    ls = get_label_set("meld")
    prompts = [
        "Hi:",
        PromptBuilder(ls, count_tokens=hf_backend.count_tokens).emotion(WINDOW[-1:]).text,
        "I am so angry right now, this is the third time! The emotion is:",
        "A short one. Label:",
        "Monday again, and the coffee machine is broken. She felt",
    ]
    lengths = [len(ids) for ids in hf_backend.encode_prompts(prompts)]
    assert len(set(lengths)) == len(prompts)  # all different: every row but the longest is padded
    # mixed choice sets in one batch, including one that branches below the first token
    choice_sets = [ls.labels, ls.labels, ls.labels, get_label_set("emorynlp").labels, ("Scared", "Scary", "Happy")]
    requests = [ScoreRequest(p, c) for p, c in zip(prompts, choice_sets)]
    batched = hf_backend.score(requests)
    alone = [hf_backend.score([r])[0] for r in requests]
    assert len(batched) == len(requests)
    for r, got, want in zip(requests, batched, alone):
        assert len(got) == len(r.choices)
        assert math.isclose(sum(got), 1.0, abs_tol=1e-5)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (r.prompt[:40], got, want)


def test_padding_rows_match_the_unpadded_reference(hf_backend: HFBackend) -> None:
    rows = [_encode(hf_backend, "One."), _encode(hf_backend, "A much longer row of text, padded on the left by none.")]
    got = hf_backend.last_logprobs(rows, None)
    for i, ids in enumerate(rows):
        assert torch.allclose(got[i], _reference(hf_backend, ids), atol=1e-4)


def test_choice_plan_without_shared_prefixes() -> None:
    vocab = {" a": [1], " b": [2], " cd": [3, 4]}
    plan = ChoicePlan.build(("a", "b", "cd"), vocab.__getitem__)
    assert plan.token_ids == ((1,), (2,), (3, 4))
    assert plan.branches == ((),)


def test_choice_plan_branches_deeper_on_a_shared_first_token(hf_backend: HFBackend) -> None:
    choices = ("Scared", "Scary", "Happy")
    plan = hf_backend.plan(choices)
    sc = _encode(hf_backend, " Scared")
    assert sc[0] == _encode(hf_backend, " Scary")[0] and len(sc) > 1  # the premise of this test
    assert plan.branches == ((), (sc[0],))

    prompt = "The haunted house made her feel"
    [probs] = hf_backend.score([ScoreRequest(prompt, choices)])
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-5)
    assert all(p > 0 for p in probs)
    # constrained greedy decoding: P(Scared) = P(Sc | {Sc, Happy}) * P(ared | Sc, {ared, ary})
    ids = hf_backend.encode_prompts([prompt])[0]
    root = _reference(hf_backend, ids)
    scared, scary, happy = (_encode(hf_backend, " " + c) for c in choices)
    first = torch.stack([root[scared[0]], root[happy[0]]]).softmax(0)
    deeper = _reference(hf_backend, ids + [scared[0]])
    second = torch.stack([deeper[scared[1]], deeper[scary[1]]]).softmax(0)
    expected = [float(first[0] * second[0]), float(first[0] * second[1]), float(first[1])]
    assert max(abs(a - b) for a, b in zip(probs, expected)) < 1e-4, (probs, expected)


@pytest.mark.parametrize(("choices", "prefix"), [
    (("joy", "joyfully"), "joy"),
    (("Speaker_1", "Speaker_2", "Speaker_10"), "Speaker_1"),  # digits are single tokens on SmolLM2
    (("sad", "sad"), "sad"),
])
def test_a_choice_that_is_a_token_prefix_of_another_is_refused(
    hf_backend: HFBackend, choices: tuple[str, ...], prefix: str
) -> None:
    with pytest.raises(ValueError, match=f"{prefix!r} is a token prefix"):
        hf_backend.plan(choices)


def test_a_choice_encoding_to_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        ChoicePlan.build(("a", ""), lambda s: [] if s == " " else [1])


def test_an_unknown_adapter_is_refused(hf_backend: HFBackend) -> None:
    with pytest.raises(KeyError, match="never added"):
        hf_backend.score([ScoreRequest("Hello:", ("yes", "no"), adapter="missing")])


def test_a_mixed_adapter_batch_scores_like_each_request_alone(
    own_hf_backend: HFBackend, lora_adapter, unified_lora_adapter
) -> None:
    """One call mixing base rows and two adapters (what a consumer serving several tenants sends):
    each row is scored through its own adapter only."""
    backend = own_hf_backend
    backend.add_adapter("meld-lora", lora_adapter)
    backend.add_adapter("unified-lora", unified_lora_adapter)
    meld = PromptBuilder(get_label_set("meld"), count_tokens=backend.count_tokens).emotion(WINDOW)
    unified = PromptBuilder(get_label_set("unified"), count_tokens=backend.count_tokens).emotion(WINDOW[-1:])
    requests = [ScoreRequest(p.text, p.choices, adapter) for p, adapter in (
        (meld, None), (unified, "unified-lora"), (meld, "meld-lora"), (meld, "unified-lora"), (unified, None))]
    mixed = backend.score(requests)
    alone = [backend.score([r])[0] for r in requests]
    for r, got, want in zip(requests, mixed, alone):
        assert len(got) == len(r.choices)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (r.adapter, got, want)
    # the adapters really differ, from the base and from each other
    assert max(abs(a - b) for a, b in zip(alone[0], alone[2])) > 1e-3
    assert max(abs(a - b) for a, b in zip(alone[2], alone[3])) > 1e-3


# -- the prefix cache and merged adapters -------------------------------------------------------------

CONVERSATION = [
    *WINDOW,
    Turn("Agent", "I completely understand. I have escalated it and you will get a refund today."),
    Turn("Customer", "Thank you, that actually helps a lot."),
]


def _turn_requests(backend: HFBackend, label_set: str = "meld", adapter: str | None = None) -> list[ScoreRequest]:
    builder = PromptBuilder(get_label_set(label_set), count_tokens=backend.count_tokens)
    return [ScoreRequest(p.text, p.choices, adapter)
            for p in (builder.emotion(CONVERSATION[: i + 1]) for i in range(len(CONVERSATION)))]


def _assert_close(got: list[list[float]], want: list[list[float]], tol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert max(abs(a - b) for a, b in zip(g, w)) < tol, (g, w)


def test_a_conversation_scores_the_same_through_the_prefix_cache(hf_backend: HFBackend, hf_cached_backend) -> None:
    """Turn by turn, as a stream sends them: each turn reuses its predecessor's KV and computes only its new
    tokens, and scores as the uncached backend does."""
    requests = _turn_requests(hf_cached_backend)
    want = [hf_backend.score([r])[0] for r in requests]
    cache = hf_cached_backend.prefix_cache
    for i, r in enumerate(requests):
        before = hf_cached_backend.tokens.computed
        got = hf_cached_backend.score([r])
        _assert_close(got, want[i: i + 1])
        if i:
            prompt = len(hf_cached_backend.encode_prompts([r.prompt])[0])
            assert hf_cached_backend.tokens.computed - before < prompt * 0.8, "the shared prefix was recomputed"
    assert cache.hits >= len(requests) - 1


def test_a_batch_of_cache_hits_and_misses_scores_like_each_prompt_alone(
    hf_backend: HFBackend, hf_cached_backend
) -> None:
    """Rows with pasts of different lengths, a miss and a multi-token choice set in one call."""
    meld = _turn_requests(hf_cached_backend)
    emory = _turn_requests(hf_cached_backend, "emorynlp")
    hf_cached_backend.score([meld[0], meld[2], emory[1]])  # cached: pasts for later turns of both
    batch = [meld[4], meld[3], emory[3], ScoreRequest("Monday again, and the coffee machine is broken. She felt",
                                                      ("Scared", "Scary", "Happy")), meld[1]]
    want = [hf_backend.score([r])[0] for r in batch]
    _assert_close(hf_cached_backend.score(batch), want)
    assert hf_cached_backend.prefix_cache.hits >= 3


def test_turns_of_one_conversation_in_one_call_reuse_each_other(hf_backend: HFBackend, hf_cached_backend) -> None:
    """A micro-batch holding three turns of a conversation: the later turns wait for a wave after the first
    and compute only what they add to it, and still score as alone."""
    requests = _turn_requests(hf_cached_backend)[1:4]
    want = [hf_backend.score([r])[0] for r in requests]
    prompt_tokens = sum(len(ids) for ids in hf_cached_backend.encode_prompts([r.prompt for r in requests]))
    _assert_close(hf_cached_backend.score(requests), want)
    first = len(hf_cached_backend.encode_prompts([requests[0].prompt])[0])
    assert hf_cached_backend.tokens.computed < first + (prompt_tokens - first) * 0.6
    assert hf_cached_backend.prefix_cache.hits >= 2


def test_shared_prefix_from_hashes() -> None:
    from scoring.backends.hf import _shared_prefix
    from scoring.backends.prefix_cache import prefix_hashes

    a, b = prefix_hashes("", [1, 2, 3, 4, 5]), prefix_hashes("", [1, 2, 3, 9])
    assert _shared_prefix(a, b) == 3 and _shared_prefix(a, a) == 5 and _shared_prefix(a, a[:2]) == 2
    assert _shared_prefix(a, prefix_hashes("", [7])) == 0 and _shared_prefix(a, ()) == 0


def test_an_adapter_never_reuses_keys_computed_without_it(hf_cached_backend, lora_adapter) -> None:
    backend = hf_cached_backend
    backend.add_adapter("meld-lora", lora_adapter)
    base = _turn_requests(backend)
    tuned = _turn_requests(backend, adapter="meld-lora")
    backend.score(base[:4])
    got = backend.score(tuned[4:])
    backend.prefix_cache.clear()
    _assert_close(got, backend.score(tuned[4:]))
    assert max(abs(a - b) for a, b in zip(got[0], backend.score(base[4:])[0])) > 1e-3


def test_a_replaced_adapter_drops_its_cached_keys(hf_cached_backend, lora_adapter, unified_lora_adapter) -> None:
    """A hot swap re-adds an adapter name with other weights: nothing computed through the old ones is reused."""
    backend = hf_cached_backend
    backend.add_adapter("live", lora_adapter)
    requests = _turn_requests(backend, adapter="live")
    backend.score(requests[:4])
    backend.add_adapter("live", unified_lora_adapter)
    assert len(backend.prefix_cache) == 0
    got = backend.score(requests[4:])
    backend.prefix_cache.clear()
    _assert_close(got, backend.score(requests[4:]))


def test_a_merged_adapter_scores_as_the_unmerged_one(own_hf_backend: HFBackend, lora_adapter) -> None:
    """merge_adapter folds the LoRA delta into the weights; switching to no adapter and back unmerges and merges."""
    backend = own_hf_backend
    backend.add_adapter("meld-lora", lora_adapter)
    requests = _turn_requests(backend, adapter="meld-lora")[2:4]
    plain = [ScoreRequest(r.prompt, r.choices) for r in requests]
    want, want_plain = backend.score(requests), backend.score(plain)
    backend.merge_adapter = True
    _assert_close(backend.score(requests), want)
    assert backend._merged == "meld-lora"
    _assert_close(backend.score(plain), want_plain)
    assert backend._merged is None
    _assert_close(backend.score(requests + plain), want + want_plain)


def test_forward_groups_cover_every_row_and_cut_off_a_long_one() -> None:
    from scoring.backends.hf import forward_groups

    lengths = [60, 62, 58, 140, 61, 59]
    groups = forward_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [3] in groups  # the miss computes alone instead of padding five rows to 140 tokens
    assert forward_groups([50, 51, 52]) == [[0, 1, 2]]
    assert forward_groups([]) == []


def test_the_prefix_cache_reuses_what_every_layer_caches_whole() -> None:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3NextConfig

    from scoring.backends.hf import reusable_span

    assert reusable_span(LlamaConfig(num_hidden_layers=2)) == math.inf
    assert reusable_span(MistralConfig(num_hidden_layers=2, sliding_window=16)) == 15
    assert reusable_span(Gemma3TextConfig(num_hidden_layers=6, sliding_window=512)) == 511
    assert reusable_span(Qwen3NextConfig(num_hidden_layers=4)) == 0  # linear-attention (recurrent) layers


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Gemma 3 of random weights (3 sliding-window layers of 48 tokens, 1 global) with the embedded
    tokenizer: what the prefix cache must get right for Gemma 3 270M, at a size where prompts exceed the window."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from model_store.base_models import ensure_embedded

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded(Settings().store.dir))
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=48, initializer_range=0.2,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    out = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _conversation_requests(turns: int) -> list[ScoreRequest]:
    """Short prompts (no instruction), turn by turn, as a stream sends them: each extends the previous one."""
    lines = [f"Speaker_{i % 2}: {t.text}" for i, t in enumerate(CONVERSATION[:turns])]
    return [ScoreRequest("\n".join(lines[: i + 1]) + "\nEmotion:", ("neutral", "joy", "anger", "sadness"))
            for i in range(turns)]


def test_a_sliding_window_model_scores_the_same_through_the_prefix_cache(tiny_gemma_dir: Path) -> None:
    """Turn by turn and in one batch, on both sides of the 48-token window: the cached backend reuses pasts
    while past + new tokens fit in the window, computes rows whole beyond it, and scores as the uncached one."""
    plain = HFBackend(tiny_gemma_dir, threads=1)
    cached = HFBackend(tiny_gemma_dir, threads=1, prefix_cache_mb=16)
    assert plain.prefix_cache is None and cached.prefix_cache is not None and cached.cache_span == 47
    requests = _conversation_requests(5)
    lengths = [len(ids) for ids in cached.encode_prompts([r.prompt for r in requests])]
    assert min(lengths) < 47 < max(lengths), lengths  # the conversation grows past the window
    want = [plain.score([r])[0] for r in requests]
    assert max(abs(a - b) for a, b in zip(want[0], want[-1])) > 1e-3  # the model reads its prompts
    computed = []
    for i, r in enumerate(requests):
        before = cached.tokens.computed
        _assert_close(cached.score([r]), want[i: i + 1])
        computed.append(cached.tokens.computed - before)
    reused = [i for i in range(1, len(requests)) if lengths[i] <= 47]
    assert reused and all(computed[i] < lengths[i] for i in reused), (computed, lengths)  # inside: prefix reused
    cached.prefix_cache.clear("")
    _assert_close(cached.score([requests[0], requests[3], requests[1]]), [want[0], want[3], want[1]])
    _assert_close(cached.score(requests), want)  # hits next to rows beyond the window
