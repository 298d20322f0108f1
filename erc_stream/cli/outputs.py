"""Reading the outputs: ``export`` (events for BI), ``report`` (plots), ``replay-dlq`` (dead letters back to the input)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from erc_stream.cli.root import main, settings_of


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
    from core.readers import Deduper, read_records
    from core.records import EmotionEvent

    settings = settings_of(ctx)
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
    dedupe = Deduper(settings.export.dedupe_ids)
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
    settings = settings_of(ctx)
    if from_topic:
        from core.readers import read_events

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


@main.command("replay-dlq")
@click.option("--error-type", "error_types", multiple=True,
              help="Replay only these error types (repeatable), e.g. inference, conflict. Default: all.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; send nothing.")
@click.pass_context
def replay_dlq(ctx, error_types, dry_run):
    """Send dead-lettered records back to the input topic, with their original key and bytes."""
    from collections import Counter

    from kafka import KafkaProducer

    from core.readers import read_dead_letters

    settings = settings_of(ctx)
    letters, copies = read_dead_letters(settings)
    # only the input's dead letters go back to the input (the notifier's are alerts a webhook refused)
    chosen = [d for d in letters if d.source_topic == settings.kafka.input_topic
              and (not error_types or d.error_type in error_types)]
    truncated = [d for d in chosen if d.original_truncated]
    batches = [d for d in chosen if d.source_end_offset is not None]  # a whole batch, no original to send
    chosen = [d for d in chosen if not d.original_truncated and d.source_end_offset is None]
    click.echo(f"{len(letters)} dead letters ({copies} copies dropped); replaying {len(chosen)}"
               f" {dict(Counter(d.error_type for d in chosen))}; {len(truncated)} skipped (original cut),"
               f" {len(batches)} skipped (undecodable batches: re-send them from their producer)", err=True)
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


@main.command()
@click.option("--port", type=int, default=None, help="Default: ERC_DASHBOARD__PORT.")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None, hidden=True,
              help="Write the page's URL here once it listens (tests, the demo); with its token only when "
                   "the token was made at start.")
@click.pass_context
def dashboard(ctx, port, ready_file):
    """The live view for supervisors: conversations by risk, timelines, alerts, negative rates, the stream's health."""
    import signal

    from outputs.dashboard import Dashboard

    settings = settings_of(ctx)
    if port is not None:
        settings = settings.with_overrides(dashboard={"port": port})
    board = Dashboard(settings)

    def ready(url: str) -> None:
        click.echo(f"dashboard: {url}", err=True)
        if ready_file is not None:
            ready_file.write_text(url)

    signal.signal(signal.SIGTERM, lambda *_: board.stop())
    try:
        board.serve(on_ready=ready)
    except KeyboardInterrupt:
        board.stop()


@main.command()
@click.option("--idle-exit", type=float, default=None, hidden=True, help="Stop after this many idle seconds (tests).")
@click.pass_context
def notify(ctx, idle_exit):
    """Forward alerts to webhooks (ERC_NOTIFY__TARGETS): per-tenant routing, storms grouped into summaries, each
    target on its own, retries, each alert once per target."""
    import signal

    from outputs.notify import Notifier

    settings = settings_of(ctx)
    if not settings.notify.targets:
        raise click.UsageError("no webhook targets: set ERC_NOTIFY__TARGETS (README, \"Alerts to people\")")
    notifier = Notifier(settings)
    server = notifier.serve_metrics()
    click.echo(f"notifier: {len(settings.notify.targets)} targets; metrics on {server.url}/metrics", err=True)
    signal.signal(signal.SIGTERM, lambda *_: notifier.stop())
    try:
        notifier.run(idle_exit_s=idle_exit)
    except KeyboardInterrupt:
        pass
    finally:
        notifier.close()
        server.close()
