"""The naive InstructERC inference loop, kept as the benchmark's baseline (never used by the stream).

One prompt at a time, greedy generation of a few tokens, and the label read off the generated text by
string matching, as the paper's evaluation does. It implements the backend interface so it runs through
the same labeler, prompt builder and adapter as the real backends; the probability it returns is one-hot
on the parsed label (uniform when no label can be found in the output — counted in ``unparsed``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from scoring.backends.base import ScoreRequest
from scoring.backends.hf import HFBackend


def parse_label(text: str, choices: Sequence[str]) -> str | None:
    """The choice whose name occurs first in ``text`` (whole word, case-insensitive), else None."""
    best: tuple[int, str] | None = None
    for choice in choices:
        m = re.search(rf"(?<!\w){re.escape(choice)}(?!\w)", text, flags=re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), choice)
    return best[1] if best else None


class NaiveBackend(HFBackend):
    """Greedy ``generate`` per prompt, then string matching: the loop the other backends are measured against."""

    def __init__(self, model_dir: Path, *, max_new_tokens: int = 8, **kwargs) -> None:
        super().__init__(model_dir, **kwargs)
        self.max_new_tokens = max_new_tokens
        self.unparsed = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        out = []
        for r in requests:
            ids = torch.tensor([self.encode_prompts([r.prompt])[0]], device=self.device)
            with torch.inference_mode(), self._adapter(r.adapter):
                model = self._peft if self._peft is not None else self.model
                generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=self.max_new_tokens,
                                           pad_token_id=self.tokenizer.pad_token_id)
            new = generated[0, ids.shape[1]:]
            self.tokens.add(prompts=1, prompt_tokens=ids.shape[1], computed=ids.shape[1] + len(new))
            label = parse_label(self.tokenizer.decode(new, skip_special_tokens=True), r.choices)
            if label is None:
                self.unparsed += 1
                out.append([1.0 / len(r.choices)] * len(r.choices))
            else:
                out.append([1.0 if c == label else 0.0 for c in r.choices])
        return out
