"""The one small interface every inference backend implements: batched label scoring.

A backend never generates free text for the stream. It returns, for each prompt, a probability
for each of the prompt's choices: the distribution that constrained greedy decoding over the
choice strings would follow (for choices whose first tokens differ, that is the softmax of the
next-token logits restricted to those first tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class ScoreRequest:
    """One prompt to score against its choices, optionally through a named LoRA adapter."""

    prompt: str
    choices: tuple[str, ...]
    adapter: str | None = None


@dataclass
class TokenCounter:
    """What a backend's prompts held and what it really ran through the model.

    ``computed`` counts every position the model processed: left padding of a batch, the extra rows of
    multi-token choices and generated tokens included, prefix-cache hits excluded. The benchmark reads it.
    """

    prompts: int = 0
    prompt_tokens: int = 0
    computed: int = 0

    def add(self, *, prompts: int = 0, prompt_tokens: int = 0, computed: int = 0) -> None:
        self.prompts += prompts
        self.prompt_tokens += prompt_tokens
        self.computed += computed


@runtime_checkable
class Backend(Protocol):
    """Batched label scoring behind which the HF, vLLM and null implementations sit."""

    #: Identifies the base model in emitted events (and in their deterministic ids).
    model_id: str
    #: Prompt tokens scored and positions really computed so far (the consumer's token metrics, the benchmark).
    tokens: TokenCounter

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Probabilities aligned with each request's ``choices``, each list summing to 1."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the model's tokenizer (the prompt builder's budget unit)."""
        ...

    def add_adapter(self, name: str, path: Path) -> None:
        """Make a LoRA adapter available under ``name`` (idempotent)."""
        ...

    def close(self) -> None: ...
