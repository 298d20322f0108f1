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


def print_registry(registry) -> None:
    bases = Table(title="base models")
    for col in ("name", "converted", "path"):
        bases.add_column(col)
    for b in registry.bases():
        bases.add_row(b["name"], "yes" if b["converted"] else "on first use", b["path"])
    console.print(bases)
    active = {ls: (registry.active(ls).name if registry.active(ls) else None)
              for ls in ("meld", "emorynlp", "iemocap", "unified")}
    adapters = Table(title="adapters")
    for col in ("name", "label set", "base", "window", "dev W-F1", "created", "where", "active"):
        adapters.add_column(col)
    for a in registry.adapters():
        m = a.meta
        dev = (m.get("dev") or {}).get("weighted_f1")
        adapters.add_row(a.name, str(a.label_set), str(m.get("base")), str(m.get("window")),
                         f"{dev:.1f}" if dev is not None else "-", str(m.get("created", "-")),
                         "shipped" if a.shipped else "store", "yes" if active.get(a.label_set) == a.name else "")
    console.print(adapters)
