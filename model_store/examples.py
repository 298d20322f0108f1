"""Training and evaluation examples for the three InstructERC tasks, built with the one prompt builder.

Utterance *i* of a conversation gets the window the stream would give it: the turns the prompt builder's
:class:`~scoring.prompts.WindowShape` keeps for position *i* (a reply: its chain of ancestors, positioned by
depth), speakers numbered by first appearance in the whole conversation, as ``consumer.conversation_store``
numbers them. The emotion-impact task uses the same window, its last turn's text not shown.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

from core.labels import LabelSet
from model_store.data import Conversation
from scoring.prompts import Demonstration, Prompt, PromptBuilder, Turn, number_speakers

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

    def window(self, span: int) -> list[Turn]:
        """The turns the stream would hand the prompt builder for this utterance, at most ``span`` of them (oldest
        first, target last, each with its speaker's number and its position): a reply's chain of ancestors
        (parent first, never a sibling branch, as ``consumer.conversation_store`` reads it; positions are
        depths in the thread), otherwise the last ``span`` turns (positions are turns)."""
        utts = self.conversation.utterances
        ids = number_speakers([u.speaker for u in utts[: self.index + 1]])  # by first appearance, as stored
        target = utts[self.index]
        if target.reply_to is None:
            first = max(0, self.index - span + 1)
            return [Turn(u.speaker, u.text, ids[i], i) for i, u in enumerate(utts[first: self.index + 1], start=first)]
        by_id = {u.message_id: i for i, u in enumerate(utts[: self.index]) if u.message_id is not None}
        chain = [self.index]
        while (parent := by_id.get(utts[chain[-1]].reply_to)) is not None:  # type: ignore[arg-type]
            chain.append(parent)
        complete = utts[chain[-1]].reply_to is None  # the thread's top is known: depths are exact
        depth = len(chain) - 1
        return [Turn(utts[i].speaker, utts[i].text, ids[i], depth - k if complete else None)
                for k, i in reversed(list(enumerate(chain[:span])))]


@dataclass(frozen=True)
class Example:
    prompt: Prompt
    answer: str  # one of prompt.choices
    task: Task
    # The utterance it was made from, (conversation id, index): a main example and its impact example share it.
    key: tuple[str, int] | None = None
    # Its conversation block, (conversation id, the window's first position): the examples of a block share the
    # history's start, so they pack together (model_store.packing).
    block: tuple[str, int | None] | None = None


def _identity(t: Target, turns: Sequence[Turn]) -> dict:
    cid = t.conversation.conversation_id
    return {"key": (cid, t.index), "block": (cid, turns[0].position if turns else None)}


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


def main_example(t: Target, builder: PromptBuilder, demo: Demonstration | None) -> Example:
    turns = t.window(builder.window.span)
    return Example(builder.emotion(turns, demo), t.label, "main", **_identity(t, builder.window.cut(turns)))


def impact_example(t: Target, builder: PromptBuilder) -> Example | None:
    turns = t.window(builder.window.span)
    if len(turns) < 2:
        return None  # no history to predict from
    return Example(builder.impact(turns), t.label, "impact", **_identity(t, builder.window.cut(turns)))


def speaker_example(t: Target, builder: PromptBuilder) -> Example | None:
    turns = builder.window.cut(t.window(builder.window.span))
    if len({x.speaker for x in turns}) < 2:
        return None  # one speaker only: nothing to identify
    return Example(builder.speaker(turns), builder.answer_speaker(turns), "speaker", **_identity(t, turns))
