"""``erc-stream bench``: the inference paths side by side (:mod:`bench.scoring_paths`), or with ``--long`` what a turn
costs in long conversations, through the consumer (:mod:`bench.long_conversations`)."""

from __future__ import annotations

import click

from erc_stream.cli.root import main, settings_of


@main.command()
@click.option("--paths", default="naive,hf,vllm", show_default=True,
              help="Comma-separated: naive (generate + parse, one at a time), hf (batched label scoring, prefix "
                   "cache), vllm; on request: naive-bf16, naive-fp32, hf-bf16, hf-fp32, hf-padded, hf-no-prefix-cache, "
                   "hf-merged, hf-bf16-merged, hf-bf16-merged-b64, vllm-fp32, vllm-no-prefix-cache, vllm-merged.")
@click.option("--messages", type=int, default=64, show_default=True, help="MELD dev utterances, in stream order.")
@click.option("--open-conversations", type=int, default=8, show_default=True,
              help="Conversations the replay keeps open at once (one turn of each in turn): a busy stream's "
                   "micro-batches hold turns of many conversations.")
@click.option("--rate", type=float, default=None,
              help="Fixed input rate (messages/s) for the latency run (default: 80 % of the naive loop's throughput).")
@click.option("--no-consumer-overhead", is_flag=True, help="Skip the null-backend stream throughput run.")
@click.option("--long", "long_", is_flag=True,
              help="Long conversations through the consumer instead: scenes, sliding window and hop window on the "
                   "same turns (bench/long_conversations.py).")
@click.option("--long-backends", default="hf,vllm", show_default=True, help="--long: the backends to run.")
@click.option("--long-conversations", type=int, default=4, show_default=True,
              help="--long: conversations side by side (each round sends one turn of each).")
@click.option("--long-turns", type=int, default=80, show_default=True, help="--long: turns of each conversation.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def bench(ctx, paths, messages, open_conversations, rate, no_consumer_overhead, long_, long_backends,
          long_conversations, long_turns, as_json):
    """The inference paths side by side on the same model, adapter and messages (see bench/scoring_paths.py)."""
    import json

    from rich.console import Console

    progress = (lambda msg: click.echo(msg, err=True)) if as_json else Console(stderr=True).print
    if long_:
        from bench.long_conversations import run_long

        result = run_long(settings_of(ctx), backends=[b.strip() for b in long_backends.split(",") if b.strip()],
                          conversations=long_conversations, turns=long_turns, log=progress)
        if as_json:
            click.echo(json.dumps(result))
        else:
            from erc_stream.render import print_long_bench

            print_long_bench(result)
        return
    from bench.scoring_paths import run_bench

    result = run_bench(settings_of(ctx), paths=[p.strip() for p in paths.split(",") if p.strip()], messages=messages,
                       open_conversations=open_conversations, rate=rate,
                       consumer_overhead=not no_consumer_overhead, log=progress)
    if as_json:
        click.echo(json.dumps(result))
    else:
        from erc_stream.render import print_bench

        print_bench(result)
