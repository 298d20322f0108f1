"""Webhook URLs and tokens are secrets: `erc-stream config` masks them, and no invalid ERC_NOTIFY__TARGETS makes an
error that prints them (pydantic prints an invalid input in its message)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from pydantic import SecretStr, ValidationError

from core.settings import NotifyTarget, Settings
from erc_stream.cli import main
from tests.procs import PROJECT

URL = "https://hooks.slack.com/services/T0001/B0002/s3cr3t-webhook-path"
TOKEN = "tok-s3cr3t-bearer"
GOOD = {"name": "social", "url": URL, "kind": "slack", "token": TOKEN}


def _clean(text: str) -> None:
    assert "s3cr3t" not in text, [line for line in text.splitlines() if "s3cr3t" in line]


def test_config_masks_webhook_urls_and_tokens() -> None:
    result = CliRunner().invoke(main, ["config"], env={"ERC_NOTIFY__TARGETS": json.dumps([GOOD])})
    assert result.exit_code == 0, result.output
    _clean(result.output)
    target = json.loads(result.output)["notify"]["targets"][0]
    assert target["name"] == "social" and target["url"] == "**********" and target["token"] == "**********"
    s = Settings().with_overrides(notify={"targets": [GOOD]})
    assert isinstance(s.notify.targets[0].url, SecretStr) and s.notify.targets[0].url.get_secret_value() == URL
    for text in (repr(s), str(s.notify.targets[0]), s.model_dump_json()):
        _clean(text)


MALFORMED = {
    "a target without its name": [{"url": URL, "token": TOKEN}],
    "a misspelt key": [{"name": "s", "uri": URL, "url": URL, "tokn": TOKEN}],
    "one object instead of a list": {"name": "s", "url": URL, "token": TOKEN},
    "a bare URL in the list": [URL],
    "a URL without http(s)": [{"name": "s", "url": "ftp" + URL[5:], "token": TOKEN}],
    "a URL that is not text": [{"name": "s", "url": {"href": URL}, "token": TOKEN}],
    "a token that is not text": [{"name": "s", "url": URL, "token": [TOKEN]}],
    "an unknown kind": [{"name": "s", "url": URL, "kind": "teams", "token": TOKEN}],
    "two targets of one name": [GOOD, {**GOOD, "kind": "json"}],
}


@pytest.mark.parametrize("targets", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_targets_variable_fails_without_printing_a_url_or_token(targets: object) -> None:
    result = CliRunner().invoke(main, ["config"], env={"ERC_NOTIFY__TARGETS": json.dumps(targets)})
    assert result.exit_code != 0 and "invalid configuration" in result.output and "notify.targets" in result.output
    _clean(result.output)
    with pytest.raises(ValidationError) as raised:  # however the error is shown (a traceback prints it too)
        Settings().with_overrides(notify={"targets": targets})
    _clean(str(raised.value))
    _clean(repr(raised.value.errors()))


@pytest.mark.parametrize("target", [{"url": URL}, {"name": "s", "url": "ftp://s3cr3t"}, URL,
                                    {"name": "s", "url": URL, "extra": TOKEN}])
def test_a_target_validated_alone_masks_its_inputs_too(target: object) -> None:
    with pytest.raises(ValidationError) as raised:
        NotifyTarget.model_validate(target)
    _clean(str(raised.value))


def test_invalid_json_in_the_variable_fails_in_one_line_without_its_value() -> None:
    """Through the real command: no traceback (whose chained JSON error could quote the value), no URL, no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERC_")}
    env["ERC_NOTIFY__TARGETS"] = json.dumps([GOOD])[:-2] + ","  # cut short
    done = subprocess.run([sys.executable, "-m", "erc_stream", "config"], env=env, cwd=PROJECT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "invalid configuration" in done.stderr and '"notify"' in done.stderr
    _clean(done.stdout + done.stderr)


SECRET_SETTINGS = {
    "a dashboard token too short": {"ERC_DASHBOARD__TOKENS": json.dumps({"sup": {"token": "s3cr3t",
                                                                               "tenants": ["acme"]}})},
    "a dashboard token without tenants": {"ERC_DASHBOARD__TOKENS": json.dumps({"sup": {"token": "s3cr3t" * 4}})},
    "a dashboard token map that is not one": {"ERC_DASHBOARD__TOKENS": json.dumps(["s3cr3t" * 4])},
}


@pytest.mark.parametrize("env", SECRET_SETTINGS.values(), ids=SECRET_SETTINGS.keys())
def test_no_invalid_setting_prints_the_value_it_was_given(env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["config"], env=env)
    assert result.exit_code != 0 and "invalid configuration" in result.output, result.output
    _clean(result.output)
