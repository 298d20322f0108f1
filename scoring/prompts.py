"""The one prompt builder, shared by training, evaluation and the stream.

InstructERC (arXiv 2309.11911) frames emotion recognition as generation. A prompt holds

1. the instruction;
2. the historical window: the turns before the target and the target itself, never a future turn, speakers
   anonymised as ``Speaker_0``, ``Speaker_1``…;
3. a retrieved demonstration (optional): the most similar training utterance with its label;
4. the label statement: ``select the emotional label of <target> from <labels>``.

The answer is the label, rendered as ``" " + label`` right after the prompt's final colon, so that
serving can score the label set from the next-token distribution instead of parsing free text.

**A window that keeps its prefix.** A conversation's consecutive prompts should repeat each other up to the new
turn, so that a prefix cache (the hf backend's, vLLM's blocks) computes only the new turn and what follows it.
Two things used to break that once a conversation outgrew the window: a sliding window drops its oldest line
every turn, and numbering speakers by first appearance *in the window* renumbers them when that line goes.
So, here:

- speakers are numbered once per conversation, by first appearance in the conversation (a turn carries its
  ``speaker_id``: the stream keeps the numbering with the conversation's state in Redis, training numbers the
  same way); a window of turns without ids is numbered by first appearance in the window, as before;
- the history starts at an anchor that moves in hops (:class:`WindowShape`): with size *w* and hop *h*, a
  window holds between *w* and *w + h − 1* turns and its first turn jumps forward by *h* when it would hold
  more, so the turns between two hops share every history line but their own, and the cached prefix is
  rebuilt once per *h* turns (*h* = 1 is the sliding window). A turn carries its ``position`` (its turn in
  the conversation, or its depth in a reply thread) and the anchor is a function of it alone, so training
  and serving cut the same windows;
- the token budget cuts history from the left on the same grid: the first anchor ``first + k·h`` whose prompt
  fits, then turn by turn if even the newest ``h`` turns do not fit. The instruction, the label statement
  and the target are never cut.

Where the demonstration goes is a setting. ``after_history`` (the default) keeps everything up to the
end of the history identical between consecutive turns of a conversation, which is what prefix
caching needs; ``after_instruction`` is the paper's order. Each turn's text is first capped at
``max_turn_chars`` characters, so a 1 MB message cannot blow up tokenisation.

**Two layouts** (``model.layout``; an adapter records the one it was trained with and is served with it):

- ``instructerc``, the paper's: instruction, history between ``###``, the label statement quoting the target
  again (``Please select the emotional label of <Speaker_k: "…"> from <labels>:``). The statement follows the
  history, so it can never be shared: every turn recomputes it and its own text a second time.
- ``stream``: the instruction and the label statement form the head, shared by every prompt; each turn's line
  ends with the marker ``=>`` and its label is read from the next-token distribution at its own marker, so
  the prompt of a conversation's next turn is the previous prompt plus one line, and a prefix cache computes
  only that line. The target is not quoted again and there is no demonstration slot (it would sit between
  two turns and break the sharing). Training packs a conversation's rows into one token trie
  (:mod:`model_store.packing`), so one forward pass trains every turn's marker.

**No text can forge structure.** Whatever a turn's text holds, it renders inside its own quotes on its own line
(:func:`render_text`): line breaks become spaces, ``"`` becomes ``''`` (the quote cannot be closed), ``###``
runs become ``#`` (the InstructERC history cannot be closed), ``=>`` becomes ``= >`` (no marker) and
``Speaker_<k>`` becomes ``Speaker <k>`` (no speaker tag). A text therefore cannot add a turn, a speaker, a
marker or a label statement to its conversation's prompts; it can only be read as what it is, a text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

from core.labels import LabelSet

if TYPE_CHECKING:
    from core.settings import ModelSettings, Settings

INSTRUCTION = (
    "Now you are expert of sentiment and emotional analysis. "
    "The following conversation noted between '### ###' involves several speakers."
)
DemoPosition = Literal["after_history", "after_instruction"]
Layout = Literal["instructerc", "stream"]
LAYOUTS: tuple[str, ...] = ("instructerc", "stream")

#: The stream layout's marker: every turn's line ends with it; the turn's label follows it (one token here).
MARKER = " =>"
STREAM_INSTRUCTION = (
    "Now you are expert of sentiment and emotional analysis. Each utterance of the following conversation ends "
    "with '=>', where its emotional label follows, one of <{labels}>."
)

_HASH_RUN = re.compile(r"#{3,}")
_SPEAKER_TAG = re.compile(r"(?i)\b(speaker)_(?=\d)")


def render_text(text: str, max_chars: int) -> str:
    """A turn's text as every prompt shows it: one line, capped, and unable to close its quotes or write a
    delimiter, a marker or a speaker tag (see the module's docstring)."""
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[:max_chars] + "…"
    text = text.replace('"', "''").replace("=>", "= >")
    text = _HASH_RUN.sub("#", text)
    return _SPEAKER_TAG.sub(r"\1 ", text)


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation as the prompt sees it (the real speaker name; anonymised on render).

    ``speaker_id``: the conversation's number for this speaker (rendered ``Speaker_<id>``); ``position``: the
    turn's place in its conversation (or its depth in a reply thread), which fixes where the window starts.
    Either may be unknown (None): then the window's own first appearances and the turns given are used."""

    speaker: str
    text: str
    speaker_id: int | None = None
    position: int | None = None


@dataclass(frozen=True)
class WindowShape:
    """Which turns a window holds: between ``size`` and ``size + hop - 1``, its first turn moving in hops.

    ``first(p)`` is the first position of the window of the turn at position ``p``: the smallest multiple of
    ``hop`` that leaves at most ``size + hop - 1`` turns, so consecutive turns share their first turn until the
    window is full, then it jumps by ``hop`` (``hop`` 1: the sliding window of the last ``size`` turns)."""

    size: int = 12
    hop: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or self.hop < 1:
            raise ValueError(f"a window needs size >= 1 and hop >= 1, not {self.size} and {self.hop}")

    @property
    def span(self) -> int:
        """The most turns a window holds: what a caller must hand the builder (the target included)."""
        return self.size + self.hop - 1

    def first(self, position: int) -> int:
        over = position - self.span + 1  # the first position a window of `span` turns could start at
        return 0 if over <= 0 else -(-over // self.hop) * self.hop

    def cut(self, turns: Sequence[Turn]) -> list[Turn]:
        """The turns of ``turns`` (oldest first, target last) that the target's window holds."""
        turns = list(turns)
        position = turns[-1].position if turns else None
        if position is None:  # the caller chose the turns
            return turns
        first = self.first(position)
        return [t for t in turns if t.position is None or t.position >= first]

    def anchors(self, turns: Sequence[Turn]) -> list[int]:
        """Where the token budget may start the history of ``turns`` (a window, target last), widest first: the
        window's first turn, then the hop grid's later anchors, then turn by turn (indices into ``turns``)."""
        positions = [t.position for t in turns]
        if not turns or any(p is None for p in positions):
            return list(range(len(turns)))
        grid = [i for i, p in enumerate(positions) if i == 0 or p % self.hop == 0]  # type: ignore[operator]
        last = grid[-1]
        return grid + list(range(last + 1, len(turns)))


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
        window: WindowShape | None = None,
        layout: Layout = "instructerc",
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown prompt layout {layout!r}; one of {', '.join(LAYOUTS)}")
        self.label_set = label_set
        self.window = window or WindowShape()
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens or _approx_tokens
        self.demo_position = demo_position
        self.max_turn_chars = max_turn_chars
        self.layout: Layout = layout
        self._label_list = ", ".join(label_set.labels)
        self._head = STREAM_INSTRUCTION.format(labels=self._label_list)

    def with_layout(self, layout: Layout) -> PromptBuilder:
        """This builder with another layout (an adapter is served with the layout it was trained with)."""
        if layout == self.layout:
            return self
        return PromptBuilder(self.label_set, max_tokens=self.max_tokens, count_tokens=self.count_tokens,
                             demo_position=self.demo_position, max_turn_chars=self.max_turn_chars,
                             window=self.window, layout=layout)

    @classmethod
    def configured(cls, settings: Settings, label_set: LabelSet, count_tokens: Callable[[str], int] | None = None, *,
                   model: ModelSettings | None = None, size: int | None = None) -> PromptBuilder:
        """The builder ``settings`` describe (``model``: a tenant's model section instead of the default one;
        ``size``: another window size, for evaluations)."""
        model = model or settings.model
        return cls(label_set, max_tokens=model.max_prompt_tokens, count_tokens=count_tokens,
                   demo_position=model.demo_position, max_turn_chars=settings.window.max_turn_chars,
                   window=WindowShape(size or settings.window.size, settings.window.hop), layout=model.layout)

    # -- the three tasks -------------------------------------------------------------------

    def emotion(self, window: Sequence[Turn], demonstration: Demonstration | None = None) -> Prompt:
        """The main task: the emotion of the window's last turn, in the context of the turns before it.

        ``window`` holds the turns up to the target (oldest first; at least :attr:`WindowShape.span` of them when
        they carry positions): the builder keeps those of the target's window and fits them to the budget. The
        stream layout reads the label at the target's marker and takes no demonstration."""
        if not window:
            raise ValueError("a window needs at least its target turn")
        turns = self.window.cut(window)
        names = anonymise(turns)
        target = turns[-1]
        if self.layout == "stream":
            return self._render(turns, names, "", "", self.label_set.labels)
        demo = (
            f'Here is a similar utterance with its emotional label: "{self._cap(demonstration.text)}" '
            f"-> {demonstration.label}."
            if demonstration
            else ""
        )
        statement = (f'Please select the emotional label of <{names[target.speaker]}: "{self._cap(target.text)}"> '
                     f"from <{self._label_list}>:")
        return self._render(turns, names, demo, statement, self.label_set.labels)

    def speaker(self, window: Sequence[Turn]) -> Prompt:
        """Speaker identification (first LoRA stage): who said the window's last turn, given the turns before."""
        if not window:
            raise ValueError("a window needs at least its target turn")
        turns = self.window.cut(window)
        names = anonymise(turns)
        target = turns[-1]
        choices = tuple(sorted(set(names.values()), key=_speaker_number))
        statement = (f'Please select the speaker of the next utterance "{self._cap(target.text)}" '
                     f"from <{', '.join(choices)}>:")
        # The target is not shown as a history line here.
        prompt = self._render(turns, names, "", statement, choices, show_target=False)
        return Prompt(prompt.text, choices, prompt.turns_used)

    def impact(self, window: Sequence[Turn]) -> Prompt:
        """Emotion impact prediction: from the history alone, the emotion of the window's last turn (its speaker
        is named, its text is not shown)."""
        if not window:
            raise ValueError("a window needs at least the turn to predict")
        turns = self.window.cut(window)
        names = anonymise(turns)
        statement = (f"Based on the conversation so far, please predict the emotional label of the next utterance, "
                     f"by <{names[turns[-1].speaker]}>, from <{self._label_list}>:")
        return self._render(turns, names, "", statement, self.label_set.labels, show_target=False)

    def answer_speaker(self, window: Sequence[Turn]) -> str:
        """The speaker task's answer for ``window``: its last turn's speaker as the prompt names it."""
        turns = self.window.cut(window)
        return anonymise(turns)[turns[-1].speaker]

    # -- rendering ---------------------------------------------------------------------------

    def _cap(self, text: str) -> str:
        return render_text(text, self.max_turn_chars)

    def _render(
        self,
        turns: Sequence[Turn],
        names: dict[str, str],
        demo: str,
        statement: str,
        choices: tuple[str, ...],
        *,
        show_target: bool = True,
    ) -> Prompt:
        """Fit the history into the budget: the widest anchor of :meth:`WindowShape.anchors` whose prompt fits (the
        target always stays). ``turns_used`` counts the window's turns the prompt holds, the target included."""
        shown = list(turns) if show_target else list(turns[:-1])
        marker = MARKER if self.layout == "stream" else ""
        lines = [f'{names[t.speaker]}: "{self._cap(t.text)}"{marker}' for t in shown]
        anchors = [a for a in self.window.anchors(turns) if a < len(shown)] or [len(shown)]
        for a in anchors:
            text = self._join(lines[a:], demo, statement)
            if self.count_tokens(text) <= self.max_tokens:
                break
        else:  # nothing fits: the fewest lines that must stay (the target, or no history at all)
            a = len(shown) - 1 if show_target else len(shown)
            text = self._join(lines[a:], demo, statement)
        return Prompt(text, choices, len(turns) - a)

    def _join(self, lines: list[str], demo: str, statement: str) -> str:
        if self.layout == "stream":  # the head, one line per turn, then the task's statement (none: the marker)
            return "\n".join([self._head, *lines, *([statement] if statement else [])])
        history = "### " + "\n".join(lines) + " ###" if lines else "### ###"
        parts = [INSTRUCTION]
        if demo and self.demo_position == "after_instruction":
            parts.append(demo)
        parts.append(history)
        if demo and self.demo_position == "after_history":
            parts.append(demo)
        parts.append(statement)
        return "\n".join(parts)


def _speaker_number(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def anonymise(turns: Sequence[Turn]) -> dict[str, str]:
    """Speaker name -> ``Speaker_k``: k is the conversation's number for the speaker when every turn carries one,
    otherwise the order of first appearance in ``turns``."""
    if turns and all(t.speaker_id is not None for t in turns):
        return {t.speaker: f"Speaker_{t.speaker_id}" for t in turns}
    names: dict[str, str] = {}
    for turn in turns:
        names.setdefault(turn.speaker, f"Speaker_{len(names)}")
    return names


def number_speakers(speakers: Sequence[str]) -> list[int]:
    """Each turn's speaker number in a conversation, by first appearance (what the stream's state keeps)."""
    numbers: dict[str, int] = {}
    return [numbers.setdefault(s, len(numbers)) for s in speakers]
