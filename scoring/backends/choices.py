"""How every backend turns next-token log-probabilities into a distribution over a tuple of choices.

Scoring is constrained greedy decoding over the trie of the choices' token ids. At each node where
the choices sharing a prefix continue with different tokens (a *branch*), the model's
log-probabilities over those sibling tokens are renormalised; a node with a single continuation
costs nothing. A choice's score is the sum of its renormalised log-probabilities along its path, and
the scores are softmaxed (the path probabilities already sum to 1; the softmax only absorbs rounding).

For choices whose first tokens all differ (the MELD label set on SmolLM2, say) that is one read of the
next-token distribution after the prompt. For EmoryNLP's " Joyful" = Joy+ful next to " Mad" it is
still one read (Joy has a single continuation); for ("Scared", "Scary") that share " Sc", a second
read after prompt + " Sc" decides between "ared" and "ary". A choice that is a token prefix of
another is refused: it could never be told apart from it by next-token reads.

Backends differ only in how they get the log-probabilities after each (prompt, branch prefix) row:
the transformers backend reads the whole vocabulary from one padded forward, vLLM returns them for
the sibling tokens alone (``allowed_token_ids``). :meth:`ChoicePlan.probabilities` is the one place
where they are combined, so both backends score identically.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

Prefix = tuple[int, ...]


@dataclass(frozen=True)
class ChoicePlan:
    """How to score a tuple of choices: their token ids and the trie nodes where they branch."""

    token_ids: tuple[tuple[int, ...], ...]
    branches: tuple[Prefix, ...]  # prefixes (token tuples) at which >= 2 continuations exist
    # prefix -> the sorted sibling tokens that continue it (branch nodes only)
    siblings: Mapping[Prefix, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, choices: Sequence[str], encode: Callable[[str], Sequence[int]]) -> "ChoicePlan":
        """``encode`` maps a string to token ids without special tokens; each choice is encoded as ``" " + choice``."""
        ids = tuple(tuple(encode(" " + c)) for c in choices)
        for i, a in enumerate(ids):
            if not a:
                raise ValueError(f"choice {choices[i]!r} encodes to no tokens")
            for j, b in enumerate(ids):
                if i != j and len(a) <= len(b) and b[: len(a)] == a:
                    raise ValueError(f"choice {choices[i]!r} is a token prefix of {choices[j]!r}; rename one")
        nexts: dict[Prefix, set[int]] = defaultdict(set)
        for seq in ids:
            for d in range(len(seq)):
                nexts[seq[:d]].add(seq[d])
        branches = tuple(sorted((p for p, s in nexts.items() if len(s) > 1), key=len))
        return cls(ids, branches, {p: tuple(sorted(nexts[p])) for p in branches})

    @property
    def max_siblings(self) -> int:
        """The most tokens any branch node decides between (vLLM needs that many log-probabilities)."""
        return max((len(s) for s in self.siblings.values()), default=0)

    def probabilities(self, branch_logprobs: Callable[[Prefix], Sequence[float] | torch.Tensor]) -> list[float]:
        """The choices' probabilities, given each branch's log-probabilities over ``siblings[branch]`` (in order).

        The log-probabilities may be normalised over any superset of the siblings (the whole vocabulary,
        or just the siblings): they are renormalised over the siblings here.
        """
        read: dict[Prefix, torch.Tensor] = {}
        scores = []
        for seq in self.token_ids:
            total = 0.0
            for d in range(len(seq)):
                prefix = seq[:d]
                siblings = self.siblings.get(prefix)
                if siblings is None:
                    continue  # a single continuation: probability 1 under the constraint
                lp = read.get(prefix)
                if lp is None:
                    lp = read[prefix] = torch.as_tensor(branch_logprobs(prefix), dtype=torch.float32)
                total += float(lp[siblings.index(seq[d])] - torch.logsumexp(lp, 0))
            scores.append(total)
        return torch.tensor(scores).softmax(0).tolist()
