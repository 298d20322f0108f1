"""Evaluation through the serving path: the same prompt builder, retrieval, labeler and backend.

Weighted F1 over all classes (as the paper reports), accuracy, per-label F1, a majority-class
baseline on the same items and a confusion-matrix PNG.
"""

from __future__ import annotations

import json

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from core.labels import LabelSet, get_label_set
from core.settings import Settings
from model_store.data import Conversation
from model_store.examples import Target, targets
from scoring.adapters import AdapterChoice
from scoring.backends.base import Backend
from scoring.labeler import Failed, Labeler
from scoring.prompts import PromptBuilder


@dataclass
class EvalReport:
    dataset: str
    file: str
    label_set: str
    model: str
    adapter: str | None
    window: int
    hop: int
    demonstrations: bool
    n: int
    weighted_f1: float
    accuracy: float
    majority_label: str
    majority_weighted_f1: float
    per_label_f1: dict[str, float]
    support: dict[str, int]
    seconds: float
    failed: int = 0
    confusion_png: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    present = [lab for lab in labels if lab in set(gold) | set(pred)]
    per = f1_score(gold, pred, labels=present, average=None, zero_division=0)
    majority = Counter(gold).most_common(1)[0][0]
    return {
        "weighted_f1": round(100 * f1_score(gold, pred, labels=present, average="weighted", zero_division=0), 2),
        "accuracy": round(100 * accuracy_score(gold, pred), 2),
        "per_label_f1": {lab: round(100 * float(v), 2) for lab, v in zip(present, per)},
        "majority_label": majority,
        "majority_weighted_f1": round(
            100 * f1_score(gold, [majority] * len(gold), labels=present, average="weighted", zero_division=0), 2),
        "support": dict(Counter(gold)),
    }


def confusion_png(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay.from_predictions(gold, pred, labels=list(labels), ax=ax, colorbar=False,
                                            xticks_rotation=45, normalize=None)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate(
    settings: Settings,
    backend: Backend,
    choice: AdapterChoice,
    conversations: Sequence[Conversation],
    *,
    dataset: str,
    file: str,
    label_set: LabelSet | None = None,
    window: int | None = None,
    use_demonstrations: bool = True,
    batch_size: int = 16,
    limit: int | None = None,
    confusion: Path | None = None,
    progress: bool = False,
    predictions: Path | None = None,
) -> EvalReport:
    """Label every utterance of ``conversations`` (at most ``limit``) and score against the gold labels; with
    ``predictions``, write each one's (conversation, index, gold, predicted label) there as JSON lines, so that
    two runs can be compared utterance by utterance (``python -m bench.compare_predictions``)."""
    from rich.progress import Progress

    label_set = label_set or get_label_set(settings.model.label_set)
    builder = PromptBuilder.configured(settings, label_set, backend.count_tokens, size=window)
    span = builder.window.span
    labeler = Labeler(backend, builder)
    labeler.use(choice)
    if not use_demonstrations:
        labeler.demonstrations = None
    items: list[Target] = targets(conversations, label_set)[:limit]
    # Batches of similar length waste less compute on padding; the metrics do not depend on order.
    items.sort(key=lambda t: sum(len(turn.text) for turn in t.window(span)))
    gold, pred, failed = [], [], 0
    rows: list[dict] = []
    started = time.monotonic()
    with Progress(disable=not progress) as bar:
        task = bar.add_task("evaluating", total=len(items))
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            for t, result in zip(chunk, labeler.label([t.window(span) for t in chunk])):
                if isinstance(result, Failed):
                    failed += 1
                    continue
                gold.append(t.label)
                pred.append(result.label)
                rows.append({"conversation": t.conversation.conversation_id, "index": t.index, "gold": t.label,
                             "pred": result.label})
            bar.advance(task, len(chunk))
    m = metrics(gold, pred, label_set.labels)
    if predictions is not None:
        predictions.parent.mkdir(parents=True, exist_ok=True)
        predictions.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: (r["conversation"],
                                                                                               r["index"]))))
    png = None
    if confusion is not None:
        png = str(confusion_png(gold, pred, label_set.labels, confusion,
                                f"{dataset} · {choice.name or 'zero-shot'} · W-F1 {m['weighted_f1']:.1f}"))
    return EvalReport(
        dataset=dataset, file=file, label_set=label_set.name, model=backend.model_id, adapter=choice.name,
        window=builder.window.size, hop=builder.window.hop, demonstrations=labeler.demonstrations is not None,
        n=len(gold),
        seconds=round(time.monotonic() - started, 1), failed=failed, confusion_png=png, **m,
    )
