"""Loaders of model_store.data, on tiny fixtures written in tmp_path."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from core.labels import get_label_set
from model_store.data import (
    Conversation,
    Utterance,
    clean_text,
    default_file,
    episode_scenes,
    load_conversations,
    load_emorynlp,
    load_episodes,
    load_iemocap,
    load_jsonl,
    load_meld,
)
from tests.datasets import EMORY_COLUMNS, MELD_COLUMNS, write_csv


@pytest.fixture()
def meld_csv(tmp_path: Path) -> Path:
    def row(sr: int, text: str, speaker: str, emotion: str, dia: int, utt: int) -> dict[str, object]:
        return {"Sr No.": sr, "Utterance": text, "Speaker": speaker, "Emotion": emotion, "Sentiment": "neutral",
                "Dialogue_ID": dia, "Utterance_ID": utt, "Season": 1, "Episode": 1,
                "StartTime": "00:00:01,000", "EndTime": "00:00:02,000"}

    return write_csv(tmp_path / "dev_sent_emo.csv", MELD_COLUMNS, [
        row(1, "Second line of ten.", "Ross", "neutral", 10, 1),
        row(2, "He\u00e2\x80\x99s here\x85", "Rachel", "surprise", 2, 1),
        row(3, "First line of ten, with a\nnewline.", "Monica", "joy", 10, 0),
        row(4, "Oh, \u201cgreat\u201d\u2014just great.", "Chandler", "anger", 2, 0),
        row(5, "It\x92s fine, caf\u00e9.", "Phoebe", "sadness", 2, 2),
    ])


def test_meld_groups_orders_and_cleans(meld_csv: Path) -> None:
    convs = load_meld(meld_csv)
    # Dialogues in numeric id order (2 before 10), turns in Utterance_ID order.
    assert [c.conversation_id for c in convs] == ["2", "10"]
    assert all(c.dataset == "meld" for c in convs)
    assert convs[0].utterances == (
        Utterance("Chandler", 'Oh, "great"--just great.', "anger"),
        Utterance("Rachel", "He's here...", "surprise"),
        Utterance("Phoebe", "It's fine, caf\u00e9.", "sadness"),
    )
    assert [u.text for u in convs[1].utterances] == ["First line of ten, with a newline.", "Second line of ten."]
    assert [u.label for u in convs[1].utterances] == ["joy", "neutral"]  # raw, not the paper's "joyful"
    assert get_label_set("meld").map_gold("joy", "meld") == "joyful"


def test_meld_cp1252_file(tmp_path: Path) -> None:
    # Some MELD copies were saved as cp1252, not UTF-8.
    path = tmp_path / "m.csv"
    path.write_bytes(
        b"Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\n\"I\x92m \x93ok\x94\",Joey,neutral,0,0\n"
    )
    (conv,) = load_meld(path)
    assert conv.utterances == (Utterance("Joey", 'I\'m "ok"', "neutral"),)


def test_meld_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("Utterance,Speaker,Emotion,Dialogue_ID\nhi,Joey,joy,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Utterance_ID"):
        load_meld(path)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("He\u00e2\x80\x99s", "He's"),
        ("He\u00e2\u20ac\u2122s", "He's"),  # the same bytes read as cp1252
        ("He\x92s", "He's"),
        ("\u2018Cause\u2026 \u201cno\u201d", "'Cause... \"no\""),
        ("  two   spaces\u00a0here ", "two spaces here"),
        ("caf\u00e9 na\u00efve \u00c3\u00a9", "caf\u00e9 na\u00efve \u00e9"),
    ],
)
def test_clean_text(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


@pytest.fixture()
def emory_csv(tmp_path: Path) -> Path:
    def row(text: str, speakers: list[str], emotion: str, scene: int, utt: int, season: int = 1,
            episode: int = 15) -> dict[str, object]:
        return {"Utterance": text, "Speaker": repr(speakers), "Emotion": emotion, "Scene_ID": scene,
                "Utterance_ID": utt, "Season": season, "Episode": episode,
                "Start_Time": "00:00:03.795", "End_Time": "00:00:05.004"}

    return write_csv(tmp_path / "emorynlp_dev_final.csv", EMORY_COLUMNS, [
        row("Thank you.", ["Joey Tribbiani"], "Neutral", 1, 2),
        row("Coffee.", ["Rachel Green"], "Joyful", 1, 1),
        row("Shut up!", ["Monica Geller", "Phoebe Buffay"], "Mad", 12, 5, season=1, episode=4),
        row("Hi.", ["Ross Geller"], "Peaceful", 12, 4, season=1, episode=4),
        row("Later scene.", ["Ross Geller"], "Sad", 2, 1),
    ])


def test_emorynlp_groups_orders_and_speakers(emory_csv: Path) -> None:
    convs = load_emorynlp(emory_csv)
    assert [c.conversation_id for c in convs] == ["s1e4c12", "s1e15c1", "s1e15c2"]
    assert convs[0].utterances == (
        Utterance("Ross Geller", "Hi.", "Peaceful"),
        Utterance("Monica Geller", "Shut up!", "Mad"),  # the first of several speakers
    )
    assert [u.speaker for u in convs[1].utterances] == ["Rachel Green", "Joey Tribbiani"]
    assert [u.label for u in convs[1].utterances] == ["Joyful", "Neutral"]
    assert {c.dataset for c in convs} == {"emorynlp"}


def test_emorynlp_episodes_join_their_scenes_in_order(emory_csv: Path) -> None:
    episodes = load_episodes("emorynlp", emory_csv)
    assert [e.conversation_id for e in episodes] == ["emorynlp-s1e4", "emorynlp-s1e15"]
    assert [u.text for u in episodes[1].utterances] == ["Coffee.", "Thank you.", "Later scene."]  # scene 1, then 2
    assert [len(e.utterances) for e in load_episodes("emorynlp", emory_csv, min_turns=3)] == [3]
    assert [[c.conversation_id for c in scenes] for _, scenes in episode_scenes("emorynlp", emory_csv)] == [
        ["s1e4c12"], ["s1e15c1", "s1e15c2"]]


def test_meld_episodes_order_dialogues_by_start_time(tmp_path: Path) -> None:
    def row(sr: int, dia: int, utt: int, start: str, episode: int = 1) -> dict[str, object]:
        return {"Sr No.": sr, "Utterance": f"d{dia} u{utt}", "Speaker": "Ross", "Emotion": "neutral",
                "Sentiment": "neutral", "Dialogue_ID": dia, "Utterance_ID": utt, "Season": 2, "Episode": episode,
                "StartTime": start, "EndTime": start}

    path = write_csv(tmp_path / "dev_sent_emo.csv", MELD_COLUMNS, [
        row(1, 0, 0, "00:20:57,256"), row(2, 0, 1, "00:21:01,927"),
        row(3, 1, 0, "0:03:10,000"),  # earlier in the episode, hours unpadded
        row(4, 2, 0, "00:01:00,000", episode=2),
    ])
    episodes = load_episodes("meld", path)
    assert [e.conversation_id for e in episodes] == ["meld-s2e1", "meld-s2e2"]
    assert [u.text for u in episodes[0].utterances] == ["d1 u0", "d0 u0", "d0 u1"]
    with pytest.raises(ValueError, match="season and episode"):
        load_episodes("jsonl", path)


def _iemocap_pickle(path: Path) -> Path:
    video_ids = {"Ses01F_impro01": ["Ses01F_impro01_F000", "Ses01F_impro01_M000", "Ses01F_impro01_F001"],
                 "Ses05M_script02": ["Ses05M_script02_M000", "Ses05M_script02_F000"]}
    speakers = {"Ses01F_impro01": ["F", "M", "F"], "Ses05M_script02": ["M", "F"]}
    labels = {"Ses01F_impro01": [2, 5, 3], "Ses05M_script02": [0, 4]}
    features = {vid: [[0.0] * 3 for _ in ids] for vid, ids in video_ids.items()}
    sentences = {"Ses01F_impro01": ["Excuse me.", "Do you have your forms?", "Yeah."],
                 "Ses05M_script02": ["We made it!", "This is amazing."]}
    data = (video_ids, speakers, labels, features, features, features, sentences,
            {"Ses01F_impro01"}, {"Ses05M_script02"})
    with path.open("wb") as fh:
        pickle.dump(data, fh, protocol=2)
    return path


def test_iemocap_splits_and_labels(tmp_path: Path) -> None:
    path = _iemocap_pickle(tmp_path / "IEMOCAP_features.pkl")
    (train,) = load_iemocap(path, "train")
    assert train == Conversation("iemocap", "Ses01F_impro01", (
        Utterance("F", "Excuse me.", "neutral"),
        Utterance("M", "Do you have your forms?", "frustrated"),
        Utterance("F", "Yeah.", "angry"),
    ))
    (test,) = load_iemocap(path, "test")
    assert [u.label for u in test.utterances] == ["happy", "excited"]
    assert load_conversations("iemocap", path) == [test]  # test is the default split
    assert load_conversations("iemocap", path, split="train") == [train]
    with pytest.raises(ValueError, match="split"):
        load_iemocap(path, "dev")
    assert get_label_set("iemocap").map_gold("frustrated", "iemocap") == "frustrated"


def test_iemocap_not_a_cosmic_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"not": "a tuple"}))
    with pytest.raises(ValueError, match="COSMIC"):
        load_iemocap(path)


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n",
                    encoding="utf-8")
    return path


def test_jsonl(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "c.jsonl", [
        {"conversation_id": "c-1", "dataset": "support", "turns": [
            {"speaker": "Customer", "text": "My order never came.", "label": "anger"},
            {"speaker": "Agent", "text": "Sorry! Let me check.", "extra": 1},
        ]},
        "",
        {"conversation_id": "c-2", "turns": [{"speaker": "A", "text": ""}]},
    ])
    assert load_jsonl(path) == [
        Conversation("support", "c-1", (Utterance("Customer", "My order never came.", "anger"),
                                        Utterance("Agent", "Sorry! Let me check.", None))),
        Conversation("jsonl", "c-2", (Utterance("A", "", None),)),
    ]
    assert load_conversations("jsonl", path) == load_jsonl(path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "invalid JSON"),
        ('["a"]', "JSON object"),
        ({"turns": [{"speaker": "A", "text": "x"}]}, "conversation_id"),
        ({"conversation_id": "c", "turns": []}, "turns"),
        ({"conversation_id": "c", "turns": [{"speaker": "", "text": "x"}]}, "speaker"),
        ({"conversation_id": "c", "turns": [{"speaker": "A", "text": 3}]}, "text"),
        ({"conversation_id": "c", "turns": [{"speaker": "A", "text": "x", "label": 1}]}, "label"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: object, match: str) -> None:
    good = {"conversation_id": "ok", "turns": [{"speaker": "A", "text": "x"}]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(ValueError, match=match) as info:
        load_jsonl(path)
    assert f"{path}:2" in str(info.value)


def test_jsonl_duplicate_ids(tmp_path: Path) -> None:
    conv = {"conversation_id": "same", "turns": [{"speaker": "A", "text": "x"}]}
    with pytest.raises(ValueError, match="duplicate"):
        load_jsonl(_write_jsonl(tmp_path / "d.jsonl", [conv, conv]))


def test_dispatch_errors(tmp_path: Path, meld_csv: Path) -> None:
    assert load_conversations("meld", meld_csv) == load_meld(meld_csv)
    with pytest.raises(ValueError, match="unknown dataset 'friends'"):
        load_conversations("friends", meld_csv)
    missing = tmp_path / "nope" / "test_sent_emo.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_conversations("meld", missing)
    with pytest.raises(FileNotFoundError, match="IEMOCAP"):
        load_conversations("iemocap", missing)


def test_default_file(tmp_path: Path) -> None:
    assert default_file(tmp_path, "meld", "dev") == tmp_path / "meld" / "dev_sent_emo.csv"
    assert default_file(tmp_path, "meld", "train") == tmp_path / "meld" / "train_sent_emo.csv"
    assert default_file(tmp_path, "emorynlp", "dev") == tmp_path / "emorynlp" / "emorynlp_dev_final.csv"
    assert default_file(tmp_path, "iemocap", "test") == tmp_path / "iemocap" / "IEMOCAP_features.pkl"
    with pytest.raises(ValueError, match="split"):
        default_file(tmp_path, "meld", "validation")
    with pytest.raises(ValueError, match="unknown dataset"):
        default_file(tmp_path, "friends", "dev")
    with pytest.raises(ValueError, match="jsonl"):
        default_file(tmp_path, "jsonl", "dev")


def test_jsonl_threads_give_a_reply_its_chain_of_ancestors(tmp_path) -> None:
    from core.labels import get_label_set
    from model_store.data import load_jsonl
    from model_store.examples import targets

    path = tmp_path / "thread.jsonl"
    turns = [{"id": "r", "speaker": "op", "text": "new phone!", "label": "joy"},
             {"id": "a", "reply_to": "r", "speaker": "u1", "text": "nice", "label": "joy"},
             {"id": "b", "reply_to": "r", "speaker": "u2", "text": "ugh, mine broke", "label": "anger"},
             {"id": "a1", "reply_to": "a", "speaker": "op", "text": "thanks", "label": "joy"},
             {"speaker": "u3", "text": "a comment on the post itself", "label": "neutral"}]
    path.write_text(json.dumps({"conversation_id": "post-1", "turns": turns}) + "\n")
    [conv] = load_jsonl(path)
    by_text = {t.text: t for t in targets([conv], get_label_set("meld"))}
    assert [t.text for t in by_text["thanks"].window(12)] == ["new phone!", "nice", "thanks"]  # not "ugh..."
    assert [t.text for t in by_text["thanks"].window(2)] == ["nice", "thanks"]
    assert len(by_text["a comment on the post itself"].window(12)) == 5  # no reply_to: the last turns
