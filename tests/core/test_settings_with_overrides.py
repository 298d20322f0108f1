"""Settings.with_overrides: a copy with some fields replaced, validated like any other Settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_overrides_replace_only_the_named_fields() -> None:
    base = Settings()
    s = base.with_overrides(batch={"micro_batch_size": 8, "max_wait_ms": 100}, window={"size": 4})
    assert (s.batch.micro_batch_size, s.batch.max_wait_ms, s.window.size) == (8, 100, 4)
    assert s.conversation.retain_turns == base.conversation.retain_turns and s.kafka == base.kafka
    assert base.batch.micro_batch_size == 16  # the original is untouched



@pytest.mark.parametrize("overrides", [
    {"batch": {"micro_batch_size": 0}},  # ge=1
    {"batch": {"max_wait_ms": "soon"}},  # not an int
    {"window": {"size": 0}},
    {"model": {"label_set": "goemotions"}},  # not one of the Literal's values
])
def test_overrides_are_validated(overrides: dict) -> None:
    with pytest.raises(ValidationError):
        Settings().with_overrides(**overrides)


def test_an_unknown_field_is_refused_not_silently_ignored() -> None:
    with pytest.raises(ValidationError):
        Settings().with_overrides(batch={"max_sise": 8})  # sections are extra="forbid"
