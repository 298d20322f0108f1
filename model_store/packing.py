"""Prefix-tree packing of training rows: the shared start of many prompts is computed once.

Consecutive turns of a conversation have prompts that repeat each other up to the new turn (the hop window
keeps the history's start fixed, see ``scoring.prompts``), and the emotion-impact prompt of a turn repeats
its emotion prompt's history. Trained as separate padded rows, every prompt recomputes that history. Here the
rows of a group are merged into a token trie: each distinct prefix is one node, a token attends to its
ancestors only (a 4-D attention mask) at its depth in the trie (its position id), so each row's logits are
exactly those of the row alone — the same computation as serving's prefix cache, used for training.

On the MELD training set, with the demonstration after the history, a batch of one conversation block holds
~3x fewer tokens packed than padded (measured by ``python -m bench.training_packing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Packed:
    """Rows packed as one trie per group, the tries laid end to end in a few sequences (block-diagonal masks).

    ``paths[r]`` holds, for row ``r`` (in the order given), its sequence (``group_of[r]``) and the node index of
    each of its tokens there: ``logits[group_of[r], paths[r][k]]`` predicts the row's token ``k + 1``."""

    input_ids: torch.Tensor  # (sequences, width)
    position_ids: torch.Tensor  # (sequences, width): a node's depth in its trie
    attention_mask: torch.Tensor  # (sequences, 1, width, width), bool: True = may attend
    group_of: list[int]
    paths: list[list[int]]
    nodes: int  # real (not padding) tokens computed: packing saves ``sum(len(row)) - nodes``

    def mask_for(self, attn_implementation: str | None) -> torch.Tensor:
        """The mask in the form the model's attention takes it: SDPA reads a boolean mask; eager attention (Gemma's
        default) *adds* its mask to the scores, so it gets 0 where a token may attend and the float minimum
        elsewhere (a boolean mask added there would mask nothing)."""
        if attn_implementation == "sdpa":
            return self.attention_mask
        bias = torch.zeros(self.attention_mask.shape, dtype=torch.float32)
        return bias.masked_fill_(~self.attention_mask, torch.finfo(torch.float32).min)


@dataclass
class _Trie:
    tokens: list[int]
    parents: list[int]
    depths: list[int]
    children: dict[tuple[int, int], int]

    def new_tokens(self, row: Sequence[int]) -> int:
        """How many nodes adding ``row`` would create."""
        node = -1
        for k, tok in enumerate(row):
            nxt = self.children.get((node, tok))
            if nxt is None:
                return len(row) - k
            node = nxt
        return 0

    def add(self, row: Sequence[int]) -> list[int]:
        node, path = -1, []
        for tok in row:
            nxt = self.children.get((node, tok))
            if nxt is None:
                nxt = len(self.tokens)
                self.children[(node, tok)] = nxt
                self.tokens.append(int(tok))
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1 if node >= 0 else 0)
            node = nxt
            path.append(node)
        return path


def pack(rows: Sequence[Sequence[int]], groups: Sequence[object] | None = None, pad_id: int = 0,
         width: int = 1024) -> Packed:
    """Pack token rows into tries per group (``groups[r]`` is row ``r``'s key; None: one group), a group's trie
    growing to ``width`` nodes before it opens another, and the tries into sequences of at most ``width`` tokens
    (a single row longer than that gets a sequence of its own).

    Attention is dense over a whole sequence (the CPU kernels do not skip masked blocks), so ``width`` trades
    the attention's quadratic cost against recomputing a shared prefix in a second trie; laying tries end to end
    instead of one per padded row keeps the padding (and the activations kept for the backward pass, ~1.4 MB a
    token for SmolLM2 in fp32) to the last sequence's few."""
    keys = list(groups) if groups is not None else [None] * len(rows)
    if len(keys) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(keys)} group keys")
    tries: dict[object, _Trie] = {}  # each group's open trie
    done: list[_Trie] = []
    placed = []
    for row, key in zip(rows, keys):
        if not row:
            raise ValueError("an empty row cannot be packed")
        trie = tries.setdefault(key, _Trie([], [], [], {}))
        if trie.tokens and len(trie.tokens) + trie.new_tokens(row) > width:  # full: the group opens another
            done.append(trie)
            trie = tries[key] = _Trie([], [], [], {})
        placed.append((trie, trie.add(row)))
    # First-fit decreasing: each trie goes into the first sequence with room for it.
    bins: list[list[_Trie]] = []
    fill: list[int] = []
    where: dict[int, tuple[int, int]] = {}  # id(trie) -> (sequence, offset)
    for trie in sorted(done + list(tries.values()), key=lambda t: -len(t.tokens)):
        n = len(trie.tokens)
        b = next((i for i, used in enumerate(fill) if used + n <= width), None)
        if b is None:
            bins.append([])
            fill.append(0)
            b = len(bins) - 1
        where[id(trie)] = (b, fill[b])
        bins[b].append(trie)
        fill[b] += n
    size = max(fill)
    input_ids = torch.full((len(bins), size), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), size), dtype=torch.long)
    mask = torch.zeros((len(bins), 1, size, size), dtype=torch.bool)
    for b, members in enumerate(bins):
        m = mask[b, 0]
        for trie in members:
            _, off = where[id(trie)]
            n = len(trie.tokens)
            input_ids[b, off: off + n] = torch.tensor(trie.tokens)
            position_ids[b, off: off + n] = torch.tensor(trie.depths)
            for i, parent in enumerate(trie.parents):  # parents come first: a node sees its parent's view + itself
                if parent >= 0:
                    m[off + i] = m[off + parent]
                m[off + i, off + i] = True
        idx = torch.arange(fill[b], size)
        m[idx, idx] = True  # padding attends to itself only (a row of all False would give NaN); never read
    group_of = [where[id(trie)][0] for trie, _ in placed]
    paths = [[where[id(trie)][1] + n for n in path] for trie, path in placed]
    return Packed(input_ids, position_ids, mask, group_of, paths, sum(fill))
