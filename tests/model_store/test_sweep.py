"""``models sweep`` end to end on a tiny data directory: every cell trains and is evaluated, and a rerun resumes."""

from __future__ import annotations

import csv
import json
from fractions import Fraction
from pathlib import Path

import pytest
from click.testing import CliRunner

from erc_stream.cli import main
from model_store.registry import versions
import model_store.sweep as sweep
from model_store.sweep import Cell, SweepPlan, plot, run_sweep, write_table
from tests.datasets import write_data_dir


def test_the_grid_has_a_cell_per_strategy_dataset_and_fraction() -> None:
    plan = SweepPlan(datasets=("meld", "emorynlp"), fractions=(Fraction(1, 8), Fraction(1, 64)),
                     full_fractions=(Fraction(1, 64),))
    names = [c.name for c in plan.cells()]
    assert len(names) == len(set(names)) == 2 * 4 + 1
    assert "sweep-single-emorynlp-lora-f1_8" in names and "sweep-ratio-lora-f1_64" in names
    assert Cell("total", Fraction(1, 64), kind="full").name in names


def _row(strategy: str, fraction: Fraction, trained_on: str, kind: str = "lora", meld: float = 40.0) -> dict:
    return {"cell": f"{strategy}-{trained_on}-{kind}-{fraction}", "strategy": strategy, "trained_on": trained_on,
            "kind": kind, "fraction": str(fraction), "fraction_value": float(fraction), "train_utterances": 10,
            "steps": 5, "train_seconds": 1.0, "meld_weighted_f1": meld, "emorynlp_weighted_f1": 20.0,
            "meld_majority_weighted_f1": 25.0, "emorynlp_majority_weighted_f1": 15.0, "meld_n": 9, "emorynlp_n": 9}


def test_table_and_plot_from_rows(tmp_path: Path) -> None:
    rows = [_row("total", Fraction(1, 8), "meld+emorynlp", meld=45.5), _row("single", Fraction(1, 8), "meld"),
            _row("total", Fraction(1, 64), "meld+emorynlp", kind="full", meld=30.0)]
    write_table(rows, ("meld", "emorynlp"), tmp_path)
    plot(rows, ("meld", "emorynlp"), tmp_path / "sweep.png")
    md = (tmp_path / "sweep.md").read_text()
    assert "| 1/8 | total | meld+emorynlp | lora | 10 | 5 | 1 | 45.50 | 20.00 |" in md
    assert "| 1/64 | total | meld+emorynlp | full |" in md and "meld 25.00 (n=9)" in md
    assert len(list(csv.DictReader((tmp_path / "sweep.csv").open()))) == 3
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_the_table_is_rebuilt_after_every_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid carried across sessions shows its finished cells, marked partial, before the last one is in."""
    plan = SweepPlan(datasets=("meld", "emorynlp"), fractions=(Fraction(1, 8),), strategies=("total", "ratio"),
                     full_fractions=())
    trained: list[str] = []

    def cell_then_stop(plan: SweepPlan, cell: Cell, settings: object, *, progress: bool = False) -> dict:
        if trained:  # the session ends during the second cell
            raise KeyboardInterrupt
        trained.append(cell.name)
        return _row(cell.strategy, cell.fraction, "meld+emorynlp", meld=44.0) | {"plan": sweep._plan_dict(plan)}

    monkeypatch.setattr(sweep, "run_cell", cell_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, None, tmp_path)  # type: ignore[arg-type]  # settings reach run_cell only
    md = (tmp_path / "sweep.md").read_text()
    assert "| 1/8 | total | meld+emorynlp | lora | 10 | 5 | 1 | 44.00 |" in md
    assert "Partial: 1 of the plan's 2 cells are in" in md and (tmp_path / "sweep.png").exists()

    def cell(plan: SweepPlan, cell: Cell, settings: object, *, progress: bool = False) -> dict:
        trained.append(cell.name)
        return _row(cell.strategy, cell.fraction, "meld+emorynlp", meld=46.0) | {"plan": sweep._plan_dict(plan)}

    monkeypatch.setattr(sweep, "run_cell", cell)
    rows = run_sweep(plan, None, tmp_path)  # type: ignore[arg-type]
    assert trained == ["sweep-total-lora-f1_8", "sweep-ratio-lora-f1_8"] and len(rows) == 2
    md = (tmp_path / "sweep.md").read_text()
    assert "| 1/8 | ratio | meld+emorynlp | lora | 10 | 5 | 1 | 46.00 |" in md and "Partial" not in md


@pytest.mark.slow
def test_sweep_trains_evaluates_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import Settings
    from model_store.base_models import ensure_embedded

    # the shared embedded model, not a second conversion in the test's store
    embedded = ensure_embedded(Settings().store.dir)
    (tmp_path / "store" / "base").mkdir(parents=True)
    (tmp_path / "store" / "base" / "smollm2-135m").symlink_to(embedded)
    data = write_data_dir(tmp_path / "data", conversations=4)
    monkeypatch.setenv("ERC_DATA__DIR", str(data))
    monkeypatch.setenv("ERC_STORE__DIR", str(tmp_path / "store"))
    args = ["models", "sweep", "--fractions", "1/2", "--strategies", "single,ratio", "--full-at", "",
            "--epochs", "0.1", "--min-steps", "1", "--window", "2", "--max-tokens", "96", "--eval-limit", "4",
            "--threads", "1", "--out", str(tmp_path / "sweep")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cells = sorted((tmp_path / "sweep" / "cells").glob("*.json"))
    assert [c.stem for c in cells] == ["sweep-ratio-lora-f1_2", "sweep-single-emorynlp-lora-f1_2",
                                       "sweep-single-meld-lora-f1_2"]
    ratio = json.loads(cells[0].read_text())
    assert ratio["trained_on"] == "meld+emorynlp" and ratio["meld_n"] == 4 and ratio["emorynlp_n"] == 4
    assert 0 <= ratio["meld_weighted_f1"] <= 100 and ratio["steps"] >= 1
    [version] = versions("sweep-ratio-lora-f1_2", tmp_path / "store")  # one version of the cell's adapter
    assert (version.path / "adapter_config.json").exists() and version.path.parent.name == "sweep-ratio-lora-f1_2"
    assert "| 1/2 | ratio | meld+emorynlp | lora |" in result.output
    # A rerun finds every cell done: nothing trains again.
    stamps = [c.stat().st_mtime_ns for c in cells]
    again = CliRunner().invoke(main, args + ["--threads", "2"])  # threads change the speed, not the cells
    assert again.exit_code == 0 and [c.stat().st_mtime_ns for c in cells] == stamps
    # Another plan (more epochs) trains a cell again, and its table holds that plan's cells only.
    other = ["--strategies", "ratio", "--epochs", "0.2"]
    longer = CliRunner().invoke(main, [*args, *other])
    assert longer.exit_code == 0, longer.output
    assert cells[0].stat().st_mtime_ns != stamps[0] and [c.stat().st_mtime_ns for c in cells[1:]] == stamps[1:]
    assert json.loads(cells[0].read_text())["plan"]["epochs"] == 0.2
    assert "| 1/2 | ratio |" in longer.output and "| 1/2 | single |" not in longer.output
    # The unified adapter on both datasets from one eval command.
    out = CliRunner().invoke(main, ["models", "eval", "--dataset", "meld", "--dataset", "emorynlp", "--adapter",
                                    "sweep-ratio-lora-f1_2", "--limit", "4", "--no-zero-shot", "--json"])
    assert out.exit_code == 0, out.output
    # the JSON object among the log lines of the captured output
    per, _ = json.JSONDecoder().raw_decode(out.output[out.output.index('{"meld"'):])
    assert set(per) == {"meld", "emorynlp"} and {r["label_set"] for r in per.values()} == {"unified"}
