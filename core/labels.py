"""Label sets, as InstructERC states them in its prompts, and the unified (feeling-wheel) mapping.

Each dataset's gold labels are mapped onto its label set's spelling (MELD's ``joy`` is ``joyful`` in
the paper's prompts); the unified set maps every dataset onto one vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class LabelSet:
    """An ordered label vocabulary and how each dataset's raw gold labels map onto it."""

    name: str
    labels: tuple[str, ...]
    # dataset name -> raw gold label (lower-cased) -> label in this set
    gold_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __contains__(self, label: object) -> bool:
        return label in self.labels

    def map_gold(self, raw: str, dataset: str | None = None) -> str | None:
        """The label in this set for a raw gold label, or None when it has no counterpart."""
        if raw in self.labels:
            return raw
        key = raw.strip().lower()
        maps = [self.gold_maps[dataset]] if dataset in self.gold_maps else list(self.gold_maps.values())
        for mapping in maps:
            if key in mapping:
                return mapping[key]
        for label in self.labels:
            if label.lower() == key:
                return label
        return None


def _lower_keys(mapping: dict[str, str]) -> Mapping[str, str]:
    return MappingProxyType({k.lower(): v for k, v in mapping.items()})


_MELD_TO_PAPER = {
    "neutral": "neutral", "surprise": "surprise", "fear": "fear", "sadness": "sad", "sad": "sad",
    "joy": "joyful", "joyful": "joyful", "disgust": "disgust", "anger": "angry", "angry": "angry",
}
_EMORY = {k: k for k in ("Joyful", "Mad", "Peaceful", "Neutral", "Sad", "Powerful", "Scared")}
_IEMOCAP = {
    "happy": "happy", "hap": "happy", "sad": "sad", "neutral": "neutral", "neu": "neutral",
    "angry": "angry", "ang": "angry", "excited": "excited", "exc": "excited",
    "frustrated": "frustrated", "fru": "frustrated",
}
_UNIFIED_FROM = {
    "iemocap": {"happy": "joyful", "sad": "sad", "neutral": "neutral", "angry": "mad",
                "excited": "excited", "frustrated": "fear"},
    "meld": {"neutral": "neutral", "surprise": "powerful", "fear": "fear", "sad": "sad",
             "joyful": "joyful", "disgust": "disgust", "angry": "mad"},
    "emorynlp": {"Joyful": "joyful", "Mad": "mad", "Peaceful": "peaceful", "Neutral": "neutral",
                 "Sad": "sad", "Powerful": "powerful", "Scared": "fear"},
}


def _through(first: dict[str, str], second: dict[str, str]) -> dict[str, str]:
    return {raw: second[mid] for raw, mid in first.items()}


LABEL_SETS: Mapping[str, LabelSet] = MappingProxyType({
    "meld": LabelSet("meld", ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry"),
                     {"meld": _lower_keys(_MELD_TO_PAPER)}),
    "emorynlp": LabelSet("emorynlp", ("Joyful", "Mad", "Peaceful", "Neutral", "Sad", "Powerful", "Scared"),
                         {"emorynlp": _lower_keys(_EMORY)}),
    "iemocap": LabelSet("iemocap", ("happy", "sad", "neutral", "angry", "excited", "frustrated"),
                        {"iemocap": _lower_keys(_IEMOCAP)}),
    "unified": LabelSet(
        "unified",
        ("joyful", "sad", "neutral", "mad", "excited", "fear", "disgust", "peaceful", "powerful"),
        {
            "meld": _lower_keys(_through(_MELD_TO_PAPER, _UNIFIED_FROM["meld"])),
            "emorynlp": _lower_keys(_through(_EMORY, _UNIFIED_FROM["emorynlp"])),
            "iemocap": _lower_keys(_through(_IEMOCAP, _UNIFIED_FROM["iemocap"])),
        },
    ),
})


def get_label_set(name: str) -> LabelSet:
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}") from None
