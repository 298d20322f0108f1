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


def test_models_eval_on_episodes_joins_each_episodes_scenes(tmp_path: Path, monkeypatch) -> None:
    """``--episodes``: EmoryNLP's scenes of one episode become one long conversation (a file of two episodes, three
    scenes); the adapter's dev record is not overwritten by it; a dataset without episodes is refused."""
    import json

    from click.testing import CliRunner

    from erc_stream.cli import main

    rows = ["Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode,Start_Time,End_Time"]
    for scene, (season, episode) in enumerate([(1, 1), (1, 1), (1, 2)], start=1):
        for u in range(3):
            rows.append(f'"Line {u} of scene {scene}.","[\'Ross\']",Neutral,{scene},{u + 1},{season},{episode},'
                        f"00:00:0{u},00:00:0{u + 1}")
    data = tmp_path / "emory.csv"
    data.write_text("\n".join(rows) + "\n")
    args = ["models", "eval", "--dataset", "emorynlp", "--file", str(data), "--adapter", "none", "--no-zero-shot",
            "--json"]
    predictions = tmp_path / "predictions.jsonl"
    result = CliRunner().invoke(main, [*args, "--episodes", "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output
    out = result.output
    report, _ = json.JSONDecoder().raw_decode(out, out.index('{"dataset"'))
    assert report["n"] == 9 and report["failed"] == 0
    assert report["file"] == "<emorynlp>"  # the joined conversations, not the file's scenes
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert {r["conversation"] for r in rows} == {"emorynlp-s1e1", "emorynlp-s1e2"}
    assert sorted(r["index"] for r in rows if r["conversation"] == "emorynlp-s1e1") == list(range(6))
    refused = CliRunner().invoke(main, ["models", "eval", "--dataset", "synthetic", "--episodes"])
    assert refused.exit_code != 0 and "--episodes" in refused.output
