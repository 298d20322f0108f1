import json
import shutil
from pathlib import Path

import pytest

from core.settings import Settings
from model_store.loading import choose_adapter
from model_store.registry import SHIPPED_ADAPTERS, Registry


def _store_with(lora_adapter: Path, tmp_path: Path, name: str = "mine") -> Path:
    store = tmp_path / "store"
    shutil.copytree(lora_adapter, store / "adapters" / name)
    return store


def test_promote_makes_an_adapter_active_and_changes_the_version(lora_adapter: Path, tmp_path: Path) -> None:
    reg = Registry(_store_with(lora_adapter, tmp_path))
    before = reg.version()
    info = reg.promote("mine")
    assert info.label_set == "meld"
    assert reg.active("meld").name == "mine"
    assert reg.version() != before
    assert "mine" in [a.name for a in reg.adapters()]


@pytest.mark.parametrize("label_set", ["meld", "unified", "emorynlp"])
def test_without_a_promotion_the_shipped_default_is_active(tmp_path: Path, label_set: str) -> None:
    defaults = SHIPPED_ADAPTERS / "defaults.json"
    expected = json.loads(defaults.read_text()).get(label_set) if defaults.exists() else None
    active = Registry(tmp_path / "empty-store").active(label_set)
    assert (active.name if active else None) == expected
    if active is not None:  # a shipped default was trained for the label set it is the default of
        assert json.loads((active.path / "erc_meta.json").read_text())["label_set"] == label_set


def test_unknown_adapter_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter 'nope'"):
        Registry(tmp_path).promote("nope")


def test_choose_adapter_honours_none_and_explicit_names(lora_adapter: Path, tmp_path: Path) -> None:
    store = _store_with(lora_adapter, tmp_path)
    settings = Settings().with_overrides(store={"dir": store})
    assert choose_adapter(settings, "none").ref is None
    assert choose_adapter(settings, "mine").name == "mine"
    Registry(store).promote("mine")
    assert choose_adapter(settings).name == "mine"


def test_the_listed_dev_score_is_the_adapters_own_datasets(lora_adapter: Path, tmp_path: Path) -> None:
    reg = Registry(_store_with(lora_adapter, tmp_path))  # a MELD adapter

    def record(key: str, f1: float) -> float | None:
        reg.record_eval("mine", key, {"weighted_f1": f1, "accuracy": f1, "n": 10})
        assert reg.info("mine").meta["evals"][key]["weighted_f1"] == f1
        return reg.info("mine").dev_weighted_f1

    assert reg.info("mine").dev_weighted_f1 is None
    assert record("meld:dev", 60.0) == 60.0
    for key in ("synthetic:dev", "emorynlp:dev", "meld:test"):  # kept, but not as the adapter's dev score
        assert record(key, 10.0) == 60.0


def test_models_list_shows_each_adapters_own_dev_score(lora_adapter: Path, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from erc_stream.cli import main

    store = _store_with(lora_adapter, tmp_path)
    Registry(store).record_eval("mine", "meld:dev", {"weighted_f1": 61.23, "accuracy": 62.0, "n": 1109})
    Registry(store).record_eval("mine", "synthetic:dev", {"weighted_f1": 12.34, "accuracy": 20.0, "n": 86})
    monkeypatch.setenv("ERC_STORE__DIR", str(store))
    monkeypatch.setenv("COLUMNS", "200")  # rich: no cut cells
    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    mine = next(line for line in result.output.splitlines() if "│ mine" in line)
    assert "61.2" in mine and "12.3" not in mine


def test_a_multi_dataset_adapters_dev_score_is_its_first_datasets(tmp_path: Path) -> None:
    from model_store.registry import AdapterInfo

    evals = {"emorynlp:dev": {"weighted_f1": 38.0}, "meld:dev": {"weighted_f1": 60.2}}
    meta = {"label_set": "unified", "dataset": "meld+emorynlp", "datasets": ["meld", "emorynlp"], "evals": evals}
    assert AdapterInfo("u", tmp_path, False, meta).dev_weighted_f1 == 60.2
    assert AdapterInfo("u", tmp_path, False, {**meta, "evals": {}}).dev_weighted_f1 is None
