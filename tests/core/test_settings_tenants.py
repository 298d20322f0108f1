"""``model.tenants``: per-tenant routes (adapter and label set), set from the environment as JSON."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from core.settings import Settings
from erc_stream.cli import main

ROUTES = {"acme": {"adapter": "unified-lora", "label_set": "unified"}, "globex": {"label_set": "meld"}}


def test_routes_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERC_MODEL__TENANTS", json.dumps(ROUTES))
    monkeypatch.setenv("ERC_MODEL__ADAPTER", "none")
    model = Settings().model
    assert {t: r.model_dump() for t, r in model.tenants.items()} == {
        "acme": {"adapter": "unified-lora", "label_set": "unified"}, "globex": {"adapter": None, "label_set": "meld"}}
    acme = model.for_tenant("acme")
    assert (acme.adapter, acme.label_set, acme.base) == ("unified-lora", "unified", model.base)
    assert (model.for_tenant("globex").adapter, model.for_tenant("globex").label_set) == (None, "meld")
    assert model.for_tenant("initech") is model.for_tenant(None) is model  # everyone else: the default route


@pytest.mark.parametrize("route", [{"label_set": "goemotions"}, {"adapter": "x"}, {"label_set": "meld", "adaptor": "x"}])
def test_a_bad_route_is_refused(route: dict) -> None:
    with pytest.raises(ValidationError, match="tenants.acme"):
        Settings().with_overrides(model={"tenants": {"acme": route}})


def test_the_cli_reports_an_unknown_label_set_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERC_MODEL__TENANTS", json.dumps({"acme": {"label_set": "klingon"}}))
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 1
    assert "invalid configuration" in result.output and "model.tenants.acme.label_set" in result.output
    assert "'meld', 'emorynlp', 'iemocap' or 'unified'" in result.output
