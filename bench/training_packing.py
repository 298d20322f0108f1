"""What prefix-tree packing saves in training: tokens per batch, and seconds per step when asked.

Builds the training examples of a dataset as ``erc-stream models train`` does, draws the batches of both
batchings, and counts per batch the tokens a step computes: left-padded rows (``--no-packing``), the rows'
own tokens (a perfect padding-free batch) and the packed tries (``model_store.packing``). ``--time-steps N``
also times N optimizer-free steps (forward + backward) of each on this machine.

    ERC_DATA__DIR=../shared/data python -m bench.training_packing --dataset meld --batches 40 --json
    ERC_DATA__DIR=../shared/data python -m bench.training_packing --dataset meld --time-steps 5 --lora-modules all
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean

from core.settings import Settings


def measure(dataset: str, *, batches: int, batch_size: int, impact_per_batch: int, max_tokens: int,
            time_steps: int, target_modules: tuple[str, ...], lora_r: int, threads: int) -> dict:
    import tempfile

    import torch

    from core.labels import get_label_set
    from model_store.base_models import resolve_base
    from model_store.data import default_file
    from model_store.packing import pack
    from model_store.training import TrainConfig, Trainer, build_examples, load_sources, schedule
    from scoring.hardware import auto_dtype
    from scoring.prompts import PromptBuilder, WindowShape

    settings = Settings()
    cfg = TrainConfig(name="bench", dataset=dataset, train_file=str(default_file(settings.data.dir, dataset, "train")),
                      label_set=dataset, speaker_steps=0, steps=batches, batch_size=batch_size,
                      impact_per_batch=impact_per_batch, max_tokens=max_tokens, demonstrations=False,
                      hop=settings.window.hop, target_modules=target_modules, lora_r=lora_r, lora_alpha=2 * lora_r,
                      lora_dropout=0.0, threads=threads)
    trainer = Trainer(cfg, resolve_base(cfg.base, settings.store.dir), Path(tempfile.mkdtemp()))
    builder = PromptBuilder(get_label_set(dataset), max_tokens=max_tokens, count_tokens=trainer.count_tokens,
                            window=WindowShape(cfg.window, cfg.hop))
    examples = build_examples(cfg, load_sources(cfg), builder, None)
    out: dict = {"dataset": dataset, "batch_size": batch_size, "impact_per_batch": impact_per_batch,
                 "max_tokens": max_tokens, "window": cfg.window, "hop": cfg.hop, "batchings": {}}
    dtype = auto_dtype("cpu")
    for batching in ("draws", "blocks"):
        run = replace(cfg, batching=batching)
        steps = schedule(run, examples)
        padded, own, packed, per_main = [], [], [], []
        for step in steps:
            batch = [examples[t][i] for t, i in step]
            rows, _ = trainer.rows(batch)
            padded.append(len(rows) * max(len(r) for r in rows))
            own.append(sum(len(r) for r in rows))
            packed.append(pack(rows, [ex.block for ex in batch]).nodes)
            per_main.append(packed[-1] / max(1, sum(t == "main" for t, _ in step)))
        row: dict = {"padded_tokens": round(mean(padded)), "row_tokens": round(mean(own)),
                     "packed_tokens": round(mean(packed)), "packed_tokens_per_main_example": round(mean(per_main), 1),
                     "packed_vs_padded": round(mean(padded) / mean(packed), 2)}
        if time_steps:
            trainer.model.train()
            weight = {"main": 1.0, "impact": cfg.aux_weight}
            for packing in (True, False):
                trainer.cfg = replace(run, packing=packing)
                seconds = []
                for step in steps[: time_steps + 1]:  # the first step warms up
                    batch = [examples[t][i] for t, i in step]
                    t0 = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                        loss = trainer.batch_loss(batch, [weight[t] for t, _ in step])
                    loss.backward()
                    trainer.model.zero_grad(set_to_none=True)
                    seconds.append(time.perf_counter() - t0)
                row["seconds_per_step_" + ("packed" if packing else "padded")] = round(mean(seconds[1:]), 2)
        out["batchings"][batching] = row
    out["dtype"] = dtype
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="meld")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--impact-per-batch", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--time-steps", type=int, default=0)
    p.add_argument("--lora-modules", choices=["attention", "all"], default="attention")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from model_store.training import LORA_MODULES

    result = measure(a.dataset, batches=a.batches, batch_size=a.batch_size, impact_per_batch=a.impact_per_batch,
                     max_tokens=a.max_tokens, time_steps=a.time_steps, target_modules=LORA_MODULES[a.lora_modules],
                     lora_r=a.lora_r, threads=a.threads)
    print(json.dumps(result, indent=2) if a.json else result)


if __name__ == "__main__":
    main()
