"""Two runs' predictions on the same utterances, compared: weighted F1 of each, their difference with a paired
bootstrap standard error, and per-label F1.

    python -m bench.compare_predictions A.jsonl B.jsonl [--resamples 2000] [--json]

Each file is what ``erc-stream models eval --predictions FILE`` writes (one JSON line per utterance:
conversation, index, gold, pred). Only the utterances both runs labelled count. The standard error resamples
utterances with replacement and recomputes both scores on the same resample each time, so it is the error of the
*difference* (the two runs' errors are correlated: the same hard utterances), not of either score alone.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from statistics import pstdev

from sklearn.metrics import f1_score


def load(path: Path) -> dict[tuple[str, int], tuple[str, str]]:
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {(r["conversation"], r["index"]): (r["gold"], r["pred"]) for r in rows}


def weighted_f1(gold: list[str], pred: list[str]) -> float:
    return 100 * f1_score(gold, pred, average="weighted", zero_division=0)


def compare(a: dict, b: dict, *, resamples: int = 2000, seed: int = 0) -> dict:
    keys = sorted(a.keys() & b.keys())
    if any(a[k][0] != b[k][0] for k in keys):
        raise ValueError("the two runs disagree on gold labels: not the same data")
    gold = [a[k][0] for k in keys]
    pa, pb = [a[k][1] for k in keys], [b[k][1] for k in keys]
    rng = random.Random(seed)
    diffs = []
    for _ in range(resamples):
        idx = [rng.randrange(len(keys)) for _ in keys]
        g = [gold[i] for i in idx]
        diffs.append(weighted_f1(g, [pb[i] for i in idx]) - weighted_f1(g, [pa[i] for i in idx]))
    labels = sorted(set(gold))
    per_label = {name: [round(100 * x, 2) for x in f1_score(gold, p, labels=labels, average=None, zero_division=0)]
                 for name, p in (("a", pa), ("b", pb))}
    return {
        "n": len(keys), "only_a": len(a.keys() - b.keys()), "only_b": len(b.keys() - a.keys()),
        "weighted_f1_a": round(weighted_f1(gold, pa), 2), "weighted_f1_b": round(weighted_f1(gold, pb), 2),
        "difference_b_minus_a": round(weighted_f1(gold, pb) - weighted_f1(gold, pa), 2),
        "difference_standard_error": round(pstdev(diffs), 2), "resamples": resamples,
        "per_label_f1": {label: {"a": per_label["a"][i], "b": per_label["b"][i]} for i, label in enumerate(labels)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = compare(load(args.a), load(args.b), resamples=args.resamples)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['n']} utterances: A {result['weighted_f1_a']}  B {result['weighted_f1_b']}  "
          f"B - A {result['difference_b_minus_a']:+} ± {result['difference_standard_error']} (paired bootstrap SE)")
    for label, f in result["per_label_f1"].items():
        print(f"  {label:12s} A {f['a']:6.2f}  B {f['b']:6.2f}")


if __name__ == "__main__":
    main()
