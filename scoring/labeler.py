"""From windows to labels: prompt building and batched scoring, with per-item retry on failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from core.labels import LabelSet
from scoring.adapters import AdapterChoice
from scoring.backends.base import Backend, ScoreRequest
from scoring.calibration import Calibration
from scoring.fallback import batch_or_each, describe, probe_backend
from scoring.prompts import Demonstration, Prompt, PromptBuilder, Turn


@dataclass(frozen=True)
class Labelled:
    label: str
    probabilities: dict[str, float]
    turns_used: int


@dataclass(frozen=True)
class Failed:
    """This item could not be labelled: why, and at which stage (``prompt``, ``inference``, ``calibration``)."""

    error: str
    stage: str = "inference"


class Labeler:
    """Builds each window's prompt with the shared builder and scores a batch in one backend call.

    If the batch call fails, each item is retried alone, so one poisonous prompt fails only itself
    (the caller dead-letters it) and the rest of the batch is labelled; so do the demonstration lookup, the
    prompt and the label-prior correction of each item.
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
        self.adapter = adapter  # the adapter's name (events carry it)
        self.adapter_version: str | None = None  # its content hash, once chosen (events carry it too)
        self.demonstrations = demonstrations
        self.calibration: Calibration | None = None

    @property
    def adapter_key(self) -> str | None:
        """What the backend knows the adapter by (``NAME@VERSION``): a new version is loaded, never mistaken for
        the old one."""
        return f"{self.adapter}@{self.adapter_version}" if self.adapter and self.adapter_version else self.adapter

    def use(self, choice: AdapterChoice) -> None:
        """Switch adapter (and its demonstration index, and the prompt layout it was trained with); the backend loads
        it first if needed. Zero-shot keeps the configured layout."""
        if choice.ref is not None:
            self.backend.add_adapter(choice.ref.key, choice.ref.path)
            self.builder = self.builder.with_layout(choice.layout or "instructerc")  # type: ignore[arg-type]
        self.adapter = choice.name
        self.adapter_version = choice.version
        self.demonstrations = choice.demos.lookup if choice.demos is not None else None
        self.calibration = choice.calibration

    @property
    def label_set(self) -> LabelSet:
        return self.builder.label_set

    def label(self, windows: Sequence[Sequence[Turn]]) -> list[Labelled | Failed]:
        return label_together([(self, windows)])[0]

    def _prompts(self, windows: Sequence[Sequence[Turn]]) -> list[Prompt | Failed]:
        lookup = self.demonstrations
        demos: list = (batch_or_each(lookup, [w[-1].text for w in windows], what="demonstration lookup")
                       if lookup else [None] * len(windows))
        out: list[Prompt | Failed] = []
        for window, demo in zip(windows, demos):
            if isinstance(demo, Exception):
                out.append(Failed(describe(demo), "prompt"))
                continue
            try:
                out.append(self.builder.emotion(window, demo))
            except Exception as e:  # noqa: BLE001 - this window only
                out.append(Failed(describe(e), "prompt"))
        return out

    def _result(self, prompt: Prompt, probs: Sequence[float] | Exception) -> Labelled | Failed:
        if isinstance(probs, Exception):
            return Failed(describe(probs), "inference")
        try:
            dist = dict(zip(prompt.choices, (float(p) for p in probs)))
            if self.calibration is not None:
                dist = self.calibration.apply(dist)
            return Labelled(max(dist, key=dist.__getitem__), dist, prompt.turns_used)
        except Exception as e:  # noqa: BLE001 - this item only
            return Failed(describe(e), "calibration")


def label_together(
    groups: Sequence[tuple[Labeler, Sequence[Sequence[Turn]]]],
) -> list[list[Labelled | Failed]]:
    """Each labeler's windows, labelled by its own prompts, adapter and calibration, in ONE backend call.

    The labelers must share their backend (a multi-LoRA backend mixes adapters in a call). Results come
    back per group, in order. If the call fails, each item is retried alone (see :class:`Labeler`); if an item
    fails alone and the backend fails a probe too, :class:`~scoring.fallback.PartDown` is raised (no item is
    blamed for a backend that is down).
    """
    if not groups:
        return []
    backend = groups[0][0].backend
    if any(labeler.backend is not backend for labeler, _ in groups):
        raise ValueError("labelers scored together must share one backend")
    prompted = [(labeler, labeler._prompts(windows)) for labeler, windows in groups]
    requests = [ScoreRequest(p.text, p.choices, labeler.adapter_key)
                for labeler, prompts in prompted for p in prompts if isinstance(p, Prompt)]
    scored = iter(batch_or_each(backend.score, requests, what="inference", probe=lambda: probe_backend(backend)))
    return [[p if isinstance(p, Failed) else labeler._result(p, next(scored)) for p in prompts]
            for labeler, prompts in prompted]
