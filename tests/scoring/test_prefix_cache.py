"""PrefixCache: longest-prefix lookup at token granularity, namespaces, the byte budget, replacement."""

from __future__ import annotations

import torch

from scoring.backends.prefix_cache import PrefixCache, prefix_hashes

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
    assert hit.entry is not None
    keys, values = hit.entry.kv[1]
    assert keys[0, : hit.tokens, 0].tolist() == [2, 3, 4, 5] and values[0, : hit.tokens, 0].tolist() == [-2, -3, -4, -5]
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


def test_a_continued_prompt_sends_the_entry_it_continued_to_the_front_of_eviction() -> None:
    """A conversation's next turn holds everything of the previous one that a later turn can share."""
    cache = PrefixCache(_bytes(10), continuation_margin=0)
    cache.put("", [7, 7, 7], _kv([7, 7, 7]))
    cache.put("", [1, 2, 3, 50], _kv([1, 2, 3, 50]))
    hit = cache.lookup("", [1, 2, 3, 4, 60])
    assert hit.tokens == 3
    cache.put("", [1, 2, 3, 4, 60], _kv([1, 2, 3, 4, 60]), continues=hit)  # 12 tokens > 10: one entry goes
    assert len(cache) == 2 and cache.nbytes == _bytes(8)
    assert cache.lookup("", [7, 7, 7, 7]).tokens == 3  # the older, unrelated entry stayed
    assert cache.lookup("", [1, 2, 3, 4, 5, 70]).tokens == 4
    assert cache.lookup("", [1, 2, 3, 50, 7]).tokens == 3  # the continued turn's own tail is gone


def test_a_prompt_holding_an_entry_whole_continues_it_and_a_chance_opening_does_not() -> None:
    """Stream layout: the next turn is the previous prompt plus a line (held whole: a continuation, however
    short the line). Another conversation opening with the same few tokens after the head is not one."""
    head = [1, 2, 3, 4]
    a1, b1 = head + [5, 6, 10, 11], head + [5, 6, 20, 21]  # both open with `Speaker_0: "` (5, 6)
    cache = PrefixCache(_bytes(24))
    cache.put("", a1, _kv(a1))
    hit = cache.lookup("", b1)
    assert hit.tokens == 6 and hit.entry is not None and hit.entry.ids == tuple(a1)
    cache.put("", b1, _kv(b1), continues=hit)  # 6 > a1's shared 0, within the margin: a1 stays in place
    a2 = a1 + [7]
    hit = cache.lookup("", a2)
    assert hit.tokens == len(a1)
    cache.put("", a2, _kv(a2), continues=hit)  # 25 tokens > 24: the first evicted is a1, continued whole
    assert {e.ids for e in cache._entries.values()} == {tuple(b1), tuple(a2)}


def test_a_new_conversation_sharing_only_the_instruction_is_not_a_continuation() -> None:
    """Prompts share the instruction (tokens 1, 2 here). Conversations A, B and C start, then A continues:
    A's history must be the first kept, whichever entry B's and C's lookups found."""
    instruction = [1, 2]
    a1, b1, c1 = instruction + [10, 11, 90], instruction + [20, 21, 90], instruction + [30, 31, 90]
    cache = PrefixCache(_bytes(16), continuation_margin=0)
    for first_turn in (a1, b1, c1):
        cache.put("", first_turn, _kv(first_turn), continues=cache.lookup("", first_turn))
    a2 = instruction + [10, 11, 12, 91]
    hit = cache.lookup("", a2)
    assert hit.tokens == 4 and hit.entry is not None and hit.entry.ids == tuple(a1)
    cache.put("", a2, _kv(a2), continues=hit)  # 21 tokens > 16: the first evicted is A's continued turn
    assert cache.lookup("", a1 + [5]).tokens == 4  # through a2, which holds a1's first four tokens
    assert {e.ids for e in cache._entries.values()} == {tuple(b1), tuple(c1), tuple(a2)}
