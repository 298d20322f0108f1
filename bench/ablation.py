"""Dev-set ablation of the InstructERC recipe on the embedded model (issue: model_store).

Each row trains one adapter with the same budget and evaluates it on the same dev utterances through the
serving path (``run_eval``: prompt builder, retrieval, labeler, backend, the adapter's calibration).
Rows run as worker processes of this script, ``--parallel`` at a time (on a GPU several small trainings
share the device well; on 2 CPU cores keep 1). Resumable: a row whose result JSON exists is skipped.

    # 2 CPU cores (hours):
    .venv/bin/python -m bench.ablation --steps 90 --eval-limit 300 --out docs/ablation
    # a GPU box (minutes), all rows at once:
    python -m bench.ablation --device cuda --parallel 8 --steps 1200 --out docs/ablation

``--embeddings FILE`` (an .npz of ``texts`` and ``vectors``, written by ``--write-embeddings``) replaces the
sentence encoder by a table lookup, for machines that hold the LLM but not the encoder's wheel.
Writes ``<out>/<row>.json`` per row and ``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

#: row → TrainConfig changes from the full recipe (w=12, demonstration, speaker stage, emotion impact).
ROWS: dict[str, dict] = {
    "recipe (w=12, speaker stage, emotion impact, no demonstration)": {"demonstrations": False},
    "window 1": {"demonstrations": False, "window": 1},
    "window 5": {"demonstrations": False, "window": 5},
    "no speaker stage": {"demonstrations": False, "speaker_steps": 0},
    "no emotion impact": {"demonstrations": False, "aux_weight": 0.0},
    "+ demonstration, same-label pairing (paper)": {},
    "+ demonstration, nearest pairing (as served)": {"demo_pairing": "nearest"},
    "label balance 0.5": {"demonstrations": False, "balance": 0.5},
}


def slug(row: str) -> str:
    return "abl-" + "-".join("".join(c if c.isalnum() else " " for c in row.split(" (")[0]).split())


def train_flags(cfg, name: str) -> list[str]:
    out = ["models", "train", "--dataset", cfg.dataset, "--name", name, "--speaker-steps", str(cfg.speaker_steps),
           "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--window", str(cfg.window),
           "--aux-weight", str(cfg.aux_weight), "--balance", str(cfg.balance), "--calibration", str(cfg.calibration),
           "--device", cfg.device, "--no-progress"]
    if cfg.threads:
        out += ["--threads", str(cfg.threads)]
    if not cfg.demonstrations:
        out.append("--no-demonstrations")
    elif cfg.demo_pairing != "same_label":
        out += ["--demo-pairing", cfg.demo_pairing]
    return out


def use_embedding_table(path: Path) -> None:
    """Replace the sentence encoder by a lookup in a precomputed table (unknown texts: zero vector, counted)."""
    import numpy as np

    import model_store.retrieval as retrieval

    data = np.load(path, allow_pickle=False)
    table = {t: i for i, t in enumerate(data["texts"].tolist())}
    vectors = data["vectors"].astype(np.float32)
    misses = {"n": 0}

    def embed(texts):
        out = np.zeros((len(texts), vectors.shape[1]), np.float32)
        for i, t in enumerate(texts):
            j = table.get(t)
            if j is None:
                misses["n"] += 1
            else:
                out[i] = vectors[j]
        return out

    retrieval.embed = embed
    retrieval.EMBED_MISSES = misses  # type: ignore[attr-defined]


def base_config(args):
    from core.settings import Settings
    from model_store.data import default_file
    from model_store.training import TrainConfig

    settings = Settings()
    return settings, TrainConfig(
        name="abl", dataset=args.dataset, train_file=str(default_file(settings.data.dir, args.dataset, "train")),
        label_set=args.dataset, speaker_steps=args.speaker_steps, steps=args.steps, batch_size=args.batch_size,
        calibration=args.calibration, threads=args.threads, device=args.device, checkpoint_every=10**9,
        demo_position=settings.model.demo_position, seed=args.seed,
    )


def worker(args, row: str) -> None:
    if args.embeddings:
        use_embedding_table(args.embeddings)
    import torch

    from model_store.evaluation_runs import run_eval
    from model_store.training import train

    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    settings, cfg = base_config(args)
    name = f"{slug(row)}-{args.dataset}"
    cfg = replace(cfg, name=name, **ROWS[row])
    flags = train_flags(cfg, name)
    t0 = time.monotonic()
    path = train(cfg, store_dir=settings.store.dir, progress=False, command="erc-stream " + shlex.join(flags))
    train_s = time.monotonic() - t0
    meta = json.loads((path / "erc_meta.json").read_text())
    ev_settings = settings.with_overrides(model={"device": args.device, "threads": args.threads,
                                                 "label_set": args.dataset})
    common = dict(dataset=args.dataset, file=None, adapter=name, limit=args.eval_limit, window=cfg.window,
                  demonstrations=cfg.demonstrations, zero_shot=False, batch_size=32)
    report = run_eval(ev_settings, **common)
    raw = run_eval(ev_settings, calibrated=False, **common) if meta.get("calibration") else report
    ev = ["models", "eval", "--dataset", args.dataset, "--adapter", name, "--window", str(cfg.window),
          "--no-zero-shot", "--json"] + (["--limit", str(args.eval_limit)] if args.eval_limit else [])
    if not cfg.demonstrations:
        ev.append("--no-demonstrations")
    import model_store.retrieval as retrieval

    result = {
        "row": row, "weighted_f1": report["weighted_f1"], "accuracy": report["accuracy"], "n": report["n"],
        "per_label_f1": report["per_label_f1"], "majority_weighted_f1": report["majority_weighted_f1"],
        "weighted_f1_uncalibrated": raw["weighted_f1"], "calibration": meta.get("calibration"), "train": meta["train"], "train_seconds": round(train_s, 1),
        "eval_seconds": report["seconds"], "device": args.device,
        "train_command": "erc-stream " + shlex.join(flags), "eval_command": "erc-stream " + shlex.join(ev),
        "embedding_misses": getattr(retrieval, "EMBED_MISSES", {}).get("n"),
    }
    out = args.out / f"{name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("row", "weighted_f1", "accuracy", "train_seconds")}), flush=True)


def prepare(args) -> None:
    """What every worker needs, made once: the converted base model and the training retrieval index."""
    if args.embeddings:
        use_embedding_table(args.embeddings)
    from model_store.base_models import resolve_base
    from model_store.data import load_conversations
    from model_store.training import training_index

    settings, cfg = base_config(args)
    resolve_base(cfg.base, settings.store.dir)
    training_index(cfg, load_conversations(cfg.dataset, cfg.train_file, split="train"), settings.store.dir)


def write_embeddings(args) -> None:
    """Embed every utterance text of the dataset's train and dev splits (for ``--embeddings``)."""
    import numpy as np

    from core.settings import Settings
    from model_store.data import default_file, load_conversations
    from model_store.retrieval import embed

    settings = Settings()
    texts: dict[str, None] = {}
    for split in ("train", "dev"):
        for conv in load_conversations(args.dataset, default_file(settings.data.dir, args.dataset, split), split=split):
            for u in conv.utterances:
                texts[u.text] = None
                texts[u.text.strip()] = None
    keys = list(texts)
    np.savez_compressed(args.write_embeddings, texts=np.array(keys), vectors=embed(keys).astype(np.float16))
    print(f"{len(keys)} texts embedded into {args.write_embeddings}")


def table(args, results: dict[str, dict]) -> str:
    frac = f"{args.steps} steps × batch {args.batch_size}"
    lines = [
        f"| variant ({args.dataset}; {frac}, speaker stage {args.speaker_steps} steps; "
        f"{'first ' + str(args.eval_limit) if args.eval_limit else 'all'} dev utterances) "
        "| weighted F1 | accuracy | W-F1 before calibration | calibration power | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        r = results.get(row)
        if r is None:
            lines.append(f"| {row} | – | – | – | – | – |")
            continue
        cal = r.get("calibration") or {}
        lines.append(f"| {row} | {r['weighted_f1']:.1f} | {r['accuracy']:.1f} | "
                     f"{r['weighted_f1_uncalibrated']:.1f} | "
                     f"{cal.get('power', '–')} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="meld")
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--speaker-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=None, help="Only the first N dev utterances (default: all).")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default=None, help="Comma-separated row slugs to run (default: all).")
    ap.add_argument("--embeddings", type=Path, default=None)
    ap.add_argument("--write-embeddings", type=Path, default=None)
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--out", type=Path, default=Path("docs/ablation"))
    args = ap.parse_args()
    if args.write_embeddings:
        return write_embeddings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.row:
        return worker(args, args.row)
    wanted = [r for r in ROWS if args.rows is None or slug(r) in args.rows.split(",")]
    todo = [r for r in wanted if not (args.out / f"{slug(r)}-{args.dataset}.json").exists()]
    if todo:
        prepare(args)
    running: list[subprocess.Popen] = []
    for row in todo:
        while sum(p.poll() is None for p in running) >= args.parallel:
            time.sleep(0.5)
        print("+ row", row, flush=True)
        running.append(subprocess.Popen([sys.executable, "-m", "bench.ablation", *sys.argv[1:], "--row", row]))
    failed = sum(p.wait() != 0 for p in running)
    results = {}
    for row in ROWS:
        f = args.out / f"{slug(row)}-{args.dataset}.json"
        if f.exists():
            results[row] = json.loads(f.read_text())
    (args.out / "ablation.md").write_text(table(args, results))
    print(table(args, results))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
