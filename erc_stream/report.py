"""``erc-stream report``: pictures of what happened, from an exported dataset, a JSONL export or the topic.

Writes into one directory:

- ``emotion_distribution.png``: events per label over time (stacked bars; the bucket — minute, hour or
  day — is chosen from the time span);
- ``timeline-<n>-<conversation>.png``: one per conversation shown (the busiest ones, or those asked for):
  each turn's label, the dot's size its probability, gold labels as rings where present;
- ``confusion_matrix.png``: predicted against gold labels, only when events carry gold labels;
- ``summary.json``: the figures behind the charts (counts per label, per tenant, weighted F1 …);
- ``report.html``: one self-contained page with the summary and every chart embedded.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from core.labels import LABEL_SETS  # noqa: E402


@dataclass(frozen=True)
class Row:
    """What the charts need of one event."""

    event_id: str
    conversation_id: str
    turn: int
    speaker: str
    tenant: str | None
    label: str
    confidence: float
    label_set: str
    emitted_at: datetime
    gold_label: str | None


# -- loading ------------------------------------------------------------------------------------


def rows_from_dataset(root: Path) -> list[Row]:
    from erc_stream.export import read_dataset

    return [Row(r["event_id"], r["conversation_id"], r["turn"], r["speaker"], r["tenant"], r["label"],
                r["confidence"], r["label_set"], r["emitted_at"].astimezone(UTC), r["gold_label"])
            for r in read_dataset(root).to_pylist()]


def rows_from_events(events: Iterable) -> list[Row]:
    """From :class:`~core.records.EmotionEvent` objects (the topic, a JSONL export)."""
    return [Row(e.event_id, e.conversation_id, e.turn, e.speaker, e.tenant, e.label, e.probabilities[e.label],
                e.label_set, e.emitted_at.astimezone(UTC), e.gold_label) for e in events]


def rows_from_jsonl(path: Path) -> list[Row]:
    from core.records import EmotionEvent

    return rows_from_events(EmotionEvent.model_validate_json(line) for line in path.read_text().splitlines()
                            if line.strip())


def load_rows(source: Path) -> list[Row]:
    """A dataset directory (Parquet or CSV, from ``export``) or a JSONL file; copies dropped by event_id."""
    rows = rows_from_dataset(source) if source.is_dir() else rows_from_jsonl(source)
    seen: set[str] = set()
    return [r for r in rows if not (r.event_id in seen or seen.add(r.event_id))]


# -- charts -------------------------------------------------------------------------------------


def _label_order(rows: Sequence[Row]) -> list[str]:
    """The label set's order where known, then any other label seen."""
    order: list[str] = []
    for name in dict.fromkeys(r.label_set for r in rows):
        if name in LABEL_SETS:
            order += [lab for lab in LABEL_SETS[name].labels if lab not in order]
    seen = {r.label for r in rows} | {r.gold_label for r in rows if r.gold_label}
    return [lab for lab in order if lab in seen] + sorted(seen - set(order))


def _colors(labels: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def _bucket(span: timedelta) -> tuple[timedelta, str]:
    if span <= timedelta(hours=2):
        return timedelta(minutes=1), "minute"
    if span <= timedelta(days=3):
        return timedelta(hours=1), "hour"
    return timedelta(days=1), "day"


def _floor(t: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((t - epoch) // step) * step


def distribution_over_time(rows: Sequence[Row], labels: Sequence[str], path: Path) -> dict[str, object]:
    times = [r.emitted_at for r in rows]
    step, unit = _bucket(max(times) - min(times))
    counts: dict[datetime, Counter] = defaultdict(Counter)
    for r in rows:
        counts[_floor(r.emitted_at, step)][r.label] += 1
    buckets = sorted(counts)
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    width = step / timedelta(days=1) * 0.9
    bottom = [0] * len(buckets)
    for lab in labels:
        heights = [counts[b][lab] for b in buckets]
        if any(heights):
            ax.bar(buckets, heights, width=width, bottom=bottom, color=colors[lab], label=lab, align="edge")
            bottom = [x + h for x, h in zip(bottom, heights)]
    ax.set_title(f"Emotions over time ({len(rows)} events, per {unit}, UTC)")
    ax.set_ylabel("events")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"bucket": unit, "buckets": len(buckets)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[-60:].strip("_") or "conversation"


def conversation_timeline(conv: str, rows: Sequence[Row], labels: Sequence[str], path: Path) -> None:
    rows = sorted(rows, key=lambda r: r.turn)
    y = {lab: i for i, lab in enumerate(labels)}
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.45 * len(rows) + 3)), 0.42 * len(labels) + 1.6), dpi=100)
    ax.plot([r.turn for r in rows], [y[r.label] for r in rows], color="0.75", zorder=1, linewidth=1)
    ax.scatter([r.turn for r in rows], [y[r.label] for r in rows], s=[40 + 260 * r.confidence for r in rows],
               c=[colors[r.label] for r in rows], zorder=2, label="predicted (size = probability)")
    gold = [r for r in rows if r.gold_label in y]
    if gold:
        ax.scatter([r.turn for r in gold], [y[r.gold_label] for r in gold], s=160, facecolors="none",
                   edgecolors="black", linewidths=1.2, zorder=3, label="gold")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlabel("turn")
    ax.set_title(f"Conversation {conv}", fontsize=10)
    ax.grid(axis="y", color="0.92")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion(rows: Sequence[Row], labels: Sequence[str], path: Path) -> dict[str, object]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    pairs = [(r.gold_label, r.label) for r in rows if r.gold_label]
    gold, pred = zip(*pairs)
    matrix = confusion_matrix(gold, pred, labels=list(labels))
    fig, ax = plt.subplots(figsize=(1.0 * len(labels) + 2.5, 0.9 * len(labels) + 2), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    peak = matrix.max() or 1
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > peak / 2 else "black", fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    f1 = f1_score(gold, pred, average="weighted", zero_division=0)
    ax.set_title(f"Confusion matrix (n={len(pairs)}, weighted F1 {100 * f1:.1f})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"n": len(pairs), "weighted_f1": round(float(f1), 4),
            "accuracy": round(float(accuracy_score(gold, pred)), 4), "labels": list(labels),
            "matrix": matrix.tolist()}


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Report:
    out: Path
    charts: list[Path]
    summary: dict[str, object]

    @property
    def html(self) -> Path:
        return self.out / "report.html"


def build_report(rows: Sequence[Row], out: Path, *, conversations: Sequence[str] = (), max_conversations: int = 4,
                 title: str = "erc-stream report") -> Report:
    if not rows:
        raise ValueError("no events to report on")
    out.mkdir(parents=True, exist_ok=True)
    labels = _label_order(rows)
    charts: list[tuple[Path, str]] = []

    dist = out / "emotion_distribution.png"
    over_time = distribution_over_time(rows, labels, dist)
    charts.append((dist, "Emotion distribution over time"))

    by_conv: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_conv[r.conversation_id].append(r)
    chosen = list(conversations) or [c for c, _ in sorted(by_conv.items(), key=lambda kv: (-len(kv[1]), kv[0]))
                                     [:max_conversations]]
    unknown = [c for c in chosen if c not in by_conv]
    if unknown:
        raise ValueError(f"no events for conversation(s) {unknown}")
    for i, conv in enumerate(chosen, 1):
        path = out / f"timeline-{i}-{_slug(conv)}.png"
        conversation_timeline(conv, by_conv[conv], labels, path)
        charts.append((path, f"Emotion timeline of conversation {conv}"))

    summary: dict[str, object] = {
        "events": len(rows),
        "conversations": len(by_conv),
        "tenants": dict(sorted(Counter(r.tenant or "(none)" for r in rows).items())),
        "labels": {lab: n for lab in labels if (n := sum(1 for r in rows if r.label == lab))},
        "first_emitted_at": min(r.emitted_at for r in rows).isoformat(),
        "last_emitted_at": max(r.emitted_at for r in rows).isoformat(),
        "distribution": over_time,
        "timelines": chosen,
        "confusion": None,
    }
    if any(r.gold_label for r in rows):
        path = out / "confusion_matrix.png"
        summary["confusion"] = confusion(rows, labels, path)
        charts.append((path, "Confusion matrix (predicted vs gold)"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_html(out / "report.html", title, summary, charts)
    return Report(out, [p for p, _ in charts], summary)


def _write_html(path: Path, title: str, summary: dict[str, object], charts: Sequence[tuple[Path, str]]) -> None:
    e = html.escape
    label_rows = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in summary["labels"].items())
    tenant_rows = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in summary["tenants"].items())
    conf = summary["confusion"]
    scores = (f"<p>Against gold labels (n={conf['n']}): weighted F1 <b>{100 * conf['weighted_f1']:.1f}</b>, "
              f"accuracy {100 * conf['accuracy']:.1f}.</p>" if conf else "<p>No gold labels: no confusion matrix.</p>")
    figures = "".join(
        f'<figure><img alt="{e(caption)}" data-file="{e(p.name)}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{e(caption)}'
        f"</figcaption></figure>\n" for p, caption in charts)
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:0 2em 1em 0;
display:inline-table;vertical-align:top}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head>
<body><h1>{e(title)}</h1>
<p id="totals"><span id="events">{summary['events']}</span> events in {summary['conversations']} conversations,
{e(str(summary['first_emitted_at']))} to {e(str(summary['last_emitted_at']))} (UTC).</p>
<table id="labels"><tr><th>label</th><th>events</th></tr>{label_rows}</table>
<table id="tenants"><tr><th>tenant</th><th>events</th></tr>{tenant_rows}</table>
{scores}
{figures}</body></html>
""")
