"""The one prompt builder, shared by training, evaluation and the stream.

InstructERC (arXiv 2309.11911) frames emotion recognition as generation. A prompt holds

1. the instruction;
2. the historical window: the last *w* turns up to and including the target, speakers anonymised
   as ``Speaker_0``, ``Speaker_1``… in order of first appearance in the window, never a future turn;
3. a retrieved demonstration (optional): the most similar training utterance with its label;
4. the label statement: ``select the emotional label of <target> from <labels>``.

The answer is the label, rendered as ``" " + label`` right after the prompt's final colon, so that
serving can score the label set from the next-token distribution instead of parsing free text.

Where the demonstration goes is a setting. ``after_history`` (the default) keeps everything up to the
end of the history identical between consecutive turns of a conversation, which is what prefix
caching needs; ``after_instruction`` is the paper's order. When a token budget is hit, history is
cut from the left (oldest turns first): the instruction, the label statement and the target are
never cut. Each turn's text is first capped at ``max_turn_chars`` characters, so a 1 MB message
cannot blow up tokenisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

from core.labels import LabelSet

INSTRUCTION = (
    "Now you are expert of sentiment and emotional analysis. "
    "The following conversation noted between '### ###' involves several speakers."
)
DemoPosition = Literal["after_history", "after_instruction"]


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation as the prompt sees it (the real speaker name; anonymised on render)."""

    speaker: str
    text: str


@dataclass(frozen=True)
class Demonstration:
    """A retrieved training utterance and its gold label (speaker already removed)."""

    text: str
    label: str


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt, the answers it can be scored against, and how much history it kept."""

    text: str
    choices: tuple[str, ...]
    turns_used: int

    @staticmethod
    def answer(choice: str) -> str:
        """The continuation that follows ``text`` for a choice (training target and scoring suffix)."""
        return " " + choice


def _approx_tokens(text: str) -> int:
    # Used only when no tokenizer is given: ~4 characters a token for English.
    return len(text) // 4 + 1


class PromptBuilder:
    """Renders the three InstructERC tasks: emotion recognition, speaker identification, emotion impact."""

    def __init__(
        self,
        label_set: LabelSet,
        *,
        max_tokens: int = 384,
        count_tokens: Callable[[str], int] | None = None,
        demo_position: DemoPosition = "after_history",
        max_turn_chars: int = 2000,
    ) -> None:
        self.label_set = label_set
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens or _approx_tokens
        self.demo_position = demo_position
        self.max_turn_chars = max_turn_chars
        self._label_list = ", ".join(label_set.labels)

    # -- the three tasks -------------------------------------------------------------------

    def emotion(self, window: Sequence[Turn], demonstration: Demonstration | None = None) -> Prompt:
        """The main task: the emotion of the window's last turn, in the context of the turns before it."""
        if not window:
            raise ValueError("a window needs at least its target turn")
        demo = (
            f'Here is a similar utterance with its emotional label: "{self._cap(demonstration.text)}" '
            f"-> {demonstration.label}."
            if demonstration
            else ""
        )

        def statement(names: dict[str, str]) -> str:
            target = window[-1]
            return (
                f'Please select the emotional label of <{names[target.speaker]}: "{self._cap(target.text)}"> '
                f"from <{self._label_list}>:"
            )

        return self._render(window, demo, statement, self.label_set.labels)

    def speaker(self, window: Sequence[Turn]) -> Prompt:
        """Speaker identification (first LoRA stage): who said the window's last turn, given the turns before."""
        if not window:
            raise ValueError("a window needs at least its target turn")
        history, target = list(window[:-1]), window[-1]
        names = anonymise([*history, target])
        choices = tuple(dict.fromkeys(names.values()))

        def statement(kept: dict[str, str]) -> str:
            return (
                f'Please select the speaker of the next utterance "{self._cap(target.text)}" '
                f"from <{', '.join(choices)}>:"
            )

        # The target is not shown as a history line here; names are fixed over the whole window so
        # the answer's speaker id means the same thing whatever truncation keeps.
        prompt = self._render(history, "", statement, choices, names=names, keep_last=False)
        return Prompt(prompt.text, choices, prompt.turns_used + 1)

    def impact(self, history: Sequence[Turn], next_speaker: str) -> Prompt:
        """Emotion impact prediction: from the history alone, the emotion of the next speaker's turn."""
        names = anonymise([*history, Turn(next_speaker, "")])

        def statement(kept: dict[str, str]) -> str:
            return (
                f"Based on the conversation so far, please predict the emotional label of the next utterance, "
                f"by <{names[next_speaker]}>, from <{self._label_list}>:"
            )

        return self._render(history, "", statement, self.label_set.labels, names=names, keep_last=False)

    # -- rendering ---------------------------------------------------------------------------

    def _cap(self, text: str) -> str:
        text = " ".join(text.split())  # newlines and control whitespace would break the line layout
        return text if len(text) <= self.max_turn_chars else text[: self.max_turn_chars] + "…"

    def _render(
        self,
        turns: Sequence[Turn],
        demo: str,
        statement: Callable[[dict[str, str]], str],
        choices: tuple[str, ...],
        *,
        names: dict[str, str] | None = None,
        keep_last: bool = True,
    ) -> Prompt:
        """Fit history into the budget by dropping the oldest turns; ``keep_last`` pins the target turn."""
        turns = list(turns)
        start = 0
        while True:
            kept = turns[start:]
            kept_names = names or anonymise(kept)
            lines = [f'{kept_names[t.speaker]}: "{self._cap(t.text)}"' for t in kept]
            text = self._join(lines, demo, statement(kept_names))
            min_kept = 1 if keep_last else 0
            if len(kept) <= min_kept or self.count_tokens(text) <= self.max_tokens:
                return Prompt(text, choices, len(kept))
            start += 1

    def _join(self, lines: list[str], demo: str, statement: str) -> str:
        history = "### " + "\n".join(lines) + " ###" if lines else "### ###"
        parts = [INSTRUCTION]
        if demo and self.demo_position == "after_instruction":
            parts.append(demo)
        parts.append(history)
        if demo and self.demo_position == "after_history":
            parts.append(demo)
        parts.append(statement)
        return "\n".join(parts)


def anonymise(turns: Sequence[Turn]) -> dict[str, str]:
    """Speaker name -> ``Speaker_k``, k in order of first appearance."""
    names: dict[str, str] = {}
    for turn in turns:
        names.setdefault(turn.speaker, f"Speaker_{len(names)}")
    return names
