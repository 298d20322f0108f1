"""The label-prior correction: fitting on held-out items, applying it, and where it is used."""

from collections import Counter

import pytest

from core.labels import get_label_set
from model_store.training import TrainConfig, build_examples, schedule, split_targets
from producer_sim.synthetic import synthetic_conversations
from scoring.calibration import Calibration, fit
from scoring.prompts import PromptBuilder


def _biased_model(gold: list[str]) -> list[dict[str, float]]:
    """A model that knows the label but over-weights "neutral": right only where the true label beats it."""
    out = []
    for g in gold:
        d = {"neutral": 0.55, "joyful": 0.05, "angry": 0.05}
        d[g] = d[g] + 0.35
        total = sum(d.values())
        out.append({k: v / total for k, v in d.items()})
    return out


def test_fit_finds_a_power_that_undoes_a_majority_bias() -> None:
    gold = ["neutral"] * 50 + ["joyful"] * 25 + ["angry"] * 25
    dists = _biased_model(gold)
    cal = fit(dists, gold)
    assert cal.n == 100 and cal.prior["neutral"] > cal.prior["joyful"]
    assert cal.weighted_f1_before is not None and cal.weighted_f1_before < 50  # everything -> neutral
    assert cal.power > 0 and cal.weighted_f1_after == 100.0
    assert max(cal.apply(dists[60]), key=cal.apply(dists[60]).get) == "joyful"


def test_fit_keeps_power_zero_when_the_model_is_already_right() -> None:
    gold = ["neutral", "joyful", "angry"] * 10
    dists = [{k: (0.8 if k == g else 0.1) for k in ("neutral", "joyful", "angry")} for g in gold]
    assert fit(dists, gold).power == 0.0


def test_apply_renormalises_and_round_trips_through_metadata() -> None:
    cal = Calibration(prior={"a": 0.8, "b": 0.2}, power=1.0)
    out = cal.apply({"a": 0.6, "b": 0.4})
    assert out["b"] > out["a"] and sum(out.values()) == pytest.approx(1.0)
    assert Calibration.from_dict(cal.as_dict()) == cal and Calibration.from_dict(None) is None
    assert Calibration(prior={"a": 0.8}, power=0.0).apply({"a": 0.6, "b": 0.4}) == {"a": 0.6, "b": 0.4}


def test_calibration_utterances_are_held_out_of_training() -> None:
    convs = synthetic_conversations(6)
    label_set = get_label_set("meld")
    cfg = TrainConfig(name="x", dataset="jsonl", train_file="-", label_set="meld", calibration=10)
    train, held = split_targets(cfg, convs, label_set)
    assert len(held) == 10
    key = lambda t: (t.conversation.conversation_id, t.index)  # noqa: E731
    assert not {key(t) for t in train} & {key(t) for t in held}
    assert split_targets(cfg, convs, label_set)[1] == held  # deterministic


def test_label_balance_flattens_the_main_task_draws() -> None:
    convs = synthetic_conversations(8)
    builder = PromptBuilder(get_label_set("meld"), max_tokens=10_000)
    base = TrainConfig(name="x", dataset="jsonl", train_file="-", label_set="meld", speaker_steps=0, steps=400,
                       batch_size=4, impact_per_batch=0)
    examples = build_examples(base, convs, builder, None)

    def spread(cfg: TrainConfig) -> float:
        counts = Counter(examples["main"][i].answer for batch in schedule(cfg, examples) for _, i in batch)
        return max(counts.values()) / min(counts.values())

    natural = Counter(ex.answer for ex in examples["main"])
    assert len(natural) >= 3 and max(natural.values()) > 1.5 * min(natural.values())
    balanced = TrainConfig(**{**base.__dict__, "balance": 1.0})
    assert spread(balanced) < spread(base)
    assert spread(balanced) < 1.5
