"""Dev-set ablation of the InstructERC recipe on the embedded model (issue: model_store).

Each row trains one adapter with the same small budget and evaluates it on the same dev items through
the serving path. Resumable: a row whose result JSON exists is skipped.

    .venv/bin/python bench/ablation.py --steps 40 --speaker-steps 5 --eval-limit 300 --out docs/ablation

Writes ``<out>/<row>.json`` per row and ``<out>/ablation.md`` (the table in docs/).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROWS: dict[str, list[str]] = {
    "full (w=12, demo, speaker stage, impact)": [],
    "window 1": ["--window", "1"],
    "window 5": ["--window", "5"],
    "no demonstration": ["--no-demonstrations"],
    "no speaker stage": ["--speaker-steps", "0"],
    "no emotion impact": ["--aux-weight", "0"],
}


def slug(row: str) -> str:
    return "abl-" + "".join(c if c.isalnum() else "-" for c in row.split(" (")[0]).strip("-")


def run(cmd: list[str]) -> str:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="meld")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--speaker-steps", type=int, default=5)
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/ablation"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).parent / "erc-stream")
    results = {}
    for row, extra in ROWS.items():
        name = f"{slug(row)}-{args.dataset}"
        out = args.out / f"{name}.json"
        if out.exists():
            results[row] = json.loads(out.read_text())
            continue
        train = [exe, "models", "train", "--dataset", args.dataset, "--name", name, "--steps", str(args.steps),
                 "--speaker-steps", str(args.speaker_steps), "--threads", str(args.threads), "--no-progress", *extra]
        # a later flag wins in click, so a row's own --speaker-steps overrides the default above
        t0 = time.monotonic()
        run(train)
        train_s = time.monotonic() - t0
        window = extra[extra.index("--window") + 1] if "--window" in extra else "12"
        ev = [exe, "models", "eval", "--dataset", args.dataset, "--adapter", name, "--limit", str(args.eval_limit),
              "--window", window, "--no-zero-shot", "--json"]
        if "--no-demonstrations" in extra:
            ev.append("--no-demonstrations")
        result = json.loads(run(ev).strip().splitlines()[-1])
        result.update(train_seconds=round(train_s, 1), train_command=shlex.join(["erc-stream", *train[1:]]),
                      eval_command=shlex.join(["erc-stream", *ev[1:]]))
        out.write_text(json.dumps(result, indent=2))
        results[row] = result
    lines = [
        f"| variant ({args.dataset}, {args.steps} steps × batch 8, speaker stage {args.speaker_steps} steps; "
        f"first {args.eval_limit} dev utterances) | weighted F1 | accuracy | train s |",
        "|---|---:|---:|---:|",
    ]
    for row, r in results.items():
        lines.append(f"| {row} | {r['weighted_f1']:.1f} | {r['accuracy']:.1f} | {r['train_seconds']:.0f} |")
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
