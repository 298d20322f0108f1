"""The long-conversation benchmark's input: the same turns arranged as scenes, or as one long conversation."""

from __future__ import annotations

from pathlib import Path

from bench.long_conversations import lanes, own_line_tokens, rounds
from core.settings import Settings


def test_every_arrangement_sends_the_same_turns_in_rounds(tmp_path: Path) -> None:
    settings = Settings().with_overrides(data={"dir": str(tmp_path / "no-data")})  # synthetic conversations
    lanes_, source = lanes(settings, conversations=3, turns=40)
    assert "synthetic" in source and len(lanes_) == 3
    assert all(sum(len(s.utterances) for s in lane.scenes) == 40 for lane in lanes_)
    by = {a: rounds(lanes_, a, run_id="r") for a in ("scenes", "sliding", "hop")}
    texts = {a: [[m.text for m in r] for r in rs] for a, rs in by.items()}
    assert texts["scenes"] == texts["sliding"] == texts["hop"] and len(texts["hop"]) == 40
    assert all(len(r) == 3 for r in by["hop"])  # one turn of each lane per round
    long_ = [m for r in by["hop"] for m in r if m.conversation_id.endswith(lanes_[0].episode)]
    assert [m.turn for m in long_] == list(range(40))  # one conversation, turns numbered through
    scenes = {m.conversation_id for r in by["scenes"] for m in r}
    assert len(scenes) == sum(len(lane.scenes) for lane in lanes_)  # every scene its own conversation
    assert all(m.turn < 12 for r in by["scenes"] for m in r)  # short scenes, turns restart per scene


def test_own_line_tokens_number_speakers_per_conversation(tmp_path: Path) -> None:
    """Each message's own line as a prompt would show it: its conversation's speaker number, its rendered text."""
    settings = Settings().with_overrides(data={"dir": str(tmp_path / "no-data")})
    lanes_, _ = lanes(settings, conversations=2, turns=12)
    plan = rounds(lanes_, "hop", run_id="r")
    lines: dict[str, str] = {}
    own = own_line_tokens(plan, lambda line: lines.setdefault(line, line) and len(line), 2_000)
    assert set(own) == {m.message_id for r in plan for m in r}
    first = plan[0][0]
    assert own[first.message_id] == len(f'Speaker_0: "{" ".join(first.text.split())}"')
    assert all(line.startswith("Speaker_") for line in lines)
    assert len({line.split(":")[0] for line in lines}) >= 2  # both sides of a conversation
