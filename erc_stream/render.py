"""Terminal rendering of command results (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


def print_eval(r: dict) -> None:
    t = Table(title=f"{r['dataset']} · {r['adapter'] or 'zero-shot'} · {r['n']} utterances", show_header=False)
    t.add_row("weighted F1", f"{r['weighted_f1']:.2f}")
    t.add_row("accuracy", f"{r['accuracy']:.2f}")
    for name, value in r["baselines"].items():
        t.add_row(name.replace("_", " "), f"{value:.2f}")
    t.add_row("margin over best baseline", f"{r['margin_over_best_baseline']:+.2f}")
    t.add_row("per-label F1", ", ".join(f"{k} {v:.1f}" for k, v in r["per_label_f1"].items()))
    t.add_row("seconds", str(r["seconds"]))
    if r.get("confusion_png"):
        t.add_row("confusion matrix", r["confusion_png"])
    console.print(t)


def print_eval_summary(results: dict[str, dict]) -> None:
    """One adapter on several datasets: a row per dataset."""
    first = next(iter(results.values()))
    t = Table(title=f"{first['adapter'] or 'zero-shot'} · label set {first['label_set']}")
    for col in ("dataset", "n", "weighted F1", "accuracy", "majority", "zero-shot"):
        t.add_column(col, justify="left" if col == "dataset" else "right")
    for dataset, r in results.items():
        zs = r["baselines"].get("zero_shot_weighted_f1")
        t.add_row(dataset, str(r["n"]), f"{r['weighted_f1']:.2f}", f"{r['accuracy']:.2f}",
                  f"{r['baselines']['majority_weighted_f1']:.2f}", f"{zs:.2f}" if zs is not None else "-")
    console.print(t)


def print_registry(registry) -> None:
    bases = Table(title="base models")
    for col in ("name", "converted", "path"):
        bases.add_column(col)
    for b in registry.bases():
        bases.add_row(b["name"], "yes" if b["converted"] else "on first use", b["path"])
    console.print(bases)
    active = {ls: ((ref.name, ref.version) if (ref := registry.active(ls)) else None)
              for ls in ("meld", "emorynlp", "iemocap", "unified")}
    adapters = Table(title="adapters")
    for col in ("name", "version", "label set", "base", "window", "dev W-F1", "created", "where", "active"):
        adapters.add_column(col)
    for a in registry.adapters():
        m = a.meta
        dev = a.dev_weighted_f1
        adapters.add_row(a.name, str(a.version), str(a.label_set), str(m.get("base")), str(m.get("window")),
                         f"{dev:.1f}" if dev is not None else "-", str(m.get("created", "-")),
                         "shipped" if a.shipped else "store",
                         "yes" if active.get(a.label_set) == (a.name, a.version) else "")
    console.print(adapters)


def print_bench(result: dict) -> None:
    """The benchmark's paths as a table, then the machine and the stream's own overhead."""
    table = Table(title=f"{result['messages']} messages · {result['source']}")
    cols = [("path", "path"), ("utt/s", "utterances_per_s"), ("× naive", "speedup_vs_naive"),
            ("prompt tok/utt", "prompt_tokens_per_utterance"), ("computed tok/utt", "computed_tokens_per_utterance"),
            ("W-F1", "weighted_f1"), ("W-F1 uncorrected", "weighted_f1_uncorrected"), ("dtype", "dtype"),
            ("fraction of peak", "fraction_of_peak"),
            ("peak RSS MB", "peak_rss_mb")]
    for name, _ in cols:
        table.add_column(name, justify="left" if name == "path" else "right")
    table.add_column("latency p50/p95/p99 ms (fixed rate)", justify="right")
    table.add_column("(saturation)", justify="right")
    for r in result["paths"].values():
        if "error" in r:
            table.add_row(r["path"], *["–"] * (len(cols) + 1), "failed")
            continue
        lat = lambda d: "/".join(f"{d[k]:.0f}" for k in ("p50", "p95", "p99"))  # noqa: E731
        table.add_row(*[str(r.get(key, "–")) for _, key in cols], lat(r["latency_ms_fixed_rate"]),
                      lat(r["latency_ms_saturation"]))
    console.print(table)
    peaks = result.get("matmul_peak_gflops_by_dtype") or {"float32": result["matmul_peak_gflops"]}
    console.print(f"machine: {result['machine']}; matmul peak GFLOP/s {peaks}; needed per "
                  f"utterance: {result['needed_new_tokens_per_utterance']} new tokens, "
                  f"{result['needed_gflop_per_utterance']} GFLOP")
    if "consumer_overhead" in result:
        console.print(f"consumer overhead (null backend): {result['consumer_overhead']}")


def print_long_bench(result: dict) -> None:
    """``bench --long``: each backend's three arrangements of the same turns, tokens per utterance and F1."""
    table = Table(title=f"long conversations · {result['source']} · window {result['window_size']}, "
                        f"hop {result['window_hop']}")
    for name in ("backend / arrangement", "hop", "utt", "prompt tok/utt", "computed tok/utt",
                 "computed in the first window", "after it", "× scenes", "utt/s", "W-F1"):
        table.add_column(name, justify="left" if name.startswith("backend") else "right")
    for key, r in result["results"].items():
        if "error" in r:
            table.add_row(key, *["–"] * 8, "failed")
            continue
        table.add_row(key, str(r["window_hop"]), str(r["messages"]), str(r["prompt_tokens_per_utterance"]),
                      str(r["computed_tokens_per_utterance"]),
                      str(r["first_window"]["computed_tokens_per_utterance"]),
                      str(r["after_first_window"]["computed_tokens_per_utterance"]),
                      str(r.get("computed_tokens_vs_scenes", "–")), str(r["utterances_per_s"]), str(r["weighted_f1"]))
    console.print(table)
    console.print(f"machine: {result['machine']}; {result['seconds']} s")
