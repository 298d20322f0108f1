"""``models sweep``: the paper's data-scaling study as a command.

A grid of cells (mixing strategy x fraction x LoRA/full), each trained on the unified label set and
evaluated on every dataset's dev split in the unified labels. ``single`` trains one cell per dataset
on that dataset alone; ``total`` and ``ratio`` train one cell on all datasets (see
``model_store.training``). Every cell's result is one JSON file under ``<out>/cells``: a rerun skips
finished cells, and an interrupted training resumes from its checkpoint, so the sweep is resumable at
any point. The table (CSV and Markdown) and the plot are rebuilt from the cell files each time.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

import structlog

from core.labels import get_label_set
from core.settings import Settings
from model_store.training import TrainConfig, changed_options, train, with_epochs

log = structlog.get_logger(__name__)

Strategy = Literal["single", "total", "ratio"]
STRATEGIES: tuple[Strategy, ...] = ("single", "total", "ratio")


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    strategy: Strategy
    fraction: Fraction
    kind: Literal["lora", "full"] = "lora"
    dataset: str | None = None  # the one dataset of a ``single`` cell

    @property
    def name(self) -> str:
        who = f"single-{self.dataset}" if self.strategy == "single" else self.strategy
        return f"sweep-{who}-{self.kind}-f{self.fraction.numerator}_{self.fraction.denominator}"


@dataclass(frozen=True)
class SweepPlan:
    """What the sweep trains and how each cell is evaluated (recorded with every cell)."""

    datasets: tuple[str, ...]
    fractions: tuple[Fraction, ...]
    strategies: tuple[Strategy, ...] = STRATEGIES
    full_fractions: tuple[Fraction, ...] = ()  # also train a --full twin of the total-mix cell here
    epochs: float = 1.0
    min_steps: int = 20
    speaker_steps: int = 0
    window: int = 12
    max_tokens: int = 256
    eval_limit: int | None = 200  # the first N dev utterances of each dataset (None = all)
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # How each cell's batches are made (model_store.training.TrainConfig): "blocks" packs a conversation's turns.
    batching: Literal["draws", "blocks"] = "draws"
    batch_size: int = 8

    def cells(self) -> list[Cell]:
        out: list[Cell] = []
        for f in self.fractions:
            for s in self.strategies:
                if s == "single":
                    out += [Cell("single", f, dataset=d) for d in self.datasets]
                else:
                    out.append(Cell(s, f))
            if f in self.full_fractions:
                out.append(Cell("total", f, kind="full"))
        return out

    def train_config(self, cell: Cell, settings: Settings) -> TrainConfig:
        from model_store.data import default_file

        datasets = (cell.dataset,) if cell.strategy == "single" else self.datasets
        files = [str(default_file(settings.data.dir, d, "train")) for d in datasets]
        cfg = TrainConfig(
            name=cell.name, dataset=datasets[0], train_file=files[0], more_sources=tuple(zip(datasets[1:], files[1:])),
            mix="ratio" if cell.strategy == "ratio" else "total", full=cell.kind == "full", label_set="unified",
            window=self.window, max_tokens=self.max_tokens, speaker_steps=self.speaker_steps, demonstrations=False,
            fraction=float(cell.fraction), lr=5e-5 if cell.kind == "full" else 1e-3, seed=self.seed,
            threads=self.threads, device=self.device, dtype=self.dtype, checkpoint_every=25,
            batching=self.batching, batch_size=self.batch_size,
        )
        cfg = with_epochs(cfg, self.epochs)
        return replace(cfg, steps=max(cfg.steps, self.min_steps))


def run_sweep(plan: SweepPlan, settings: Settings, out: Path, *, progress: bool = False) -> list[dict]:
    """Train and evaluate every unfinished cell, then write the table and plot; returns every cell's row."""
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    current = _plan_dict(plan)
    cells = list(plan.cells())
    for cell in cells:
        path = cells_dir / f"{cell.name}.json"
        if path.exists() and _same_plan(json.loads(path.read_text()), current):
            continue
        log.info("sweep cell", cell=cell.name, replaces_another_plan=path.exists())
        row = run_cell(plan, cell, settings, progress=progress)
        path.write_text(json.dumps(row, indent=2))
        # after every cell, not only at the end: a grid carried across sessions shows what is in so far
        _rebuild(plan, cells_dir, out, planned=len(cells))
    return _rebuild(plan, cells_dir, out, planned=len(cells))


def _rebuild(plan: SweepPlan, cells_dir: Path, out: Path, *, planned: int) -> list[dict]:
    """The table and plot from the cells made under ``plan`` (those of another plan are left out)."""
    current = _plan_dict(plan)
    rows = [row for p in sorted(cells_dir.glob("*.json")) if _same_plan(row := json.loads(p.read_text()), current)]
    write_table(rows, plan.datasets, out, planned=planned)
    plot(rows, plan.datasets, out / "sweep.png")
    return rows


def run_cell(plan: SweepPlan, cell: Cell, settings: Settings, *, progress: bool = False) -> dict:
    cfg = plan.train_config(cell, settings)
    started = time.monotonic()
    model_dir = train(cfg, store_dir=settings.store.dir, progress=progress, command=f"models sweep: {cell.name}")
    meta = json.loads((model_dir / "erc_meta.json").read_text())
    scores = evaluate_cell(plan, settings, model_dir, cell.kind)
    return {
        "cell": cell.name, "strategy": cell.strategy, "trained_on": cell.dataset or "+".join(plan.datasets),
        "kind": cell.kind, "fraction": str(cell.fraction), "fraction_value": float(cell.fraction),
        "train_utterances": meta["examples"]["main"], "steps": cfg.steps, "train_seconds": meta["train"]["seconds"],
        "seconds": round(time.monotonic() - started, 1), "plan": _plan_dict(plan),
        **{f"{d}_weighted_f1": s["weighted_f1"] for d, s in scores.items()},
        **{f"{d}_majority_weighted_f1": s["majority_weighted_f1"] for d, s in scores.items()},
        **{f"{d}_n": s["n"] for d, s in scores.items()},
    }


def evaluate_cell(plan: SweepPlan, settings: Settings, model_dir: Path, kind: str) -> dict[str, dict]:
    """One cell's model on every dataset's dev split, in the unified labels, through the serving path
    (one model load for all of them)."""
    from model_store.data import default_file, load_conversations
    from model_store.evaluation import evaluate
    from model_store.loading import choose_adapter, load_backend

    model = {"label_set": "unified", "backend": "hf", "device": plan.device, "threads": plan.threads,
             "dtype": plan.dtype}
    if kind == "full":  # a whole model: served as the base, without adapter
        model |= {"base": str(model_dir), "adapter": "none"}
    else:
        model |= {"adapter": str(model_dir)}
    s = settings.with_overrides(model=model)
    backend = load_backend(s)
    try:
        choice = choose_adapter(s)
        reports = {}
        for dataset in plan.datasets:
            path = default_file(settings.data.dir, dataset, "dev")
            reports[dataset] = evaluate(s, backend, choice, load_conversations(dataset, path, split="dev"),
                                        dataset=dataset, file=str(path), label_set=get_label_set("unified"),
                                        window=plan.window, limit=plan.eval_limit).as_dict()
        return reports
    finally:
        backend.close()


def _plan_dict(plan: SweepPlan) -> dict:
    d = asdict(plan)
    d["fractions"] = [str(f) for f in plan.fractions]
    d["full_fractions"] = [str(f) for f in plan.full_fractions]
    return d


# Plan fields that do not shape a cell's result: its speed, and which other cells the grid holds.
_NOT_CELL_SHAPING = frozenset({"threads", "strategies", "fractions", "full_fractions"})


def _same_plan(row: dict, plan: dict) -> bool:
    """Whether a cell's file was made under this plan: a rerun with other epochs (or batching, window, ...)
    trains the cell again, and the table holds one plan's cells only."""
    return not changed_options(row.get("plan", {}), plan, ignore=_NOT_CELL_SHAPING)


def _ordered(rows: Sequence[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (-r["fraction_value"], STRATEGIES.index(r["strategy"]), r["trained_on"], r["kind"]))


def _by_fraction(rows: Sequence[dict]) -> list[dict]:
    """One row per fraction, smallest first."""
    return sorted({r["fraction_value"]: r for r in rows}.values(), key=lambda r: r["fraction_value"])


def write_table(rows: Sequence[dict], datasets: Sequence[str], out: Path, *, planned: int | None = None) -> None:
    """``sweep.csv`` (every field) and ``sweep.md`` (the figures a reader compares); ``planned``: the grid's
    number of cells, so a table of fewer says it is partial."""
    rows = _ordered(rows)
    if not rows:
        return
    fields = [k for k in rows[0] if k != "plan"]
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    head = ["fraction", "strategy", "trained on", "kind", "train utt.", "steps", "train s"]
    head += [f"{d} W-F1" for d in datasets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["fraction"], r["strategy"], r["trained_on"], r["kind"], str(r["train_utterances"]), str(r["steps"]),
                 f"{r['train_seconds']:.0f}"]
        cells += [f"{r[f'{d}_weighted_f1']:.2f}" for d in datasets]
        lines.append("| " + " | ".join(cells) + " |")
    base = rows[0]
    lines.append("")
    lines.append("Majority baseline (unified labels, same dev utterances): " + ", ".join(
        f"{d} {base[f'{d}_majority_weighted_f1']:.2f} (n={base[f'{d}_n']})" for d in datasets))
    if planned is not None and len(rows) < planned:
        lines.append("")
        lines.append(f"Partial: {len(rows)} of the plan's {planned} cells are in; rerunning the command trains the rest.")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def plot(rows: Sequence[dict], datasets: Sequence[str], path: Path) -> None:
    """W-F1 on each dataset against the training fraction, one line per strategy (the paper's Figure 4 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["strategy"] == "single" and r["trained_on"] != d:
                continue  # a single-dataset cell is drawn on its own dataset's panel only
            label = f"{r['strategy']} ({r['kind']})" if r["kind"] != "lora" else r["strategy"]
            lines.setdefault(label, []).append((r["fraction_value"], r[f"{d}_weighted_f1"]))
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if "full" not in label else "s",
                    linestyle="-" if "full" not in label else "none", label=label)
        # the score of always answering the dev split's most frequent label: a cell near it learned little
        ax.axhline(rows[0][f"{d}_majority_weighted_f1"], color="grey", linestyle=":", label="majority class")
        ax.set_xscale("log", base=2)
        ticks = _by_fraction(rows)
        ax.set_xticks([r["fraction_value"] for r in ticks], [r["fraction"] for r in ticks])
        ax.minorticks_off()
        ax.set_xlabel("fraction of the training data")
        ax.set_ylabel("weighted F1 (unified labels)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
