"""The paired comparison of two runs' predictions: scores, the difference's standard error, per-label F1."""

from __future__ import annotations

import random

import pytest

from bench.compare_predictions import compare


def _runs(n: int = 400, seed: int = 0):
    rng = random.Random(seed)
    labels = ["neutral", "joyful", "angry"]
    gold = [rng.choice(labels) for _ in range(n)]
    a = {("c", i): (g, g if rng.random() < 0.6 else rng.choice(labels)) for i, g in enumerate(gold)}
    b = {k: (g, g if rng.random() < 0.3 else p) for k, (g, p) in a.items()}  # b fixes some of a's errors
    return a, b


def test_the_difference_is_paired_and_its_error_is_small_when_the_runs_agree_mostly() -> None:
    a, b = _runs()
    r = compare(a, b, resamples=300)
    assert r["n"] == 400 and r["difference_b_minus_a"] > 0
    assert r["difference_b_minus_a"] == pytest.approx(r["weighted_f1_b"] - r["weighted_f1_a"], abs=0.02)
    assert 0 < r["difference_standard_error"] < 3  # far below the ~2.4 of one score on 400 utterances x sqrt(2)
    assert set(r["per_label_f1"]) == {"neutral", "joyful", "angry"}
    assert compare(a, a, resamples=50)["difference_standard_error"] == 0


def test_runs_on_other_data_are_refused() -> None:
    a, b = _runs()
    b[("c", 0)] = ("joyful" if a[("c", 0)][0] != "joyful" else "angry", "angry")
    with pytest.raises(ValueError, match="gold"):
        compare(a, b, resamples=10)
