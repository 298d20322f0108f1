"""A backend that does no inference: uniform probabilities. Measures the stream's own overhead."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scoring.backends.base import ScoreRequest, TokenCounter


class NullBackend:
    model_id = "null"

    def __init__(self) -> None:
        self.tokens = TokenCounter()

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.tokens.add(prompts=len(requests))
        return [[1.0 / len(r.choices)] * len(r.choices) for r in requests]

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    def add_adapter(self, name: str, path: Path) -> None:
        return None

    def close(self) -> None:
        return None
