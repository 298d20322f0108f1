"""Training and evaluation examples for the three InstructERC tasks, built with the one prompt builder.

For utterance *i* of a conversation the window is turns ``max(0, i-w+1) .. i``; the history of the
emotion-impact task is the same span without turn *i* (its speaker is named, its text is not shown).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

from core.labels import LabelSet
from model_store.data import Conversation
from scoring.prompts import Demonstration, Prompt, PromptBuilder, Turn, anonymise

Task = Literal["main", "speaker", "impact"]


@dataclass(frozen=True)
class Target:
    """One labelled utterance in its context: the unit examples are made from."""

    conversation: Conversation
    index: int
    label: str  # in the label set's spelling

    @property
    def text(self) -> str:
        return self.conversation.utterances[self.index].text

    def window(self, size: int) -> list[Turn]:
        """The history the stream would give this utterance: a reply's chain of ancestors (parent first, never
        a sibling branch, as ``consumer.conversation_store`` reads it), otherwise the last ``size`` turns."""
        utts = self.conversation.utterances
        target = utts[self.index]
        if target.reply_to is None:
            return [Turn(u.speaker, u.text) for u in utts[max(0, self.index - size + 1): self.index + 1]]
        by_id = {u.message_id: u for u in utts[: self.index] if u.message_id is not None}
        chain = [target]
        while len(chain) < size and chain[-1].reply_to in by_id:
            chain.append(by_id[chain[-1].reply_to])
        return [Turn(u.speaker, u.text) for u in reversed(chain)]


@dataclass(frozen=True)
class Example:
    prompt: Prompt
    answer: str  # one of prompt.choices
    task: Task


def targets(conversations: Sequence[Conversation], label_set: LabelSet) -> list[Target]:
    """Every utterance whose gold label maps into ``label_set``, in conversation order."""
    out = []
    for conv in conversations:
        for i, u in enumerate(conv.utterances):
            label = label_set.map_gold(u.label, conv.dataset) if u.label else None
            if label is not None:
                out.append(Target(conv, i, label))
    return out


def sample(items: Sequence[Target], *, fraction: float = 1.0, limit: int | None = None, seed: int = 0) -> list[Target]:
    """A deterministic subset: ``fraction`` of the items, then at most ``limit``."""
    rng = random.Random(seed)
    chosen = list(items)
    if fraction < 1.0:
        chosen = rng.sample(chosen, max(1, round(len(chosen) * fraction)))
    if limit is not None and len(chosen) > limit:
        chosen = rng.sample(chosen, limit)
    return chosen


def main_example(t: Target, builder: PromptBuilder, window: int, demo: Demonstration | None) -> Example:
    return Example(builder.emotion(t.window(window), demo), t.label, "main")


def impact_example(t: Target, builder: PromptBuilder, window: int) -> Example | None:
    if t.index == 0:
        return None
    turns = t.window(window)
    return Example(builder.impact(turns[:-1], turns[-1].speaker), t.label, "impact")


def speaker_example(t: Target, builder: PromptBuilder, window: int) -> Example | None:
    turns = t.window(window)
    if len({x.speaker for x in turns}) < 2:
        return None  # one speaker only: nothing to identify
    prompt = builder.speaker(turns)
    return Example(prompt, anonymise(turns)[turns[-1].speaker], "speaker")
