"""A backend for tests that need real labels without a model: the first label word in the target's own text."""

from __future__ import annotations

import re
from collections.abc import Sequence

from scoring.backends.base import ScoreRequest
from scoring.backends.null import NullBackend


def target_text(prompt: str) -> str:
    """The target turn's line of an emotion prompt: the label statement's quote in the InstructERC layout, the last
    line (it ends with the marker) in the stream layout."""
    if "Please select the emotional label of" in prompt:
        return prompt.rsplit("Please select the emotional label of", 1)[-1].split("> from <", 1)[0]
    return prompt.rsplit("\n", 1)[-1]


class KeywordBackend(NullBackend):
    """Labels a message with the first label word in its own text ("so angry" -> angry), else the first label;
    raises on a target containing ``fail_on`` (a model failing on one message)."""

    model_id = "keyword"

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__()
        self.fail_on = fail_on

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        out = []
        for r in requests:
            target = target_text(r.prompt)
            if self.fail_on is not None and self.fail_on in target:
                raise RuntimeError("the model fell over")
            label = next((c for c in r.choices if re.search(rf"\b{re.escape(c)}\b", target)), r.choices[0])
            rest = 0.3 / (len(r.choices) - 1)
            out.append([0.7 if c == label else rest for c in r.choices])
        return out
