"""The transformers backend's prefix cache: the KV of recent prompts, found again by their longest shared token prefix.

In a stream, a conversation's next prompt repeats the previous one up to the new turn: the instruction and
the history (the demonstration and the label statement come after it, see ``model.demo_position``). Keeping
each scored prompt's keys and values lets the next turn compute only the tokens after the shared prefix,
as vLLM's prefix caching does, but at token granularity (vLLM shares whole 32-token blocks).

The cache knows nothing about conversations: an entry is a prompt's token ids (and the adapter it ran
through: the KV depends on it) with its per-layer keys and values. Every position of every entry is
indexed by a rolling hash of the tokens up to it, so a lookup walks the new prompt's hashes from the
longest prefix down and checks the candidate's tokens for equality (a hash collision can never reuse a
wrong prefix). The newest entry wins a shared prefix (the instruction all prompts share), older entries
stay reachable through their own tails. Entries are evicted least recently used first, to a byte budget.

An entry that a newer prompt *continued* (its conversation's previous turn) goes to the front of the
eviction order: the newer entry holds everything of it that a later turn can share, and keeping both under
pressure would halve what the budget holds. Continued means the newer prompt holds the whole entry (the
stream layout: a turn's prompt is the previous one plus a line), or shares more of it than any other prompt
has by ``continuation_margin`` tokens (the InstructERC layout, whose tail after the history is the turn's own):
each entry remembers the longest prefix it has in common with another one (``shared``), and the margin keeps
the first turn of another conversation, which shares the instruction and often the opening ``Speaker_0: "``
with it, from demoting a conversation's only entry. (The very first pair of entries cannot tell the two apart;
a demoted entry is only evicted first, never dropped while the budget has room.)

Reuse is exact up to floating-point summation order: the cached keys were computed at the same positions
with the same weights, and the new tokens attend to them as they would to recomputed ones.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

#: Per layer, (keys, values), each [kv_heads, tokens, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Entry:
    key: int  # its place in the cache's LRU order and index
    namespace: str
    ids: tuple[int, ...]
    hashes: tuple[int, ...]
    kv: list[LayerKV]
    nbytes: int
    shared: int = 0  # the longest prefix this entry has in common with another entry (the instruction, say)


@dataclass(frozen=True)
class Hit:
    """``tokens`` leading tokens of a prompt whose KV ``entry`` holds (0 and None for a miss)."""

    tokens: int
    entry: Entry | None


MISS = Hit(0, None)


def prefix_hashes(namespace: str, ids: Sequence[int]) -> tuple[int, ...]:
    """Rolling hashes: element ``i`` identifies ``namespace`` and ``ids[: i + 1]``."""
    h = hash(namespace)
    out = []
    for t in ids:
        h = hash((h, t))
        out.append(h)
    return tuple(out)


class PrefixCache:
    """KV of scored prompts under a byte budget, keyed by every prefix of their tokens."""

    def __init__(self, max_bytes: int, continuation_margin: int = 8) -> None:
        self.max_bytes = max_bytes
        self.continuation_margin = continuation_margin
        self.nbytes = 0
        self.hits = 0
        self.lookups = 0
        self.reused_tokens = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self._index: dict[int, tuple[int, int]] = {}  # prefix hash -> (entry id, prefix length)
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, namespace: str, ids: Sequence[int], hashes: Sequence[int] | None = None) -> Hit:
        """The longest cached prefix of ``ids``, leaving at least the last token to compute (its logits are wanted)."""
        self.lookups += 1
        hit = self._longest(namespace, ids, hashes if hashes is not None else prefix_hashes(namespace, ids),
                            len(ids) - 1)
        if hit.entry is not None:
            self._entries.move_to_end(hit.entry.key)
            self.hits += 1
            self.reused_tokens += hit.tokens
        return hit

    def put(self, namespace: str, ids: Sequence[int], kv: list[LayerKV], *, continues: Hit = MISS,
            hashes: Sequence[int] | None = None) -> None:
        """Keep ``kv`` (per layer, [kv_heads, len(ids), head_dim]) as the KV of ``ids``.

        ``continues`` is the lookup that found this prompt's past: its entry is evicted first from now on when
        this prompt continued it (holds it whole, or shares more of it than any other prompt has)."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        entry = continues.entry
        if (entry is not None and entry.key in self._entries
                and (continues.tokens == len(entry.ids)
                     or continues.tokens > entry.shared + self.continuation_margin)):
            self._entries.move_to_end(entry.key, last=False)
        if nbytes > self.max_bytes:
            return
        while self._entries and self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        hashes = tuple(hashes) if hashes is not None else prefix_hashes(namespace, ids)
        sibling = self._longest(namespace, ids, hashes, len(ids))
        if sibling.entry is not None:  # they share a prefix: neither continues the other up to there
            sibling.entry.shared = max(sibling.entry.shared, sibling.tokens)
        key = next(self._ids)
        self._entries[key] = Entry(key, namespace, tuple(ids), hashes, kv, nbytes, shared=sibling.tokens)
        self.nbytes += nbytes
        for n, h in enumerate(hashes, start=1):
            self._index[h] = (key, n)

    def clear(self, namespace: str | None = None) -> None:
        """Forget every entry (of ``namespace`` only, when given: an adapter that was replaced)."""
        for key in [k for k, e in self._entries.items() if namespace is None or e.namespace == namespace]:
            self._drop(key)

    def _longest(self, namespace: str, ids: Sequence[int], hashes: Sequence[int], most: int) -> Hit:
        for n in range(min(most, len(ids)), 0, -1):
            found = self._index.get(hashes[n - 1])
            if found is None:
                continue
            entry = self._entries.get(found[0])
            if entry is not None and entry.namespace == namespace and tuple(ids[:n]) == entry.ids[:n]:
                return Hit(n, entry)
        return MISS

    def _drop(self, key: int | None) -> None:
        if key is None or key not in self._entries:
            return
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        for h in entry.hashes:
            if self._index.get(h, (None,))[0] == key:
                del self._index[h]
