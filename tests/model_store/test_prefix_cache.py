"""PrefixCache: longest-prefix lookup at token granularity, namespaces, the byte budget, replacement."""

from __future__ import annotations

import torch

from model_store.backends.prefix_cache import PrefixCache, prefix_hashes

LAYERS, HEADS, DIM = 2, 1, 4


def _kv(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values whose every position holds its token id: a reused slice shows which tokens it came from."""
    col = torch.tensor(ids, dtype=torch.float32).view(1, -1, 1).expand(HEADS, len(ids), DIM).clone()
    return [(col + layer, -col - layer) for layer in range(LAYERS)]


def _bytes(n_tokens: int) -> int:
    return LAYERS * 2 * HEADS * n_tokens * DIM * 4


def test_a_prompt_finds_the_longest_prefix_it_shares() -> None:
    cache = PrefixCache(10**6)
    cache.put("", [1, 2, 3, 4, 5], _kv([1, 2, 3, 4, 5]))
    cache.put("", [1, 2, 9, 9], _kv([1, 2, 9, 9]))
    hit = cache.lookup("", [1, 2, 3, 4, 7, 8])
    assert hit.tokens == 4
    keys, values = hit.kv()[1]
    assert keys[0, :, 0].tolist() == [2, 3, 4, 5] and values[0, :, 0].tolist() == [-2, -3, -4, -5]
    assert cache.lookup("", [1, 2, 9, 9, 9]).tokens == 4
    assert cache.lookup("", [5, 1, 2]).entry is None
    assert (cache.hits, cache.lookups, cache.reused_tokens) == (2, 3, 8)


def test_the_last_token_is_always_left_to_compute() -> None:
    """Its logits are what a lookup is for: a prompt equal to a cached one reuses all but its last token."""
    cache = PrefixCache(10**6)
    cache.put("", [1, 2, 3], _kv([1, 2, 3]))
    assert cache.lookup("", [1, 2, 3]).tokens == 2
    assert cache.lookup("", [1]).entry is None


def test_namespaces_never_share_keys_and_values() -> None:
    """The KV depends on the adapter it was computed through."""
    cache = PrefixCache(10**6)
    cache.put("adapter-a", [1, 2, 3, 4], _kv([1, 2, 3, 4]))
    assert cache.lookup("adapter-b", [1, 2, 3, 4, 5]).entry is None
    assert cache.lookup("", [1, 2, 3, 4, 5]).entry is None
    assert cache.lookup("adapter-a", [1, 2, 3, 4, 5]).tokens == 4
    cache.clear("adapter-a")
    assert len(cache) == 0 and cache.nbytes == 0


def test_a_hash_collision_cannot_reuse_other_tokens() -> None:
    cache = PrefixCache(10**6)
    cache.put("", [1, 2, 3], _kv([1, 2, 3]), hashes=prefix_hashes("", [7, 8, 9]))  # indexed under other tokens
    assert cache.lookup("", [7, 8, 9, 10]).entry is None


def test_the_least_recently_used_entries_leave_first_within_the_budget() -> None:
    cache = PrefixCache(_bytes(10))
    cache.put("", [1, 1, 1, 1], _kv([1, 1, 1, 1]))
    cache.put("", [2, 2, 2, 2], _kv([2, 2, 2, 2]))
    assert cache.lookup("", [1, 1, 1, 1, 5]).tokens == 4  # 1… is now the most recently used
    cache.put("", [3, 3, 3, 3], _kv([3, 3, 3, 3]))  # 12 tokens > 10: 2… goes
    assert cache.lookup("", [2, 2, 2, 2, 5]).entry is None
    assert cache.lookup("", [1, 1, 1, 1, 5]).tokens == 4
    assert cache.nbytes == _bytes(8) and len(cache) == 2
    cache.put("", list(range(11)), _kv(list(range(11))))  # larger than the whole budget: not kept
    assert cache.nbytes == _bytes(8) and len(cache) == 2


def test_an_extended_prompt_replaces_the_entry_it_extended() -> None:
    """A conversation's next turn holds everything of the previous one that a later turn can share."""
    cache = PrefixCache(10**6)
    cache.put("", [1, 2, 3, 50], _kv([1, 2, 3, 50]))
    hit = cache.lookup("", [1, 2, 3, 4, 60])
    cache.put("", [1, 2, 3, 4, 60], _kv([1, 2, 3, 4, 60]), replaces=hit.entry)
    assert len(cache) == 1 and cache.nbytes == _bytes(5)
    assert cache.lookup("", [1, 2, 3, 4, 5, 70]).tokens == 4
    assert cache.lookup("", [1, 2, 3, 50, 7]).tokens == 3  # the old tail is gone
