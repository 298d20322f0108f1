"""Label sets as the InstructERC prompts state them, and gold-label mapping (per /work/shared/data/README.md)."""

from __future__ import annotations

import pytest

from core.labels import LABEL_SETS, get_label_set


def test_label_sets_spell_and_order_labels_as_the_paper() -> None:
    assert set(LABEL_SETS) == {"meld", "emorynlp", "iemocap", "unified"}
    assert get_label_set("meld").labels == ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry")
    assert get_label_set("emorynlp").labels == ("Joyful", "Mad", "Peaceful", "Neutral", "Sad", "Powerful", "Scared")
    assert get_label_set("iemocap").labels == ("happy", "sad", "neutral", "angry", "excited", "frustrated")
    assert get_label_set("unified").labels == (
        "joyful", "sad", "neutral", "mad", "excited", "fear", "disgust", "peaceful", "powerful",
    )
    for name, ls in LABEL_SETS.items():
        assert ls.name == name
        assert len(set(ls.labels)) == len(ls.labels)


def test_unknown_label_set_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="meld"):
        get_label_set("goemotions")


def test_contains() -> None:
    meld = get_label_set("meld")
    assert "joyful" in meld and "joy" not in meld and "Joyful" not in meld


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("neutral", "neutral"), ("surprise", "surprise"), ("fear", "fear"), ("sadness", "sad"),
        ("joy", "joyful"), ("disgust", "disgust"), ("anger", "angry"),
        # case and whitespace of the raw file do not matter
        ("Joy", "joyful"), (" Anger ", "angry"), ("SADNESS", "sad"),
        # already in the set's spelling
        ("joyful", "joyful"), ("sad", "sad"), ("angry", "angry"),
    ],
)
def test_meld_raw_gold_labels(raw: str, expected: str) -> None:
    meld = get_label_set("meld")
    assert meld.map_gold(raw, "meld") == expected
    assert meld.map_gold(raw) == expected  # without naming the dataset


@pytest.mark.parametrize("raw", ["Neutral", "Joyful", "Scared", "Mad", "Peaceful", "Powerful", "Sad"])
def test_emorynlp_raw_gold_labels_are_the_set(raw: str) -> None:
    ls = get_label_set("emorynlp")
    assert ls.map_gold(raw, "emorynlp") == raw
    assert ls.map_gold(raw.lower(), "emorynlp") == raw
    assert ls.map_gold(raw.upper()) == raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("happy", "happy"), ("sad", "sad"), ("neutral", "neutral"), ("angry", "angry"),
        ("excited", "excited"), ("frustrated", "frustrated"),
        # IEMOCAP's own abbreviations
        ("hap", "happy"), ("neu", "neutral"), ("ang", "angry"), ("exc", "excited"), ("fru", "frustrated"),
    ],
)
def test_iemocap_raw_gold_labels(raw: str, expected: str) -> None:
    assert get_label_set("iemocap").map_gold(raw, "iemocap") == expected


UNIFIED = {
    "iemocap": {"happy": "joyful", "sad": "sad", "neutral": "neutral", "angry": "mad", "excited": "excited",
                "frustrated": "fear"},
    # MELD's raw spellings (joy/sadness/anger) go through the paper's spelling first.
    "meld": {"neutral": "neutral", "surprise": "powerful", "fear": "fear", "sadness": "sad", "sad": "sad",
             "joy": "joyful", "joyful": "joyful", "disgust": "disgust", "anger": "mad", "angry": "mad"},
    "emorynlp": {"Joyful": "joyful", "Mad": "mad", "Peaceful": "peaceful", "Neutral": "neutral", "Sad": "sad",
                 "Powerful": "powerful", "Scared": "fear"},
}


@pytest.mark.parametrize(
    ("dataset", "raw", "expected"), [(d, r, e) for d, m in UNIFIED.items() for r, e in m.items()]
)
def test_unified_mapping_of_every_dataset(dataset: str, raw: str, expected: str) -> None:
    unified = get_label_set("unified")
    assert unified.map_gold(raw, dataset) == expected
    assert expected in unified


def test_unified_mapping_covers_every_unified_label() -> None:
    reached = {e for m in UNIFIED.values() for e in m.values()}
    assert reached == set(get_label_set("unified").labels)


def test_unified_mapping_depends_on_the_dataset_named() -> None:
    unified = get_label_set("unified")
    # "surprise" only exists in MELD, where the paper maps it onto powerful
    assert unified.map_gold("surprise", "meld") == "powerful"
    # IEMOCAP's abbreviations map through too
    assert unified.map_gold("fru", "iemocap") == "fear"
    assert unified.map_gold("ang", "iemocap") == "mad"


@pytest.mark.parametrize(
    ("set_name", "raw", "dataset"),
    [
        ("meld", "contempt", "meld"), ("meld", "", None), ("meld", "Scared", "emorynlp"),
        ("emorynlp", "joy", "emorynlp"), ("iemocap", "surprise", "iemocap"), ("unified", "contempt", "meld"),
        ("unified", "bored", None), ("iemocap", "xxx", None),
    ],
)
def test_unknown_labels_map_to_none(set_name: str, raw: str, dataset: str | None) -> None:
    assert get_label_set(set_name).map_gold(raw, dataset) is None
