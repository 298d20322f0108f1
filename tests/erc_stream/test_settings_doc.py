"""The configuration reference is generated from the settings object, and the README holds the current one."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from core.settings import Settings
from erc_stream.cli import main
from erc_stream.settings_doc import entries, env_names, markdown, readme_block

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_reference_is_the_generated_one() -> None:
    block = readme_block(README.read_text())
    assert block is not None, "README.md lacks the settings-reference markers"
    assert block == markdown(), "README is stale: run `erc-stream config --write-readme README.md`"


def test_every_setting_is_listed_with_a_description() -> None:
    listed = {e.env for e in entries()}
    for section, info in Settings.model_fields.items():
        fields = getattr(info.annotation, "model_fields", None)
        names = [f"ERC_{section}__{f}".upper() for f in fields] if fields else [f"ERC_{section}".upper()]
        assert set(names) <= listed, set(names) - listed
    missing = [e.env for e in entries() if not e.description]
    assert not missing, f"settings without a description: {missing}"
    assert {"ERC_ALERTS__STREAK_LENGTH", "ERC_METRICS__PORT", "ERC_EXPORT__GROUP_ID", "ERC_LOG_JSON"} <= env_names()


def test_the_reference_shows_code_defaults_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    before = markdown()
    monkeypatch.setenv("ERC_KAFKA__GROUP_ID", "from-the-environment")
    assert markdown() == before and "from-the-environment" not in before
    assert "| `ERC_KAFKA__GROUP_ID` | `erc-stream` |" in before
    assert "| `ERC_STORE__DIR` | `~/.cache/erc-stream/store` |" in before  # no home directory in the README
    result = CliRunner().invoke(main, ["config"], env={"ERC_REDIS__PASSWORD": "hunter2"})
    assert result.exit_code == 0 and "hunter2" not in result.output and '"password": "**********"' in result.output
