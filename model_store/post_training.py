"""A trained adapter through the serving path: its label-prior correction, and its dev scores during training.

``calibrate`` fits the label-prior correction (``scoring/calibration.py``) on held-out *training* utterances.
The correction an adapter ships with is fitted in the dtype consumers serve it in (:func:`serving_dtype`,
float32 by default), not the one it trained in: the correction's power is a threshold on the model's label
probabilities, and bf16 weights move those enough to move it (the MELD adapter's power was 0.6 fitted in bf16,
0.2 in float32, on the same 300 utterances). ``model_store/recalibration.py`` fits an existing adapter's again.
:class:`DevSelection` keeps the best adapter of a run: every ``eval_every`` steps (and once at the end) the
adapter so far is saved as a candidate, given its own correction and scored on the dev split of each dataset
it trains on; the run publishes the candidate with the best mean weighted F1, and the others are deleted as
soon as they are beaten. Records go to ``<out>/evals.jsonl``, one line per candidate, so a resumed run knows
what it has scored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import structlog

from core.labels import get_label_set
from scoring.prompts import PromptBuilder

if TYPE_CHECKING:
    from core.settings import Settings
    from model_store.examples import Target
    from model_store.training import TrainConfig
    from scoring.calibration import Calibration

log = structlog.get_logger(__name__)


def serving_dtype(settings: Settings | None = None) -> str:
    """The weights' dtype consumers serve in: ``settings.model.dtype`` (default: the environment's settings),
    ``auto`` resolved on this machine."""
    from core.settings import Settings
    from scoring.hardware import auto_dtype

    model = (settings or Settings()).model
    return auto_dtype(model.device) if model.dtype == "auto" else model.dtype


def serving_settings(cfg: TrainConfig, store_dir: Path, dtype: str | None = None) -> Settings:
    """The settings that serve what ``cfg`` trains (HF backend), in ``dtype`` (default: the training's):
    calibration and dev evaluation use them."""
    from core.settings import Settings

    return Settings().with_overrides(
        store={"dir": str(store_dir)},
        model={"base": cfg.base, "device": cfg.device, "threads": cfg.threads, "label_set": cfg.label_set,
               "backend": "hf", "demo_position": cfg.demo_position, "layout": cfg.layout, "dtype": dtype or cfg.dtype},
        window={"size": cfg.window, "hop": cfg.hop},
        conversation={"retain_turns": cfg.window + cfg.hop - 1},
    )


def sources_dev(cfg: TrainConfig) -> list[tuple[str, str]]:
    """The dev file of every dataset of the run: ``cfg.eval_file`` (one dataset only), else each one's dev split."""
    from core.settings import Settings
    from model_store.data import default_file

    if cfg.eval_file is not None:
        if cfg.more_sources:
            raise ValueError("eval_file names one dev file; a run on several datasets scores each one's dev split")
        return [(cfg.dataset, cfg.eval_file)]
    data_dir = Settings().data.dir
    return [(d, str(default_file(data_dir, d, "dev"))) for d, _ in cfg.sources]


def calibrate(cfg: TrainConfig, store_dir: Path, adapter_dir: Path, held: Sequence[Target],
              dtype: str | None = None) -> Calibration:
    """Fit the adapter's label-prior correction on held-out training utterances, through the serving path, with
    weights in ``dtype`` (default: the training's, ``auto`` resolved)."""
    from dataclasses import replace

    from model_store.loading import load_backend
    from scoring.adapters import AdapterChoice, AdapterRef
    from scoring.calibration import fit
    from scoring.hardware import auto_dtype
    from scoring.labeler import Failed, Labeler

    dtype = dtype or cfg.dtype
    dtype = auto_dtype(cfg.device) if dtype == "auto" else dtype
    settings = serving_settings(cfg, store_dir, dtype)
    backend = load_backend(settings)
    try:
        builder = PromptBuilder.configured(settings, get_label_set(cfg.label_set), backend.count_tokens)
        labeler = Labeler(backend, builder)
        demos = None
        if cfg.demonstrations:
            from model_store.retrieval import DemoIndex

            demos = DemoIndex.load(adapter_dir / "demos")
        labeler.use(AdapterChoice(AdapterRef(cfg.name, adapter_dir), demos, layout=cfg.layout))
        dists, gold = [], []
        for i in range(0, len(held), 16):
            chunk = held[i: i + 16]
            for t, result in zip(chunk, labeler.label([t.window(builder.window.span) for t in chunk])):
                if not isinstance(result, Failed):
                    dists.append(result.probabilities)
                    gold.append(t.label)
        return replace(fit(dists, gold), dtype=dtype)
    finally:
        backend.close()


class DevSelection:
    """A run's dev-scored candidates: which steps are scored, which is best, and publishing it."""

    def __init__(self, cfg: TrainConfig, store_dir: Path, out_dir: Path, held: Sequence[Target]) -> None:
        self.cfg = cfg
        self.store_dir = store_dir
        self.out_dir = out_dir
        self.held = held
        self.records_file = out_dir / "evals.jsonl"
        self.records: list[dict] = ([json.loads(line) for line in self.records_file.read_text().splitlines() if line]
                                    if self.records_file.exists() else [])

    @property
    def candidates(self) -> Path:
        return self.out_dir / "candidates"

    def scored(self, step: int) -> bool:
        return any(r["step"] == step for r in self.records)

    @property
    def best(self) -> dict | None:
        return max(self.records, key=lambda r: (r["score"], r["step"])) if self.records else None

    def evaluate(self, model, step: int) -> dict:
        """Save ``model`` (a peft model) as the candidate of ``step``, calibrate and score it, keep it if best."""
        cand = self.candidates / f"step-{step:06d}"
        shutil.rmtree(cand, ignore_errors=True)
        model.save_pretrained(cand)
        return self.evaluate_dir(cand, step)

    def evaluate_dir(self, cand: Path, step: int) -> dict:
        from model_store.evaluation_runs import run_eval

        cfg = self.cfg
        if (self.out_dir / "demos").exists() and not (cand / "demos").exists():
            shutil.copytree(self.out_dir / "demos", cand / "demos")
        meta = {"name": cfg.name, "kind": cfg.kind, "base": cfg.base, "label_set": cfg.label_set,
                "demonstrations": cfg.demonstrations, "window": cfg.window, "hop": cfg.hop, "layout": cfg.layout,
                "step": step}
        (cand / "erc_meta.json").write_text(json.dumps(meta, indent=2))
        if self.held:
            meta["calibration"] = calibrate(cfg, self.store_dir, cand, self.held).as_dict()
            (cand / "erc_meta.json").write_text(json.dumps(meta, indent=2))
        settings = serving_settings(cfg, self.store_dir)
        scores = {}
        for dataset, dev_file in sources_dev(cfg):
            report = run_eval(settings, dataset=dataset, file=Path(dev_file), adapter=str(cand),
                              limit=cfg.eval_limit, zero_shot=False, batch_size=32)
            scores[dataset] = {k: report[k] for k in ("weighted_f1", "accuracy", "n", "per_label_f1")}
        record = {"step": step, "score": round(sum(s["weighted_f1"] for s in scores.values()) / len(scores), 2),
                  "dev": scores, "calibration": meta.get("calibration")}
        self.records.append(record)
        with self.records_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        best = self.best
        for other in self.candidates.glob("step-*"):  # only the best candidate is kept
            if best is not None and other.name != f"step-{best['step']:06d}":
                shutil.rmtree(other, ignore_errors=True)
        log.info("dev evaluation", step=step, score=record["score"], best_step=best["step"] if best else None)
        return record

    def publish_best(self) -> dict | None:
        """Put the best candidate's weights in ``out_dir`` (where the final ones were saved); its record."""
        best = self.best
        if best is None:
            return None
        cand = self.candidates / f"step-{best['step']:06d}"
        for f in cand.glob("adapter_*"):
            shutil.copy2(f, self.out_dir / f.name)
        shutil.rmtree(self.candidates, ignore_errors=True)
        return best
