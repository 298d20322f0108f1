"""A data directory in MELD's and EmoryNLP's own file formats, written from the synthetic conversations.

For tests of code that reads ``ERC_DATA__DIR`` the way it reads the real data (training on several datasets,
the sweep), without the data sets themselves.
"""

from __future__ import annotations

import csv
from pathlib import Path

from producer_sim.synthetic import synthetic_conversations

MELD_COLUMNS = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
                "Season", "Episode", "StartTime", "EndTime"]
EMORY_COLUMNS = ["Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode",
                 "Start_Time", "End_Time"]
# Raw MELD label -> an EmoryNLP label (EmoryNLP has no disgust or surprise of its own).
_TO_EMORY = {"neutral": "Neutral", "joy": "Joyful", "surprise": "Powerful", "anger": "Mad", "sadness": "Sad",
             "disgust": "Mad", "fear": "Scared"}


def write_csv(path: Path, columns: list[str], rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def write_data_dir(root: Path, conversations: int = 6) -> Path:
    """``root/meld/{train,dev}_sent_emo.csv`` and ``root/emorynlp/emorynlp_{train,dev}_final.csv``."""
    convs = synthetic_conversations(conversations)
    for split in ("train", "dev"):
        meld, emory = [], []
        for d, conv in enumerate(convs):
            for i, u in enumerate(conv.utterances):
                meld.append({"Sr No.": len(meld) + 1, "Utterance": u.text, "Speaker": u.speaker, "Emotion": u.label,
                             "Sentiment": "neutral", "Dialogue_ID": d, "Utterance_ID": i, "Season": 1, "Episode": 1,
                             "StartTime": "", "EndTime": ""})
                emory.append({"Utterance": u.text, "Speaker": repr([u.speaker]), "Emotion": _TO_EMORY[u.label],
                              "Scene_ID": d, "Utterance_ID": i, "Season": 2, "Episode": 3, "Start_Time": "",
                              "End_Time": ""})
        write_csv(root / "meld" / f"{split}_sent_emo.csv", MELD_COLUMNS, meld)
        write_csv(root / "emorynlp" / f"emorynlp_{split}_final.csv", EMORY_COLUMNS, emory)
    return root
