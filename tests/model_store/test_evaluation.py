from pathlib import Path

from core.settings import Settings
from model_store.evaluation import evaluate, metrics
from producer_sim.synthetic import synthetic_conversations
from scoring.adapters import AdapterChoice


def test_metrics_weighted_f1_by_hand() -> None:
    gold = ["neutral", "neutral", "neutral", "angry"]
    pred = ["neutral", "neutral", "angry", "angry"]
    m = metrics(gold, pred, ["neutral", "angry", "sad"])
    # neutral: P=1, R=2/3 -> F1=0.8 (support 3); angry: P=0.5, R=1 -> F1=2/3 (support 1)
    assert abs(m["weighted_f1"] - 100 * (3 * 0.8 + 2 / 3) / 4) < 0.01
    assert m["accuracy"] == 75.0
    assert m["majority_label"] == "neutral"
    assert abs(m["majority_weighted_f1"] - 100 * 0.75 * (2 * 0.75 / 1.75)) < 0.01


def test_evaluation_on_a_tiny_set_through_the_serving_path(hf_backend, tmp_path: Path) -> None:
    convs = synthetic_conversations(2)
    n = sum(len(c.utterances) for c in convs)
    report = evaluate(Settings(), hf_backend, AdapterChoice(None), convs, dataset="synthetic", file="-",
                      confusion=tmp_path / "cm.png")
    assert report.n == n and report.failed == 0
    assert 0 <= report.weighted_f1 <= 100 and 0 <= report.accuracy <= 100
    assert sum(report.support.values()) == n
    png = Path(report.confusion_png).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_models_eval_scores_the_scripted_conversations_without_a_data_directory(
        tmp_path: Path, monkeypatch) -> None:
    import json

    from click.testing import CliRunner

    from erc_stream.cli import main
    from producer_sim.synthetic import scripted_conversations

    monkeypatch.setenv("ERC_DATA__DIR", str(tmp_path / "no-data"))  # a fresh machine: nothing to read
    scripted = scripted_conversations()
    result = CliRunner().invoke(main, ["models", "eval", "--dataset", "synthetic", "--label-set", "meld",
                                       "--adapter", "none", "--no-zero-shot", "--dialogues", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = result.output  # the report after the log lines
    report, _ = json.JSONDecoder().raw_decode(out, out.index('{"dataset"'))
    assert report["dataset"] == "synthetic" and report["file"] == "<synthetic>"
    assert report["n"] == sum(len(c.utterances) for c in scripted[:2]) and report["failed"] == 0
