"""Conversation data loaders shared by training, evaluation and the producer simulator.

Every loader returns ``list[Conversation]``: conversations in a stable order (by dialogue id, numerically
where the ids are numbers), each with its utterances in turn order. Gold labels stay *raw*, exactly as the
file spells them (MELD's ``joy``, EmoryNLP's ``Joyful``); ``core.labels.LabelSet.map_gold`` maps them
onto a label set.

Supported formats (``load_conversations(dataset, path)`` dispatches on ``dataset``):

``meld``
    MELD's ``*_sent_emo.csv``. A dialogue is one ``Dialogue_ID``, ordered by ``Utterance_ID``;
    ``conversation_id`` is the Dialogue_ID. MELD's text carries mojibake (``â\\x80\\x99``, ``\\x92``) and
    typographic quotes; both are cleaned to plain ASCII punctuation (see ``clean_text``).
``emorynlp``
    EmoryNLP's ``emorynlp_*_final.csv``. A dialogue is one ``(Season, Episode, Scene_ID)``, ordered by
    ``Utterance_ID``; the speaker is the first name of the ``Speaker`` list literal; ``conversation_id`` is
    ``s{season}e{episode}c{scene}``.
``iemocap``
    The COSMIC / DialogueRNN processed pickle ``IEMOCAP_features.pkl``: a 9-tuple ``(videoIDs, videoSpeakers,
    videoLabels, videoText, videoAudio, videoVisual, videoSentence, trainVid, testVid)``, each ``video*`` a
    dict keyed by dialogue id. Label indices are ``hap, sad, neu, ang, exc, fru`` and come out as ``happy,
    sad, neutral, angry, excited, frustrated``; speakers are IEMOCAP's ``M`` / ``F``. IEMOCAP has no dev
    split in this form: ``split`` is ``train`` or ``test``.
``jsonl``
    Our plain format for users' own data, one conversation per line (blank lines are skipped)::

        {"conversation_id": "c-1", "dataset": "support",
         "turns": [{"speaker": "Customer", "text": "My order never came.", "label": "anger"},
                   {"speaker": "Agent", "text": "Sorry! Let me check."}]}

    ``conversation_id`` (string, unique in the file) and ``turns`` (a non-empty list) are required; each
    turn needs a non-empty ``speaker`` and a ``text`` string. ``dataset`` (default ``"jsonl"``) and a turn's
    ``label`` (default none) are optional; labels are kept raw. A comment thread gives turns an ``id`` and
    ``reply_to`` (the parent's ``id``): a reply's window is then its chain of ancestors, as in the stream
    (``model_store.examples.Target.window``). Other keys are ignored.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import pickle
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASETS: tuple[str, ...] = ("meld", "emorynlp", "iemocap", "jsonl")
SPLITS: tuple[str, ...] = ("train", "dev", "test")
# COSMIC's label index order for IEMOCAP: {'hap': 0, 'sad': 1, 'neu': 2, 'ang': 3, 'exc': 4, 'fru': 5}.
IEMOCAP_LABELS: tuple[str, ...] = ("happy", "sad", "neutral", "angry", "excited", "frustrated")

StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class Utterance:
    speaker: str
    text: str
    label: str | None
    message_id: str | None = None  # jsonl ``id``: what a reply's ``reply_to`` names
    reply_to: str | None = None  # jsonl ``reply_to``: the parent's id, in a comment thread


@dataclass(frozen=True)
class Conversation:
    dataset: str
    conversation_id: str
    utterances: tuple[Utterance, ...]


# --------------------------------------------------------------------------------------------------
# Text cleaning

# Characters cp1252 puts at 0x80-0x9f; UTF-8 bytes mis-decoded as cp1252 show up as these.
_CP1252_HIGH = "".join(ch for ch in bytes(range(0x80, 0xA0)).decode("cp1252", errors="ignore"))
# A UTF-8 lead byte (as a latin-1/cp1252 char) followed by as many continuation bytes as it announces, each
# a C1 control, a latin-1 char 0xa0-0xbf or the cp1252 char for 0x80-0x9f. Only runs that decode as valid
# UTF-8 are replaced, so real accented text ("café") is left alone.
_CONT = f"[\u0080-\u00bf{re.escape(_CP1252_HIGH)}]"
_MOJIBAKE = re.compile(f"[\u00c2-\u00df]{_CONT}|[\u00e0-\u00ef]{_CONT}{{2}}|[\u00f0-\u00f4]{_CONT}{{3}}")
_PLAIN = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
    "\u2026": "...", "\u2014": "--", "\u2013": "-", "\u2012": "-", "\u2212": "-",
    "\u00a0": " ", "\u200b": "", "\ufeff": "",
})


def _unmojibake(match: re.Match[str]) -> str:
    run = match.group(0)
    try:
        raw = bytes(ord(ch) if ord(ch) < 0x100 else ch.encode("cp1252")[0] for ch in run)
        return raw.decode("utf-8")
    except (UnicodeError, ValueError):
        return run


def _c1_to_cp1252(text: str) -> str:
    # A lone C1 control (U+0080-U+009F) is a cp1252 byte read as latin-1: "\x92" is a right quote.
    return "".join(
        bytes([ord(ch)]).decode("cp1252", errors="ignore") if 0x80 <= ord(ch) < 0xA0 else ch for ch in text
    )


def clean_text(text: str) -> str:
    """Repair mojibake, turn typographic punctuation into ASCII and collapse whitespace.

    ``"He\\u00e2\\x80\\x99s"``, ``"He\\x92s"`` and ``"He’s"`` all become ``"He's"``.
    """
    text = _MOJIBAKE.sub(_unmojibake, text)
    text = _c1_to_cp1252(text)
    text = unicodedata.normalize("NFC", text).translate(_PLAIN)
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------
# Loaders


def _id_key(value: str) -> tuple[int, int | str]:
    """Sort numerically where an id is a number, so dialogue 10 follows dialogue 9."""
    try:
        return (0, int(value))
    except ValueError:
        return (1, value)


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        content = raw.decode("cp1252", errors="replace")  # some MELD copies were saved by Excel
    rows = list(csv.DictReader(io.StringIO(content, newline=""), strict=True))
    fields = set(rows[0]) if rows else set()
    missing = [c for c in required if c not in fields]
    if rows and missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(sorted(fields))}")
    return rows


def _int(row: Mapping[str, str], column: str, path: Path, line: int) -> int:
    try:
        return int(row[column].strip())
    except (ValueError, AttributeError):
        raise ValueError(f"{path}:{line}: column {column} is not an integer: {row[column]!r}") from None


def _grouped(
    dataset: str,
    rows: Iterable[tuple[str, tuple[Any, ...], int, Utterance]],
) -> list[Conversation]:
    """Build conversations from (conversation_id, conversation sort key, turn order, utterance) rows."""
    groups: dict[str, list[tuple[int, Utterance]]] = defaultdict(list)
    keys: dict[str, tuple[Any, ...]] = {}
    for conv_id, key, order, utt in rows:
        groups[conv_id].append((order, utt))
        keys[conv_id] = key
    return [
        Conversation(dataset, conv_id, tuple(u for _, u in sorted(groups[conv_id], key=lambda t: t[0])))
        for conv_id in sorted(groups, key=lambda c: keys[c])
    ]


def load_meld(path: StrPath) -> list[Conversation]:
    """MELD's ``*_sent_emo.csv`` (see the module docstring)."""
    path = _existing(path, "meld")
    rows = _read_csv(path, ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID"))

    def parsed() -> Iterable[tuple[str, tuple[Any, ...], int, Utterance]]:
        for line, row in enumerate(rows, start=2):
            dialogue = row["Dialogue_ID"].strip()
            label = row["Emotion"].strip() or None
            utt = Utterance(clean_text(row["Speaker"]), clean_text(row["Utterance"]), label)
            yield dialogue, _id_key(dialogue), _int(row, "Utterance_ID", path, line), utt

    return _grouped("meld", parsed())


def _first_speaker(raw: str, path: Path, line: int) -> str:
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw  # tolerate a bare name
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{path}:{line}: empty Speaker list")
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line}: Speaker is not a name or a list of names: {raw!r}")
    return clean_text(value)


def load_emorynlp(path: StrPath) -> list[Conversation]:
    """EmoryNLP's ``emorynlp_*_final.csv`` (see the module docstring)."""
    path = _existing(path, "emorynlp")
    rows = _read_csv(path, ("Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode"))

    def parsed() -> Iterable[tuple[str, tuple[Any, ...], int, Utterance]]:
        for line, row in enumerate(rows, start=2):
            season, episode, scene = (_int(row, c, path, line) for c in ("Season", "Episode", "Scene_ID"))
            label = row["Emotion"].strip() or None
            utt = Utterance(_first_speaker(row["Speaker"], path, line), clean_text(row["Utterance"]), label)
            order = _int(row, "Utterance_ID", path, line)
            yield f"s{season}e{episode}c{scene}", (season, episode, scene), order, utt

    return _grouped("emorynlp", parsed())


def _iemocap_label(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    index = int(value)  # type: ignore[call-overload]  # numpy integers and floats alike
    return IEMOCAP_LABELS[index] if 0 <= index < len(IEMOCAP_LABELS) else None


def load_iemocap(path: StrPath, split: str = "test") -> list[Conversation]:
    """The COSMIC-style ``IEMOCAP_features.pkl`` (see the module docstring); ``split`` is train or test.

    Only unpickle files you trust: pickle can run code.
    """
    path = _existing(path, "iemocap")
    if split not in ("train", "test"):
        raise ValueError(f"IEMOCAP split must be 'train' or 'test' (this form has no dev split), not {split!r}")
    with path.open("rb") as fh:
        data = pickle.load(fh, encoding="latin1")  # the common copies were pickled by Python 2
    if not isinstance(data, (tuple, list)) or len(data) < 6:
        raise ValueError(f"{path}: not a COSMIC-style IEMOCAP pickle (expected a tuple of >= 6 entries)")
    video_ids, speakers, labels = data[0], data[1], data[2]
    sentences = _iemocap_sentences(data, path)
    vids = data[-2] if split == "train" else data[-1]
    conversations = []
    for vid in sorted(vids, key=str):
        utts = tuple(
            Utterance(str(spk), clean_text(str(text)), _iemocap_label(lab))
            for spk, text, lab in zip(speakers[vid], sentences[vid], labels[vid], strict=True)
        )
        if len(utts) != len(video_ids[vid]):
            raise ValueError(f"{path}: dialogue {vid} has {len(video_ids[vid])} ids but {len(utts)} utterances")
        conversations.append(Conversation("iemocap", str(vid), utts))
    return conversations


def _iemocap_sentences(data: tuple[Any, ...] | list[Any], path: Path) -> Mapping[Any, Any]:
    """The dict of raw sentences: ``videoSentence`` (index 6) in the 9-tuple, else any dict of string lists."""
    candidates = ([data[6]] if len(data) == 9 else []) + list(data[3:-2])
    for entry in candidates:
        if isinstance(entry, Mapping) and entry:
            first = next(iter(entry.values()))
            if len(first) and all(isinstance(s, str) for s in first):
                return entry
    raise ValueError(f"{path}: no dict of utterance texts found (videoSentence)")


def load_jsonl(path: StrPath) -> list[Conversation]:
    """Our JSONL format (see the module docstring), in file order."""
    path = _existing(path, "jsonl")
    conversations: list[Conversation] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc}") from None
            conv = _jsonl_conversation(record, where)
            if conv.conversation_id in seen:
                raise ValueError(f"{where}: duplicate conversation_id {conv.conversation_id!r}")
            seen.add(conv.conversation_id)
            conversations.append(conv)
    return conversations


def _jsonl_conversation(record: object, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a line must be a JSON object")
    conv_id, dataset, turns = record.get("conversation_id"), record.get("dataset") or "jsonl", record.get("turns")
    if not isinstance(conv_id, str) or not conv_id:
        raise ValueError(f"{where}: conversation_id must be a non-empty string")
    if not isinstance(dataset, str):
        raise ValueError(f"{where}: dataset must be a string")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: turns must be a non-empty list")
    utts = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: turn {i} must be an object")
        speaker, text, label = turn.get("speaker"), turn.get("text"), turn.get("label")
        message_id, reply_to = turn.get("id"), turn.get("reply_to")
        for name, value in (("id", message_id), ("reply_to", reply_to)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{where}: turn {i}: {name} must be a non-empty string or absent")
        if not isinstance(speaker, str) or not speaker.strip():
            raise ValueError(f"{where}: turn {i}: speaker must be a non-empty string")
        if not isinstance(text, str):
            raise ValueError(f"{where}: turn {i}: text must be a string")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"{where}: turn {i}: label must be a string or absent")
        utts.append(Utterance(speaker.strip(), text, label or None, message_id, reply_to))
    return Conversation(dataset, conv_id, tuple(utts))


# --------------------------------------------------------------------------------------------------
# Dispatch and default files


def _existing(path: StrPath, dataset: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        hint = " (IEMOCAP is not redistributed: supply your own COSMIC-style copy)" if dataset == "iemocap" else ""
        raise FileNotFoundError(f"{dataset} data file not found: {p}{hint}")
    return p


def load_conversations(dataset: str, path: StrPath, *, split: str | None = None) -> list[Conversation]:
    """Load ``path`` in ``dataset``'s format (meld, emorynlp, iemocap, jsonl).

    ``split`` matters only for IEMOCAP, whose one pickle holds both splits (default ``test``); the other
    formats hold one split per file.
    """
    loaders: dict[str, Callable[[StrPath], list[Conversation]]] = {
        "meld": load_meld,
        "emorynlp": load_emorynlp,
        "iemocap": lambda p: load_iemocap(p, split or "test"),
        "jsonl": load_jsonl,
    }
    if dataset not in loaders:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return loaders[dataset](path)


def file_hash(path: str | Path) -> str:
    """A data file's identity (its content's SHA-256, 16 hex digits): recorded with adapters and cached results."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def default_file(data_dir: Path, dataset: str, split: str) -> Path:
    """The standard file name of ``dataset``'s ``split`` under ``data_dir`` (``Settings().data.dir``).

    IEMOCAP's one pickle holds every split. JSONL has no standard file: pass its path instead.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    if dataset == "meld":
        return data_dir / "meld" / f"{split}_sent_emo.csv"
    if dataset == "emorynlp":
        return data_dir / "emorynlp" / f"emorynlp_{split}_final.csv"
    if dataset == "iemocap":
        return data_dir / "iemocap" / "IEMOCAP_features.pkl"
    if dataset == "jsonl":
        raise ValueError("jsonl has no default file; pass the path of your .jsonl file")
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------------
# Long conversations: a TV episode's scenes joined in order


def episode_scenes(dataset: str, path: StrPath) -> list[tuple[str, list[Conversation]]]:
    """MELD's dialogues or EmoryNLP's scenes grouped per (Season, Episode), in order: ``(episode id, its scenes)``
    with ids ``<dataset>-s<season>e<episode>``, episodes in (season, episode) order.

    MELD's dialogues are ordered by their first utterance's ``StartTime``, EmoryNLP's scenes by ``Scene_ID``;
    speakers keep their names across scenes (the same characters)."""
    path = _existing(path, dataset)
    if dataset == "meld":
        rows = _read_csv(path, ("Dialogue_ID", "Season", "Episode", "StartTime"))
        order: dict[str, tuple[int, int, str]] = {}
        for line, row in enumerate(rows, start=2):
            key = (_int(row, "Season", path, line), _int(row, "Episode", path, line), _start_time(row["StartTime"]))
            dialogue = row["Dialogue_ID"].strip()
            order[dialogue] = min(order.get(dialogue, key), key)
        scenes = [(order[c.conversation_id], c) for c in load_meld(path)]
    elif dataset == "emorynlp":
        scenes = []
        for c in load_emorynlp(path):
            found = re.fullmatch(r"s(\d+)e(\d+)c(\d+)", c.conversation_id)
            assert found is not None  # load_emorynlp names scenes so
            season, episode, scene = (int(x) for x in found.groups())
            scenes.append(((season, episode, f"{scene:06d}"), c))
    else:
        raise ValueError(f"episodes are MELD's or EmoryNLP's (their rows name season and episode), not {dataset!r}")
    episodes: dict[tuple[int, int], list[tuple[str, Conversation]]] = defaultdict(list)
    for (season, episode, start), conv in scenes:
        episodes[(season, episode)].append((start, conv))
    return [(f"{dataset}-s{season}e{episode}", [c for _, c in sorted(parts, key=lambda p: p[0])])
            for (season, episode), parts in sorted(episodes.items())]


def load_episodes(dataset: str, path: StrPath, *, min_turns: int = 1) -> list[Conversation]:
    """Each episode's scenes joined into one conversation (:func:`episode_scenes`): 60–200-turn conversations from
    the data we have, for what a call-center call costs (``erc-stream bench --long``). Episodes with fewer than
    ``min_turns`` utterances are left out."""
    out = []
    for episode, scenes in episode_scenes(dataset, path):
        utterances = tuple(u for c in scenes for u in c.utterances)
        if len(utterances) >= min_turns:
            out.append(Conversation(dataset, episode, utterances))
    return out


def _start_time(value: str) -> str:
    """MELD's ``hh:mm:ss,mmm`` as a string that sorts in time order (some rows pad hours, some do not)."""
    m = re.match(r"\s*(\d+):(\d+):(\d+)[,.](\d+)", value or "")
    return "{:02d}:{:02d}:{:02d}.{:03d}".format(*(int(x) for x in m.groups())) if m else "99"
