"""A backend for tests that need real labels without a model: the first label word in the target's own text."""

from __future__ import annotations

import re
from collections.abc import Sequence

from scoring.backends.base import ScoreRequest
from scoring.backends.null import NullBackend


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
            target = r.prompt.rsplit("Please select the emotional label of", 1)[-1].split("> from <", 1)[0]
            if self.fail_on is not None and self.fail_on in target:
                raise RuntimeError("the model fell over")
            label = next((c for c in r.choices if re.search(rf"\b{re.escape(c)}\b", target)), r.choices[0])
            rest = 0.3 / (len(r.choices) - 1)
            out.append([0.7 if c == label else rest for c in r.choices])
        return out
