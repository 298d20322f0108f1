"""``models eval``: load data and models, evaluate, compare with the baselines, record the result."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from core.labels import get_label_set
from core.settings import Settings
from model_store.data import Conversation, default_file, file_hash, load_conversations
from model_store.evaluation import evaluate
from model_store.loading import NO_ADAPTER, choose_adapter, load_backend
from model_store.registry import Registry
from scoring.adapters import AdapterChoice


def run_eval(
    settings: Settings, *, dataset: str, file: Path | None, split: str = "dev", adapter: str | None = None,
    dialogues: int | None = None, limit: int | None = None, window: int | None = None, demonstrations: bool = True,
    zero_shot: bool = True, confusion: Path | None = None, batch_size: int = 16, progress: bool = False,
    calibrated: bool = True, conversations: Sequence[Conversation] | None = None, predictions: Path | None = None,
    record_as: str | None = None,
) -> dict:
    """``dataset``'s ``split`` (or ``file``) scored through the serving path; ``conversations`` instead of a
    file: those (their ``dataset`` names them in the report). The adapter records the result under ``record_as``
    (default ``dataset:split``) among its evaluations."""
    if conversations is None:
        path = Path(file) if file else default_file(settings.data.dir, dataset, split)
        conversations = load_conversations(dataset, path, split=split)
        source, source_hash = str(path), file_hash(path)
    else:
        source = f"<{dataset}>"
        source_hash = hashlib.sha256(repr([(c.conversation_id, c.utterances) for c in conversations]).encode()
                                     ).hexdigest()[:16]
    conversations = list(conversations)[:dialogues]
    label_set = get_label_set(settings.model.label_set)
    backend = load_backend(settings)
    choice = choose_adapter(settings, adapter)
    if not calibrated:
        choice = replace(choice, calibration=None)
    common = dict(dataset=dataset, file=source, label_set=label_set, window=window, batch_size=batch_size,
                  limit=limit, progress=progress)
    report = evaluate(settings, backend, choice, conversations, use_demonstrations=demonstrations,
                      confusion=confusion, predictions=predictions, **common).as_dict()
    report["baselines"] = {"majority_weighted_f1": report["majority_weighted_f1"]}
    if zero_shot and choice.ref is not None:
        key = hashlib.sha256(json.dumps([backend.model_id, source_hash, dialogues, limit, label_set.name,
                                         window or settings.window.size, settings.window.hop,
                                         settings.model.max_prompt_tokens]).encode()
                             ).hexdigest()[:16]
        cache = settings.store.dir / "evals" / f"zero-shot-{key}.json"
        if cache.exists():
            zs = json.loads(cache.read_text())
        else:
            zs = evaluate(settings, backend, AdapterChoice(None), conversations, **common).as_dict()
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(zs))
        report["baselines"]["zero_shot_weighted_f1"] = zs["weighted_f1"]
    best = max(report["baselines"].values())
    report["margin_over_best_baseline"] = round(report["weighted_f1"] - best, 2)
    report["calibrated"] = choice.calibration is not None
    if choice.ref is not None and dialogues is None and limit is None and calibrated and adapter != NO_ADAPTER:
        Registry(settings.store.dir).record_eval(choice.ref.key, record_as or f"{dataset}:{split}", {
            k: report[k] for k in ("weighted_f1", "accuracy", "n", "per_label_f1", "baselines")})
    return report
