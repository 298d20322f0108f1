"""The stream's commands: ``simulate`` (the producer), ``consume`` (the consumer), ``demo`` (both, and a summary)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from erc_stream.cli.root import DATASETS, LABEL_SETS, main, settings_of


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
    from producer_sim.replay import interleave, replay, to_messages
    from producer_sim.sources import load_source, new_run_id

    settings = settings_of(ctx)
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
    settings = settings_of(ctx).with_overrides(model=overrides, kafka={"group_id": group_id} if group_id else {})
    settings = settings.with_overrides(delivery={k: v for k, v in {"mode": delivery, "worker_id": worker_id}.items()
                                                 if v is not None})
    from consumer.app import BackendGone
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
    except BackendGone as e:  # a dead in-process engine: the orchestrator's restart brings a fresh one
        click.echo(f"erc-stream consume: {e}", err=True)
        sys.exit(4)
    click.echo(f"consumed {stats.consumed}, events {stats.events}, dead letters {stats.dead_letters}", err=True)




@main.command()
@click.option("--dialogues", type=int, default=6, show_default=True, help="MELD dev dialogues to replay.")
@click.option("--synthetic", type=int, default=None, help="Replay N synthetic conversations instead of MELD.")
@click.option("--rate", type=float, default=2.0, show_default=True, help="Messages per second.")
@click.option("--backend", type=click.Choice(["hf", "vllm", "null"]), default=None)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Give up after this many seconds.")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True,
              help="Start the supervisors' web page beside the consumer and print its URL.")
@click.option("--keep-dashboard", is_flag=True, help="Keep the web page up after the summary, until Ctrl-C.")
@click.pass_context
def demo(ctx, dialogues, synthetic, rate, backend, timeout, dashboard, keep_dashboard):
    """The main job: services up, a consumer, a replay, a live view and a closing summary."""
    from erc_stream.demo import run_demo

    settings = settings_of(ctx)
    if backend:
        settings = settings.with_overrides(model={"backend": backend})
    ok = run_demo(settings, dialogues=dialogues, synthetic=synthetic, rate=rate, timeout_s=timeout,
                  dashboard=dashboard, keep_dashboard=keep_dashboard)
    sys.exit(0 if ok else 1)
