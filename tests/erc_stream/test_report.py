"""`erc-stream report`: the charts and the HTML page, checked by their contents."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
from click.testing import CliRunner

from core.records import EmotionEvent
from erc_stream.cli import main

LABELS = ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry")
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _events(gold: bool) -> list[EmotionEvent]:
    """3 conversations of 4, 6 and 8 turns over 30 minutes; predicted labels cycle, gold is the label except
    every third turn (then neutral)."""
    out = []
    for c, turns in enumerate((4, 6, 8)):
        for t in range(turns):
            label = LABELS[(c + t) % len(LABELS)]
            probs = {name: (0.55 if name == label else 0.075) for name in LABELS}
            mid = f"conv-{c}:{t}"
            out.append(EmotionEvent(
                event_id=EmotionEvent.make_id(tenant=None, conversation_id=f"conv-{c}", message_id=mid, model="m", adapter=None), message_id=mid, conversation_id=f"conv-{c}", turn=t,
                speaker=f"s{t % 2}", tenant=["acme", "globex"][c % 2], label=label, probabilities=probs,
                label_set="meld", model="m", window=1, latency_ms=5.0, emitted_at=T0 + timedelta(minutes=2 * t + c),
                gold_label=(label if t % 3 else "neutral") if gold else None))
    return out


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)
            self._in_td = False


def _png(data: bytes) -> np.ndarray:
    image = mpimg.imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert float(image[..., :3].std()) > 0.01  # drawn on, not blank
    return image


def _jsonl(tmp_path: Path, events: list[EmotionEvent]) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(e.model_dump_json() + "\n" for e in events + events[:2]))  # with two copies
    return path


def test_report_from_a_jsonl_export_with_gold_labels(tmp_path: Path) -> None:
    events = _events(gold=True)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", "--input", str(_jsonl(tmp_path, events)), "--out", str(out),
                                       "--max-conversations", "2"])
    assert result.exit_code == 0, result.output + repr(result.exception)

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["confusion_matrix.png", "emotion_distribution.png", "timeline-1-conv-2.png",
                    "timeline-2-conv-1.png"]  # the two busiest conversations
    for name in pngs:
        _png((out / name).read_bytes())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["events"] == len(events) and summary["conversations"] == 3  # copies dropped
    assert summary["labels"] == dict(Counter(e.label for e in events))
    assert summary["tenants"] == {"acme": 12, "globex": 6}
    assert summary["distribution"]["bucket"] == "minute"
    conf = summary["confusion"]
    labels = conf["labels"]
    matrix = np.array(conf["matrix"])
    assert matrix.sum() == len(events)
    expected = Counter((e.gold_label, e.label) for e in events)
    assert all(matrix[labels.index(g), labels.index(p)] == n for (g, p), n in expected.items())
    correct = sum(n for (g, p), n in expected.items() if g == p)
    assert conf["accuracy"] == round(correct / len(events), 4)

    page = _Page()
    page.feed((out / "report.html").read_text())
    assert [img["data-file"] for img in page.images] == ["emotion_distribution.png", "timeline-1-conv-2.png",
                                                        "timeline-2-conv-1.png", "confusion_matrix.png"]
    for img in page.images:  # embedded, byte for byte the PNG next to it
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        assert base64.b64decode(img["src"][len(prefix):]) == (out / img["data-file"]).read_bytes()
    cells = page.cells
    label_counts = {cells[i]: int(cells[i + 1]) for i in range(0, len(cells), 2) if cells[i] in LABELS}
    assert label_counts == dict(Counter(e.label for e in events))


def test_report_without_gold_labels_and_chosen_conversations(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", "--input", str(_jsonl(tmp_path, _events(gold=False))), "--out",
                                       str(out), "--conversation", "conv-0"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["emotion_distribution.png", "timeline-1-conv-0.png"]
    assert json.loads((out / "summary.json").read_text())["confusion"] is None
    assert "No gold labels" in (out / "report.html").read_text()

    missing = CliRunner().invoke(main, ["report", "--input", str(tmp_path / "events.jsonl"), "--out", str(out),
                                        "--conversation", "nope"])
    assert missing.exit_code != 0 and "no events for conversation(s) ['nope']" in missing.output


def test_report_from_the_topic(settings, tmp_path: Path) -> None:
    from tests.kafka_helpers import produce_raw

    events = _events(gold=False)
    produce_raw(settings, settings.kafka.output_topic,
                [(e.conversation_id.encode(), e.to_bytes()) for e in events + events[:3]])  # with copies
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", "--from-topic", "--out", str(out)],
                                env={"ERC_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
                                     "ERC_KAFKA__OUTPUT_TOPIC": settings.kafka.output_topic})
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["events"] == len(events) and summary["labels"] == dict(Counter(e.label for e in events))
    assert len(list(out.glob("timeline-*.png"))) == 3
    both = CliRunner().invoke(main, ["report", "--from-topic", "--input", str(out), "--out", str(out)])
    assert both.exit_code != 0 and "exactly one of" in both.output
