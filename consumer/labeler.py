"""From windows to labels: prompt building and batched scoring, with per-item retry on failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import structlog

from erc_stream.labels import LabelSet
from model_store.backends.base import Backend, ScoreRequest
from model_store.calibration import Calibration
from model_store.loading import AdapterChoice
from model_store.prompts import Demonstration, PromptBuilder, Turn

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Labelled:
    label: str
    probabilities: dict[str, float]
    turns_used: int


@dataclass(frozen=True)
class Failed:
    error: str


class Labeler:
    """Builds each window's prompt with the shared builder and scores a batch in one backend call.

    If the batch call fails, each item is retried alone, so one poisonous prompt fails only itself
    (the caller dead-letters it) and the rest of the batch is labelled.
    """

    def __init__(
        self,
        backend: Backend,
        builder: PromptBuilder,
        *,
        adapter: str | None = None,
        demonstrations: Callable[[Sequence[str]], list[Demonstration | None]] | None = None,
    ) -> None:
        self.backend = backend
        self.builder = builder
        self.adapter = adapter
        self.demonstrations = demonstrations
        self.calibration: Calibration | None = None

    def use(self, choice: AdapterChoice) -> None:
        """Switch adapter (and its demonstration index); the backend loads it first if needed."""
        if choice.ref is not None:
            self.backend.add_adapter(choice.ref.name, choice.ref.path)
        self.adapter = choice.name
        self.demonstrations = choice.demos.lookup if choice.demos is not None else None
        self.calibration = choice.calibration

    @property
    def label_set(self) -> LabelSet:
        return self.builder.label_set

    def label(self, windows: Sequence[Sequence[Turn]]) -> list[Labelled | Failed]:
        demos = self.demonstrations([w[-1].text for w in windows]) if self.demonstrations else [None] * len(windows)
        prompts = [self.builder.emotion(window, demo) for window, demo in zip(windows, demos)]
        requests = [ScoreRequest(p.text, p.choices, self.adapter) for p in prompts]
        try:
            scored: list[list[float] | Exception] = list(self.backend.score(requests))
        except Exception as e:  # noqa: BLE001 - any backend failure falls back to item by item
            log.warning("batch inference failed; retrying item by item", error=repr(e), size=len(requests))
            scored = []
            for r in requests:
                try:
                    scored.append(self.backend.score([r])[0])
                except Exception as item_error:  # noqa: BLE001
                    scored.append(item_error)
        out: list[Labelled | Failed] = []
        for prompt, probs in zip(prompts, scored):
            if isinstance(probs, Exception):
                out.append(Failed(f"{type(probs).__name__}: {probs}"))
                continue
            dist = dict(zip(prompt.choices, (float(p) for p in probs)))
            if self.calibration is not None:
                dist = self.calibration.apply(dist)
            out.append(Labelled(max(dist, key=dist.__getitem__), dist, prompt.turns_used))
        return out
