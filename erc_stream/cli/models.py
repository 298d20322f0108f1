"""``erc-stream models``: train, evaluate, sweep, average, list, show, promote, roll back (:mod:`model_store`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from erc_stream.cli.root import DATASETS, LABEL_SETS, main, settings_of

SCRIPTED = "synthetic"  # producer_sim.synthetic.DATASET; named here so that `erc-stream --help` does not import it


@main.group()
def models() -> None:
    """Train, evaluate and manage base models and LoRA adapters (the model store)."""


@models.command("train")
@click.option("--dataset", "datasets", type=DATASETS, required=True,
              multiple=True, help="Repeat to train on several datasets at once (with --label-set unified).")
@click.option("--file", "files", type=click.Path(path_type=Path), multiple=True,
              help="Training file of each --dataset, in order (default: its train split under ERC_DATA__DIR).")
@click.option("--label-set", type=LABEL_SETS, default=None,
              help="Default: the dataset's own; several datasets need one shared set (unified).")
@click.option("--mix", type=click.Choice(["total", "ratio"]), default="total", show_default=True,
              help="Several datasets: sample --fraction of the pooled utterances (total) or of each dataset (ratio).")
@click.option("--full", is_flag=True, help="Fine-tune all parameters instead of a LoRA adapter (small models).")
@click.option("--name", required=True, help="Adapter name in the store.")
@click.option("--base", default="smollm2-135m", show_default=True)
@click.option("--window", type=int, default=12, show_default=True)
@click.option("--hop", type=int, default=None, help="The window's hop (default: the window.hop setting, as served).")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--speaker-steps", type=int, default=15, show_default=True, help="Stage 1: speaker identification (0 = off).")
@click.option("--steps", type=int, default=90, show_default=True, help="Stage 2: main task (+ emotion impact).")
@click.option("--epochs", type=float, default=None, help="Stage 2 length in passes over the examples (overrides --steps).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--aux-weight", type=float, default=0.1, show_default=True, help="Emotion-impact loss weight (0 = off).")
@click.option("--impact-per-batch", type=click.IntRange(0), default=2, show_default=True,
              help="Emotion-impact examples a batch.")
@click.option("--no-demonstrations", is_flag=True, help="Train without retrieved demonstrations.")
@click.option("--demo-pairing", type=click.Choice(["same_label", "nearest"]), default="same_label", show_default=True,
              help="same_label: the paper's pairing; nearest: the nearest utterance of any label, as at inference.")
@click.option("--lr", type=float, default=None, help="Learning rate (default: 1e-3 LoRA, 5e-5 --full).")
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=int, default=16, show_default=True)
@click.option("--lora-dropout", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="0 skips drawing the dropout masks (~20 % of a CPU step).")
@click.option("--fraction", type=float, default=1.0, show_default=True)
@click.option("--limit", type=int, default=None, help="At most this many training utterances.")
@click.option("--balance", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Label-balanced draws: 0 = natural distribution, 1 = every label equally often.")
@click.option("--class-weight", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Class-weighted loss: scale each example's loss by freq(label)^-W (0 = unweighted).")
@click.option("--batching", type=click.Choice(["draws", "blocks"]), default="draws", show_default=True,
              help="draws: random examples a batch; blocks: whole conversation blocks, epochs in shuffled order "
                   "(consecutive turns share their history: ~3x cheaper packed).")
@click.option("--no-packing", is_flag=True, help="Left-padded rows instead of prefix-tree packing (same result, slower).")
@click.option("--lora-modules", type=click.Choice(["attention", "all"]), default="attention", show_default=True,
              help="LoRA on the attention projections, or on the MLP projections as well.")
@click.option("--calibration", type=click.IntRange(0), default=0, show_default=True,
              help="Hold out N training utterances and fit a label-prior correction on them.")
@click.option("--eval-every", type=click.IntRange(0), default=0, show_default=True,
              help="Score the adapter on dev every N steps and at the end; publish the best (0 = the last).")
@click.option("--eval-file", type=click.Path(path_type=Path), default=None,
              help="The dev file --eval-every scores (default: each dataset's dev split).")
@click.option("--eval-limit", type=int, default=None, help="--eval-every scores the first N dev utterances only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout-seed", type=int, default=None,
              help="Seed of the --calibration draw (default: --seed + 2): runs of other seeds that hold out the same "
                   "utterances can be averaged (models average).")
@click.option("--threads", type=int, default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Autocast dtype; auto = bfloat16 where the machine runs it natively, else float32.")
@click.option("--checkpoint-every", type=int, default=10, show_default=True)
@click.option("--layout", type=click.Choice(["instructerc", "stream"]), default="instructerc", show_default=True,
              help="The prompt layout to train (scoring.prompts): the paper's, or one line per turn read at a marker.")
@click.option("--no-progress", is_flag=True)
@click.pass_context
def models_train(ctx, datasets, files, label_set, mix, full, name, base, window, hop, max_tokens, speaker_steps, steps,
                 epochs, batch_size, aux_weight, impact_per_batch, no_demonstrations, demo_pairing, lr, lora_r, lora_alpha,
                 lora_dropout, fraction,
                 limit, balance, class_weight, batching, no_packing, lora_modules, calibration, eval_every, eval_file,
                 eval_limit, seed, holdout_seed, threads, device, dtype, checkpoint_every, layout, no_progress):
    """Train a LoRA adapter (or, --full, a whole model) with the InstructERC recipe; resumes from its checkpoint."""
    import shlex

    from model_store.data import default_file
    from model_store.training import LORA_MODULES, TrainConfig, train, with_epochs

    settings = settings_of(ctx)
    if files and len(files) != len(datasets):
        raise click.BadParameter(f"{len(files)} --file for {len(datasets)} --dataset; give one per dataset or none")
    if len(datasets) > 1 and label_set is None:
        label_set = "unified"
    paths = [str(f) for f in files] or [str(default_file(settings.data.dir, d, "train")) for d in datasets]
    cfg = TrainConfig(
        name=name, dataset=datasets[0], train_file=paths[0], more_sources=tuple(zip(datasets[1:], paths[1:])),
        mix=mix, full=full, label_set=label_set or datasets[0], base=base, window=window,
        hop=hop or settings.window.hop, max_tokens=max_tokens, speaker_steps=speaker_steps, steps=steps,
        batch_size=batch_size, aux_weight=aux_weight, impact_per_batch=impact_per_batch,
        demonstrations=not no_demonstrations, demo_pairing=demo_pairing,
        lr=lr if lr is not None else (5e-5 if full else 1e-3), lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, target_modules=LORA_MODULES[lora_modules], fraction=fraction, limit=limit,
        balance=balance, class_weight=class_weight, batching=batching, packing=not no_packing,
        calibration=calibration, eval_every=eval_every, eval_file=str(eval_file) if eval_file else None,
        eval_limit=eval_limit, seed=seed, holdout_seed=holdout_seed, threads=threads, device=device, dtype=dtype,
        checkpoint_every=checkpoint_every, demo_position=settings.model.demo_position, layout=layout,
    )
    if epochs is not None:
        cfg = with_epochs(cfg, epochs)
    out = train(cfg, store_dir=settings.store.dir, progress=not no_progress,
                command="erc-stream " + shlex.join(sys.argv[1:]))
    click.echo(f"{'model' if full else 'adapter'} written to {out}")


@models.command("eval")
@click.option("--dataset", "datasets", type=click.Choice([*DATASETS.choices, SCRIPTED]), required=True, multiple=True,
              help="Repeat for per-dataset scores of one adapter (with --label-set unified). 'synthetic': the demo's "
                   "hand-written support chats, calls and threads (producer_sim/synthetic.py), no data needed.")
@click.option("--file", "file_", type=click.Path(path_type=Path), default=None,
              help="Any file in the dataset's format (default: its dev split under ERC_DATA__DIR); one --dataset only.")
@click.option("--split", type=click.Choice(["train", "dev", "test"]), default="dev")
@click.option("--label-set", type=LABEL_SETS, default=None,
              help="Default: the dataset's own; unified with several datasets.")
@click.option("--adapter", default=None, help="Adapter name/path, 'none' for zero-shot; default: the active one.")
@click.option("--base", default=None, help="Base model: a store name or a local HF model directory (a --full model).")
@click.option("--dialogues", type=int, default=None, help="Only the first N dialogues.")
@click.option("--limit", type=int, default=None, help="Only the first N utterances.")
@click.option("--window", type=int, default=None)
@click.option("--hop", type=int, default=None, help="The window's hop (default: ERC_WINDOW__HOP; 1: the sliding window).")
@click.option("--episodes", is_flag=True,
              help="MELD/EmoryNLP: each episode's scenes joined into one long conversation (60-200 turns), as a call "
                   "runs: windows fill, then re-anchor every hop.")
@click.option("--no-demonstrations", is_flag=True)
@click.option("--no-calibration", is_flag=True, help="Ignore the adapter's label-prior correction.")
@click.option("--zero-shot/--no-zero-shot", default=True, show_default=True,
              help="Also report the base model without adapter on the same items (cached in the store).")
@click.option("--confusion", type=click.Path(path_type=Path), default=None, help="Write a confusion-matrix PNG here.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (several datasets: keyed by dataset).")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default=None,
              help="Inference backend (default: ERC_MODEL__BACKEND or hf).")
@click.option("--predictions", type=click.Path(path_type=Path), default=None,
              help="Write each utterance's gold and predicted label here (JSON lines; several datasets: one file each, "
                   "the dataset in its name), for `python -m bench.compare_predictions`.")
@click.pass_context
def models_eval(ctx, datasets, file_, split, label_set, adapter, base, dialogues, limit, window, hop, episodes,
                no_demonstrations, no_calibration, zero_shot, confusion, batch_size, as_json, backend=None,
                predictions=None):
    """Weighted F1 (all classes), accuracy and per-label F1 through the serving path."""
    import json

    from model_store.evaluation_runs import run_eval
    from producer_sim.synthetic import scripted_conversations

    settings = settings_of(ctx)
    if file_ is not None and len(datasets) > 1:
        raise click.BadParameter("--file names one dataset's file; give one --dataset with it")
    if backend:
        settings = settings.with_overrides(model={"backend": backend})
    if base:
        settings = settings.with_overrides(model={"base": base})
    if hop:
        settings = settings.with_overrides(window={"hop": hop})
    if label_set is None and len(datasets) > 1:
        label_set = "unified"
    if episodes and not set(datasets) <= {"meld", "emorynlp"}:
        raise click.BadParameter("--episodes joins MELD's or EmoryNLP's scenes (their rows name the episode)")
    results = {}
    for dataset in datasets:
        s = settings
        if label_set:
            s = s.with_overrides(model={"label_set": label_set})
        elif dataset in ("meld", "emorynlp", "iemocap"):
            s = s.with_overrides(model={"label_set": dataset})
        png = confusion.with_name(f"{confusion.stem}-{dataset}{confusion.suffix}") if confusion and len(datasets) > 1 \
            else confusion
        preds = predictions.with_name(f"{predictions.stem}-{dataset}{predictions.suffix}") \
            if predictions and len(datasets) > 1 else predictions
        results[dataset] = run_eval(s, dataset=dataset, file=file_, split=split, adapter=adapter, dialogues=dialogues,
                                    limit=limit, window=window, demonstrations=not no_demonstrations,
                                    zero_shot=zero_shot, confusion=png, batch_size=batch_size,
                                    progress=not as_json, calibrated=not no_calibration,
                                    conversations=scripted_conversations() if dataset == SCRIPTED
                                    else _episodes(s, dataset, file_, split) if episodes else None,
                                    predictions=preds, record_as=f"{dataset}:{split}-episodes" if episodes else None)
    if as_json:
        click.echo(json.dumps(results[datasets[0]] if len(datasets) == 1 else results))
    else:
        from erc_stream.render import print_eval, print_eval_summary

        for result in results.values():
            print_eval(result)
        if len(results) > 1:
            print_eval_summary(results)


def _episodes(settings, dataset: str, file_: Path | None, split: str):
    from model_store.data import default_file, load_episodes

    return load_episodes(dataset, file_ or default_file(settings.data.dir, dataset, split))


@models.command("sweep")
@click.option("--dataset", "datasets", type=click.Choice(["meld", "emorynlp", "iemocap"]), multiple=True,
              default=("meld", "emorynlp"), show_default=True, help="Datasets mixed (repeat).")
@click.option("--fractions", default="1/8,1/16,1/32,1/64", show_default=True, help="Comma-separated, e.g. 1,1/4,1/64.")
@click.option("--strategies", default="single,total,ratio", show_default=True)
@click.option("--full-at", default="1/64", show_default=True,
              help="Fractions at which a --full twin of the total-mix cell also trains ('' = none).")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over each cell's utterances.")
@click.option("--min-steps", type=int, default=20, show_default=True, help="At least this many steps per cell.")
@click.option("--batching", type=click.Choice(["draws", "blocks"]), default="draws", show_default=True,
              help="Each cell's batches: random draws, or whole conversation blocks (packed; see models train).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--window", type=int, default=12, show_default=True)
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--eval-limit", type=int, default=200, show_default=True,
              help="Evaluate on the first N dev utterances of each dataset (0 = all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Training autocast and evaluation dtype (auto: bfloat16 where native).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("docs/sweep"), show_default=True,
              help="Cell results, sweep.csv, sweep.md and sweep.png go here; rerun to resume.")
@click.pass_context
def models_sweep(ctx, datasets, fractions, strategies, full_at, epochs, min_steps, batching, batch_size, window,
                 max_tokens, eval_limit, seed, threads, device, dtype, out):
    """Data scaling on the unified label set: (mix strategy x fraction x LoRA/full), each trained and evaluated."""
    from fractions import Fraction

    from model_store.sweep import STRATEGIES, SweepPlan, run_sweep

    def parse(text: str) -> tuple[Fraction, ...]:
        return tuple(Fraction(x.strip()) for x in text.split(",") if x.strip())

    chosen = tuple(x.strip() for x in strategies.split(",") if x.strip())
    if unknown := set(chosen) - set(STRATEGIES):
        raise click.BadParameter(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
    plan = SweepPlan(datasets=tuple(datasets), fractions=parse(fractions), strategies=chosen,  # type: ignore[arg-type]
                     full_fractions=parse(full_at), epochs=epochs, min_steps=min_steps, window=window,
                     max_tokens=max_tokens, eval_limit=eval_limit or None, seed=seed, threads=threads, device=device,
                     dtype=dtype, batching=batching, batch_size=batch_size)
    rows = run_sweep(plan, settings_of(ctx), out)
    click.echo((out / "sweep.md").read_text() if rows else "no cells")


@models.command("average")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--name", required=True, help="Publish the average as a new version of this adapter name.")
@click.option("--weight", "weights", type=float, multiple=True,
              help="One per adapter, in order (default: equal); normalised to sum to 1.")
@click.pass_context
def models_average(ctx, adapters, name, weights):
    """Average ADAPTERS (names, NAME@VERSION or directories; same base, labels, prompt and LoRA shape) into one
    adapter of the same rank, calibrated again on their held-out training utterances (model_store/averaging.py)."""
    from model_store.averaging import average_adapters
    from model_store.registry import resolve_adapter

    settings = settings_of(ctx)
    try:
        sources = [resolve_adapter(a, settings.store.dir).path for a in adapters]
        out = average_adapters(sources, name, settings.store.dir, settings.data.dir, weights or None)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"adapter written to {out}")


@models.command("calibrate")
@click.argument("adapter")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Weights' dtype the correction is fitted in (default: the serving one, ERC_MODEL__DTYPE).")
@click.pass_context
def models_calibrate(ctx, adapter, dtype):
    """Fit ADAPTER's (name, NAME@VERSION or directory) label-prior correction again on the training utterances
    its run held out, in the dtype it is served in; publish it as a new version (model_store/recalibration.py)."""
    import json

    from model_store.post_training import serving_dtype
    from model_store.recalibration import recalibrate
    from model_store.registry import resolve_adapter

    settings = settings_of(ctx)
    try:
        source = resolve_adapter(adapter, settings.store.dir).path
        out = recalibrate(source, settings.store.dir, settings.data.dir, dtype or serving_dtype(settings))
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    was = json.loads((source / "erc_meta.json").read_text()).get("calibration") or {}
    now = json.loads((out / "erc_meta.json").read_text())["calibration"]
    click.echo(f"power {was.get('power')} ({was.get('dtype') or 'the training dtype'}) -> {now['power']} "
               f"({now['dtype']}) on {now['n']} held-out utterances; "
               f"{'unchanged' if out == source else 'a new version'}: adapter written to {out}")


@models.command("list")
@click.pass_context
def models_list(ctx):
    """Base models and adapters in the store (and shipped), with the active adapter per label set."""
    from erc_stream.render import print_registry
    from model_store.registry import Registry

    print_registry(Registry(settings_of(ctx).store.dir))


@models.command("show")
@click.argument("name")
@click.pass_context
def models_show(ctx, name):
    """An adapter's metadata as JSON."""
    import json

    from model_store.registry import Registry

    info = Registry(settings_of(ctx).store.dir).info(name)
    click.echo(json.dumps({"name": info.name, "version": info.version, "path": str(info.path),
                           "shipped": info.shipped, **info.meta},
                          indent=2, default=str))


@models.command("promote")
@click.argument("name")
@click.option("--label-set", default=None, help="Default: the adapter's own label set.")
@click.pass_context
def models_promote(ctx, name, label_set):
    """Make NAME (its newest version) or NAME@VERSION the active adapter of its label set; running consumers
    switch between batches."""
    from model_store.registry import Registry

    try:
        info = Registry(settings_of(ctx).store.dir).promote(name, label_set)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{info.spec} is now active for {label_set or info.label_set}")


@models.command("rollback")
@click.argument("label_set", type=LABEL_SETS)
@click.pass_context
def models_rollback(ctx, label_set):
    """Make the adapter version that was active before the current one active again (running consumers switch)."""
    from model_store.registry import Registry

    try:
        info = Registry(settings_of(ctx).store.dir).rollback(label_set)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{info.spec} is active again for {label_set}")
