"""The ``erc-stream`` command. Each subcommand is a thin shell over a module that does the work."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import get_args

import click

from erc_stream.settings import LabelSetName, Settings
from model_store.data import DATASETS as DATASET_FORMATS

#: The choices of every --label-set and --dataset option (the label sets of settings, the data loaders' formats).
LABEL_SETS = click.Choice(list(get_args(LabelSetName)))
DATASETS = click.Choice(list(DATASET_FORMATS))


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING… (default from ERC_LOG_LEVEL or INFO)")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """Real-time emotion recognition in conversation (InstructERC) as a Kafka stream processor.

    Configuration comes from ERC_* environment variables (see erc_stream/settings.py); options
    below override them for one run.
    """
    from erc_stream.logs import configure

    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as e:  # a bad ERC_* variable: say which, not a traceback
        raise click.ClickException(f"invalid configuration (ERC_* environment): {e}") from e
    if log_level:
        settings = settings.model_copy(update={"log_level": log_level})
    configure(settings.log_level, settings.log_json)
    ctx.obj = {"settings": settings}


@main.command("config")
@click.option("--markdown", is_flag=True, help="Print the configuration reference (every ERC_* variable) as Markdown.")
@click.option("--write-readme", type=click.Path(exists=True, path_type=Path), default=None,
              help="Rewrite the reference between the markers in this README.")
@click.pass_context
def config_cmd(ctx, markdown, write_readme):
    """The effective settings as JSON (secrets masked), or the configuration reference."""
    from erc_stream import settings_doc

    if write_readme:
        changed = settings_doc.update_readme(write_readme)
        click.echo(f"{write_readme}: {'updated' if changed else 'up to date'}")
    elif markdown:
        click.echo(settings_doc.markdown(), nl=False)
    else:
        click.echo(_settings(ctx).model_dump_json(indent=2))


# -- services -------------------------------------------------------------------------------


@main.group()
def services() -> None:
    """Local broker (tansu) and Redis for development, tests and the demo."""


def _print_statuses(statuses) -> None:
    for s in statuses:
        state = "running" if s.running else "stopped"
        how = "managed" if s.managed else "external" if s.running else ""
        pid = f" pid={s.pid}" if s.pid else ""
        click.echo(f"{s.name:<6} {s.address:<22} {state:<8} {how:<8}{pid}  {s.detail}".rstrip())


def _service_call(fn, settings: Settings) -> None:
    from erc_stream.services import ServiceError

    try:
        _print_statuses(fn(settings))
    except ServiceError as e:
        raise click.ClickException(str(e)) from e


@services.command("up")
@click.pass_context
def services_up_cmd(ctx: click.Context) -> None:
    """Start the broker and Redis if they are not running, and create the topics."""
    from erc_stream.services import services_up

    _service_call(services_up, _settings(ctx))


@services.command("down")
@click.pass_context
def services_down_cmd(ctx: click.Context) -> None:
    """Stop what `services up` started (never a service it did not start)."""
    from erc_stream.services import services_down

    _service_call(services_down, _settings(ctx))


@services.command("status")
@click.pass_context
def services_status_cmd(ctx: click.Context) -> None:
    """Show whether the broker and Redis answer."""
    from erc_stream.services import services_status

    _service_call(services_status, _settings(ctx))


# -- simulate -------------------------------------------------------------------------------


@main.command()
@click.option("--dataset", type=DATASETS, default="meld")
@click.option("--file", "file_", type=click.Path(path_type=Path), default=None,
              help="Data file (default: the dataset's split under ERC_DATA__DIR).")
@click.option("--split", type=click.Choice(["train", "dev", "test"]), default="dev")
@click.option("--dialogues", type=int, default=None, help="Replay only the first N dialogues.")
@click.option("--synthetic", type=int, default=None, help="Replay N built-in synthetic conversations instead.")
@click.option("--rate", type=float, default=10.0, show_default=True, help="Messages per second (0 = unthrottled).")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Conversations open at once.")
@click.option("--run-id", default=None, help="Prefix of conversation and message ids (default: a timestamp).")
@click.option("--tenant", default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
@click.pass_context
def simulate(ctx, dataset, file_, split, dialogues, synthetic, rate, concurrency, run_id, tenant, seed, no_progress):
    """Replay MELD / EmoryNLP dialogues (or synthetic ones) onto the input topic as live chats."""
    from producer_sim.sources import load_source, new_run_id
    from producer_sim.replay import interleave, replay, to_messages

    settings = _settings(ctx)
    try:
        source = load_source(settings, dataset=dataset, file=file_, split=split, dialogues=dialogues,
                             synthetic=synthetic, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(source.description, err=True)
    per_conv = to_messages(source.conversations, run_id=run_id or new_run_id("sim"), tenant=tenant)
    total = sum(len(c) for c in per_conv)
    report = replay(settings, interleave(per_conv, concurrency=concurrency, seed=seed),
                    rate=rate or None, total=total, progress=not no_progress)
    click.echo(f"sent {report.sent} messages to {report.topic} in {report.seconds:.1f}s ({report.rate:.1f}/s)")


# -- consume --------------------------------------------------------------------------------


@main.command()
@click.option("--backend", type=click.Choice(["hf", "vllm", "null"]), default=None)
@click.option("--base", default=None, help="Base model: a store name or a local HF model directory.")
@click.option("--adapter", default=None, help="LoRA adapter: a store name or a directory.")
@click.option("--label-set", type=LABEL_SETS, default=None)
@click.option("--group-id", default=None)
@click.option("--idle-exit", type=float, default=None, help="Exit after this many seconds without input.")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None,
              help="Write this file once the model is loaded and the consumer subscribed (JSON: the metrics URL).")
@click.option("--delivery", type=click.Choice(["at_least_once", "transactional"]), default=None,
              help="Delivery mode (default: ERC_DELIVERY__MODE or at_least_once).")
@click.option("--worker-id", default=None, help="Stable worker identity (the transactional id's suffix).")
@click.pass_context
def consume(ctx, backend, base, adapter, label_set, group_id, idle_exit, ready_file, delivery=None, worker_id=None):
    """Run one consumer-group member: label every message and emit emotion events."""
    from consumer.runner import build_app

    overrides = {k: v for k, v in {"backend": backend, "base": base, "adapter": adapter,
                                   "label_set": label_set}.items() if v is not None}
    settings = _settings(ctx).with_overrides(model=overrides, kafka={"group_id": group_id} if group_id else {})
    settings = settings.with_overrides(delivery={k: v for k, v in {"mode": delivery, "worker_id": worker_id}.items()
                                                 if v is not None})
    from consumer.delivery import FatalDeliveryError

    try:
        app = build_app(settings)
        app.install_signal_handlers()
        try:
            metrics_url = app.serve_metrics().url if settings.metrics.enabled else None
        except OSError as e:  # the port is taken: say so, leave nothing behind
            app.close()
            m = settings.metrics
            raise click.ClickException(f"metrics endpoint: cannot listen on {m.host}:{m.port} ({e}); set "
                                       "ERC_METRICS__PORT (0 = any free port) or ERC_METRICS__ENABLED=false") from e
        if ready_file:
            import json

            ready_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"metrics_url": metrics_url, "pid": os.getpid()}))
            tmp.replace(ready_file)  # readers never see a half-written file
        stats = app.run(idle_exit_s=idle_exit)
    except FatalDeliveryError as e:  # fenced by a newer instance of this worker, or a commit watchdog
        click.echo(f"erc-stream consume: {e}", err=True)
        sys.exit(3)
    click.echo(f"consumed {stats.consumed}, events {stats.events}, dead letters {stats.dead_letters}", err=True)


# -- demo -----------------------------------------------------------------------------------


@main.command()
@click.option("--dialogues", type=int, default=6, show_default=True, help="MELD dev dialogues to replay.")
@click.option("--synthetic", type=int, default=None, help="Replay N synthetic conversations instead of MELD.")
@click.option("--rate", type=float, default=2.0, show_default=True, help="Messages per second.")
@click.option("--backend", type=click.Choice(["hf", "vllm", "null"]), default=None)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Give up after this many seconds.")
@click.pass_context
def demo(ctx, dialogues, synthetic, rate, backend, timeout):
    """The main job: services up, a consumer, a replay, a live view and a closing summary."""
    from erc_stream.demo import run_demo

    settings = _settings(ctx)
    if backend:
        settings = settings.with_overrides(model={"backend": backend})
    ok = run_demo(settings, dialogues=dialogues, synthetic=synthetic, rate=rate, timeout_s=timeout)
    sys.exit(0 if ok else 1)


# -- models ---------------------------------------------------------------------------------


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
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--speaker-steps", type=int, default=15, show_default=True, help="Stage 1: speaker identification (0 = off).")
@click.option("--steps", type=int, default=90, show_default=True, help="Stage 2: main task (+ emotion impact).")
@click.option("--epochs", type=float, default=None, help="Stage 2 length in passes over the examples (overrides --steps).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--aux-weight", type=float, default=0.1, show_default=True, help="Emotion-impact loss weight (0 = off).")
@click.option("--no-demonstrations", is_flag=True, help="Train without retrieved demonstrations.")
@click.option("--demo-pairing", type=click.Choice(["same_label", "nearest"]), default="same_label", show_default=True,
              help="same_label: the paper's pairing; nearest: the nearest utterance of any label, as at inference.")
@click.option("--lr", type=float, default=None, help="Learning rate (default: 1e-3 LoRA, 5e-5 --full).")
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=int, default=16, show_default=True)
@click.option("--fraction", type=float, default=1.0, show_default=True)
@click.option("--limit", type=int, default=None, help="At most this many training utterances.")
@click.option("--balance", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Label-balanced draws: 0 = natural distribution, 1 = every label equally often.")
@click.option("--calibration", type=click.IntRange(0), default=0, show_default=True,
              help="Hold out N training utterances and fit a label-prior correction on them.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Autocast dtype; auto = bfloat16 where the machine runs it natively, else float32.")
@click.option("--checkpoint-every", type=int, default=10, show_default=True)
@click.option("--no-progress", is_flag=True)
@click.pass_context
def models_train(ctx, datasets, files, label_set, mix, full, name, base, window, max_tokens, speaker_steps, steps,
                 epochs, batch_size, aux_weight, no_demonstrations, demo_pairing, lr, lora_r, lora_alpha, fraction,
                 limit, balance, calibration, seed, threads, device, dtype, checkpoint_every, no_progress):
    """Train a LoRA adapter (or, --full, a whole model) with the InstructERC recipe; resumes from its checkpoint."""
    import shlex

    from model_store.data import default_file
    from model_store.training import TrainConfig, train, with_epochs

    settings = _settings(ctx)
    if files and len(files) != len(datasets):
        raise click.BadParameter(f"{len(files)} --file for {len(datasets)} --dataset; give one per dataset or none")
    if len(datasets) > 1 and label_set is None:
        label_set = "unified"
    paths = [str(f) for f in files] or [str(default_file(settings.data.dir, d, "train")) for d in datasets]
    cfg = TrainConfig(
        name=name, dataset=datasets[0], train_file=paths[0], more_sources=tuple(zip(datasets[1:], paths[1:])),
        mix=mix, full=full, label_set=label_set or datasets[0], base=base, window=window,
        max_tokens=max_tokens, speaker_steps=speaker_steps, steps=steps, batch_size=batch_size,
        aux_weight=aux_weight, demonstrations=not no_demonstrations, demo_pairing=demo_pairing,
        lr=lr if lr is not None else (5e-5 if full else 1e-3), lora_r=lora_r, lora_alpha=lora_alpha,
        fraction=fraction, limit=limit, balance=balance, calibration=calibration, seed=seed, threads=threads,
        device=device, dtype=dtype, checkpoint_every=checkpoint_every, demo_position=settings.model.demo_position,
    )
    if epochs is not None:
        cfg = with_epochs(cfg, epochs)
    out = train(cfg, store_dir=settings.store.dir, progress=not no_progress,
                command="erc-stream " + shlex.join(sys.argv[1:]))
    click.echo(f"{'model' if full else 'adapter'} written to {out}")


@models.command("eval")
@click.option("--dataset", "datasets", type=DATASETS, required=True,
              multiple=True, help="Repeat for per-dataset scores of one adapter (with --label-set unified).")
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
@click.option("--no-demonstrations", is_flag=True)
@click.option("--no-calibration", is_flag=True, help="Ignore the adapter's label-prior correction.")
@click.option("--zero-shot/--no-zero-shot", default=True, show_default=True,
              help="Also report the base model without adapter on the same items (cached in the store).")
@click.option("--confusion", type=click.Path(path_type=Path), default=None, help="Write a confusion-matrix PNG here.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (several datasets: keyed by dataset).")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default=None,
              help="Inference backend (default: ERC_MODEL__BACKEND or hf).")
@click.pass_context
def models_eval(ctx, datasets, file_, split, label_set, adapter, base, dialogues, limit, window, no_demonstrations,
                no_calibration, zero_shot, confusion, batch_size, as_json, backend=None):
    """Weighted F1 (all classes), accuracy and per-label F1 through the serving path."""
    import json

    from model_store.evaluation_runs import run_eval

    settings = _settings(ctx)
    if file_ is not None and len(datasets) > 1:
        raise click.BadParameter("--file names one dataset's file; give one --dataset with it")
    if backend:
        settings = settings.with_overrides(model={"backend": backend})
    if base:
        settings = settings.with_overrides(model={"base": base})
    if label_set is None and len(datasets) > 1:
        label_set = "unified"
    results = {}
    for dataset in datasets:
        s = settings
        if label_set:
            s = s.with_overrides(model={"label_set": label_set})
        elif dataset in ("meld", "emorynlp", "iemocap"):
            s = s.with_overrides(model={"label_set": dataset})
        png = confusion.with_name(f"{confusion.stem}-{dataset}{confusion.suffix}") if confusion and len(datasets) > 1 \
            else confusion
        results[dataset] = run_eval(s, dataset=dataset, file=file_, split=split, adapter=adapter, dialogues=dialogues,
                                    limit=limit, window=window, demonstrations=not no_demonstrations,
                                    zero_shot=zero_shot, confusion=png, batch_size=batch_size,
                                    progress=not as_json, calibrated=not no_calibration)
    if as_json:
        click.echo(json.dumps(results[datasets[0]] if len(datasets) == 1 else results))
    else:
        from erc_stream.render import print_eval, print_eval_summary

        for result in results.values():
            print_eval(result)
        if len(results) > 1:
            print_eval_summary(results)


@models.command("sweep")
@click.option("--dataset", "datasets", type=click.Choice(["meld", "emorynlp", "iemocap"]), multiple=True,
              default=("meld", "emorynlp"), show_default=True, help="Datasets mixed (repeat).")
@click.option("--fractions", default="1/8,1/16,1/32,1/64", show_default=True, help="Comma-separated, e.g. 1,1/4,1/64.")
@click.option("--strategies", default="single,total,ratio", show_default=True)
@click.option("--full-at", default="1/64", show_default=True,
              help="Fractions at which a --full twin of the total-mix cell also trains ('' = none).")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over each cell's utterances.")
@click.option("--min-steps", type=int, default=20, show_default=True, help="At least this many steps per cell.")
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
def models_sweep(ctx, datasets, fractions, strategies, full_at, epochs, min_steps, window, max_tokens, eval_limit,
                 seed, threads, device, dtype, out):
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
                     dtype=dtype)
    rows = run_sweep(plan, _settings(ctx), out)
    click.echo((out / "sweep.md").read_text() if rows else "no cells")


@models.command("list")
@click.pass_context
def models_list(ctx):
    """Base models and adapters in the store (and shipped), with the active adapter per label set."""
    from erc_stream.render import print_registry
    from model_store.registry import Registry

    print_registry(Registry(_settings(ctx).store.dir))


@models.command("show")
@click.argument("name")
@click.pass_context
def models_show(ctx, name):
    """An adapter's metadata as JSON."""
    import json

    from model_store.registry import Registry

    info = Registry(_settings(ctx).store.dir).info(name)
    click.echo(json.dumps({"name": info.name, "path": str(info.path), "shipped": info.shipped, **info.meta},
                          indent=2, default=str))


@models.command("promote")
@click.argument("name")
@click.option("--label-set", default=None, help="Default: the adapter's own label set.")
@click.pass_context
def models_promote(ctx, name, label_set):
    """Make an adapter the active one for its label set; running consumers switch between batches."""
    from model_store.registry import Registry

    info = Registry(_settings(ctx).store.dir).promote(name, label_set)
    click.echo(f"{info.name} is now active for {label_set or info.label_set}")


# -- reading the output, replaying dead letters ------------------------------------------------


@main.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet", "csv"]), default="jsonl", show_default=True,
              help="jsonl: the whole topic to a file or stdout. parquet/csv: a dataset partitioned by date and "
                   "tenant under --out, resumable from the exporter group's committed offsets.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="jsonl: a file (default: stdout). parquet/csv: the dataset's directory (required).")
@click.option("--follow", is_flag=True, help="Keep reading new events (Ctrl-C to stop).")
@click.option("--group-id", default=None, help="parquet/csv: the exporter's consumer group (default: ERC_EXPORT__GROUP_ID).")
@click.pass_context
def export(ctx, fmt, out, follow, group_id):
    """Export the emotion events, each event_id once (copies dropped): JSON lines, or Parquet/CSV for BI tools."""
    from erc_stream.readers import Deduper, read_records
    from erc_stream.schemas import EmotionEvent

    settings = _settings(ctx)
    if fmt != "jsonl":
        if out is None:
            raise click.UsageError(f"--format {fmt} needs --out DIR")
        from erc_stream.export import Exporter

        exporter = Exporter(settings, out, fmt, group_id=group_id)
        try:
            report = exporter.run(follow=follow)
        except KeyboardInterrupt:
            report = exporter.report
        click.echo(f"exported {report.events} events to {out} in {len(report.files)} files "
                   f"({report.copies} copies dropped, {report.skipped} skipped); committed offsets "
                   f"{dict(sorted(report.committed.items()))} for group {exporter.group_id}", err=True)
        return
    dedupe = Deduper()
    n = 0
    sink = out.open("w") if out else sys.stdout
    try:
        for r in read_records(settings, settings.kafka.output_topic, follow=follow):
            event = EmotionEvent.from_bytes(r.value)
            if dedupe.first(event.event_id):
                sink.write(event.model_dump_json(exclude_none=True) + "\n")
                n += 1
    except KeyboardInterrupt:
        pass
    finally:
        if out:
            sink.close()
    click.echo(f"exported {n} events ({dedupe.copies} redelivered copies dropped)", err=True)


@main.command()
@click.option("--input", "source", type=click.Path(exists=True, path_type=Path), default=None,
              help="An exported dataset directory (parquet or csv) or a JSONL export.")
@click.option("--from-topic", is_flag=True, help="Read the output topic instead (every event, copies dropped).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the PNGs and report.html.")
@click.option("--conversation", "conversations", multiple=True, help="Draw this conversation's timeline (repeatable).")
@click.option("--max-conversations", type=int, default=4, show_default=True,
              help="Without --conversation: timelines of the busiest conversations, at most this many.")
@click.pass_context
def report(ctx, source, from_topic, out, conversations, max_conversations):
    """Charts of the events: emotions over time, conversation timelines, a confusion matrix when gold labels exist."""
    from erc_stream.report import build_report, load_rows, rows_from_events

    if (source is None) == (not from_topic):
        raise click.UsageError("give exactly one of --input PATH and --from-topic")
    settings = _settings(ctx)
    if from_topic:
        from erc_stream.readers import read_events

        rows = rows_from_events(read_events(settings).events)
    else:
        rows = load_rows(source)
    try:
        result = build_report(rows, out, conversations=conversations, max_conversations=max_conversations)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    for chart in result.charts:
        click.echo(f"wrote {chart}")
    click.echo(f"wrote {result.html} ({result.summary['events']} events, {result.summary['conversations']} "
               f"conversations)")


@main.command()
@click.option("--paths", default="naive,hf,vllm", show_default=True,
              help="Comma-separated: naive (generate + parse, one at a time), hf (batched label scoring, prefix "
                   "cache), vllm; on request: hf-bf16, hf-no-prefix-cache, hf-merged, vllm-fp32, "
                   "vllm-no-prefix-cache, vllm-merged.")
@click.option("--messages", type=int, default=64, show_default=True, help="MELD dev utterances, in stream order.")
@click.option("--rate", type=float, default=None,
              help="Fixed input rate (messages/s) for the latency run (default: 80 % of the naive loop's throughput).")
@click.option("--no-consumer-overhead", is_flag=True, help="Skip the null-backend stream throughput run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def bench(ctx, paths, messages, rate, no_consumer_overhead, as_json):
    """The inference paths side by side on the same model, adapter and messages (see erc_stream/bench.py)."""
    import json

    from rich.console import Console

    from erc_stream.bench import run_bench

    progress = (lambda msg: click.echo(msg, err=True)) if as_json else Console(stderr=True).print
    result = run_bench(_settings(ctx), paths=[p.strip() for p in paths.split(",") if p.strip()], messages=messages,
                       rate=rate, consumer_overhead=not no_consumer_overhead, log=progress)
    if as_json:
        click.echo(json.dumps(result))
    else:
        from erc_stream.render import print_bench

        print_bench(result)


@main.command("replay-dlq")
@click.option("--error-type", "error_types", multiple=True,
              help="Replay only these error types (repeatable), e.g. inference, conflict. Default: all.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; send nothing.")
@click.pass_context
def replay_dlq(ctx, error_types, dry_run):
    """Send dead-lettered records back to the input topic, with their original key and bytes."""
    from collections import Counter

    from kafka import KafkaProducer

    from erc_stream.readers import read_dead_letters

    settings = _settings(ctx)
    letters, copies = read_dead_letters(settings)
    chosen = [d for d in letters if not error_types or d.error_type in error_types]
    truncated = [d for d in chosen if d.original_truncated]
    chosen = [d for d in chosen if not d.original_truncated]
    click.echo(f"{len(letters)} dead letters ({copies} copies dropped); replaying {len(chosen)}"
               f" {dict(Counter(d.error_type for d in chosen))}; {len(truncated)} skipped (original cut)", err=True)
    if dry_run or not chosen:
        return
    import base64

    producer = KafkaProducer(acks="all", max_request_size=max(1_048_576, settings.kafka.max_message_bytes * 2),
                             **settings.kafka.client_options())
    try:
        futures = [producer.send(settings.kafka.input_topic, value=d.original(),
                                 key=base64.b64decode(d.key_b64) if d.key_b64 else None) for d in chosen]
        producer.flush()
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close(timeout=10)
    click.echo(f"replayed {len(chosen)} records to {settings.kafka.input_topic}", err=True)


if __name__ == "__main__":
    main()
