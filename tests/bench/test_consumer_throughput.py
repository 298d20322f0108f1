"""The consumer-overhead benchmark measures what it claims: run small, check its counts (never its speed)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from bench.consumer_throughput import STAGES, make_messages, measure
from core.settings import Settings


def test_the_input_is_every_conversation_in_turn_order_interleaved() -> None:
    messages = make_messages(103, 10, seed=1)
    assert len(messages) == 103 and len({m.message_id for m in messages}) == 103
    turns: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        turns[m.conversation_id].append(m.turn)
    assert len(turns) == 10
    assert all(t == list(range(len(t))) for t in turns.values())  # each conversation in order, from turn 0
    assert sorted(len(t) for t in turns.values()) == [10] * 7 + [11] * 3
    # interleaved: the stream is not one conversation after another
    assert [m.conversation_id for m in messages[:10]] != [messages[0].conversation_id] * 10


def test_measure_counts_every_message_once_and_its_figures_add_up(settings: Settings) -> None:
    n = 600
    out = measure(settings, messages=n, conversations=30, stream_batch=100, verify=True)

    assert out["messages"] == n and out["consumed"] == n
    assert out["events"] == n and out["dead_letters"] == 0 and out["rewinds"] == 0
    assert out["output_records"] == n and out["output_distinct_messages"] == n  # one event per message, on the topic
    assert out["batches"] >= n // 100 and out["stream_batch"] == 100
    assert out["seconds"] > 0 and out["cpu_seconds"] > 0 and out["producer_msgs_per_s"] > 0
    assert out["messages_per_s"] == pytest.approx(n / out["seconds"], rel=0.01)
    stages = [out[f"stage_{s}_s"] for s in STAGES]
    assert all(v >= 0 for v in stages)
    # the stages partition the measured span ("other" is what the wrapped calls did not take)
    assert sum(stages) == pytest.approx(out["seconds"], rel=0.02, abs=0.01)
    assert out["stage_window_s"] > 0 and out["stage_prompt_s"] > 0 and out["stage_emit_s"] > 0
