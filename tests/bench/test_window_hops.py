"""The hop choice's figure: new tokens per turn with a perfect prefix cache, counted with the tokenizer alone."""

from __future__ import annotations

from bench.window_hops import new_tokens
from core.settings import Settings
from model_store.data import Conversation
from producer_sim.synthetic import synthetic_conversations


def test_a_hop_window_computes_far_fewer_tokens_than_a_sliding_one_after_the_first_window() -> None:
    convs = synthetic_conversations(8)
    long_ = Conversation("synthetic", "long", tuple(u for c in convs for u in c.utterances))
    assert len(long_.utterances) >= 40
    base = Settings().with_overrides(model={"label_set": "meld"})
    sliding = new_tokens(base.with_overrides(window={"hop": 1}), [long_], count_from=12)
    hop = new_tokens(base.with_overrides(window={"hop": 12}), [long_], count_from=12)
    assert sliding["utterances"] == hop["utterances"] == len(long_.utterances) - 12
    assert hop["new_tokens_per_utterance"] < 0.5 * sliding["new_tokens_per_utterance"]
    # inside the first window both are the same prompts
    first = {h: new_tokens(base.with_overrides(window={"hop": h}), [Conversation("s", "x", long_.utterances[:12])])
             for h in (1, 12)}
    assert first[1] == first[12]
