"""The dashboard's state: conversations ranked by risk, per tenant, texts only when allowed, alerts, rates."""

from __future__ import annotations

from datetime import UTC, datetime

from core.records import Alert, AlertEvidence, ChatMessage, EmotionEvent
from core.settings import Settings
from outputs.live_state import RATE_BUCKET_S, LiveState

NOW = datetime.now(UTC)


def _event(conv: str, turn: int, label: str, tenant: str | None = "acme", role: str | None = "customer") -> EmotionEvent:
    probs = {"neutral": 0.1, "angry": 0.1, "joyful": 0.1, "sad": 0.1, "surprise": 0.2, "fear": 0.2, "disgust": 0.2}
    probs = {**probs, label: 0.0}
    probs[label] = round(1 - sum(probs.values()), 6)
    return EmotionEvent(event_id=f"{conv}-{turn}", message_id=f"{conv}:{turn}", conversation_id=conv, turn=turn,
                        speaker="Dana", role=role, tenant=tenant, label=label, probabilities=probs, label_set="meld",
                        model="smollm2-135m", adapter="meld-smollm2-lora", adapter_version="abc123", window=turn + 1,
                        latency_ms=1.0, emitted_at=NOW)


def test_conversations_rank_by_negative_streak_then_recent_share() -> None:
    state = LiveState(Settings())
    for t, label in enumerate(["neutral", "angry", "angry", "angry"]):
        state.add_event(_event("angry-now", t, label))
    for t, label in enumerate(["angry", "sad", "angry", "neutral"]):
        state.add_event(_event("was-sour", t, label))
    for t in range(5):
        state.add_event(_event("calm", t, "joyful", tenant="beta"))
    snap = state.snapshot()
    assert [c["conversation_id"] for c in snap["conversations"]] == ["angry-now", "was-sour", "calm"]
    top = snap["conversations"][0]
    assert (top["negative_streak"], top["recent_negative_share"], top["last_role"]) == (3, 0.75, "customer")
    assert [c["conversation_id"] for c in state.snapshot(tenant="beta")["conversations"]] == ["calm"]
    assert snap["tenants"] == ["acme", "beta"]
    assert snap["health"]["events"] == 13 and snap["health"]["adapters"] == {"smollm2-135m/meld-smollm2-lora": "abc123"}
    rate = snap["negative_rate"]["acme"][-1]
    assert rate["events"] == 8 and rate["negative_rate"] == round(6 / 8, 3) and rate["t"] % RATE_BUCKET_S == 0


def test_texts_only_when_shown_and_alerts_link_to_their_conversation() -> None:
    msg = ChatMessage(message_id="c:0", conversation_id="c", turn=0, speaker="Dana", text="my card was charged twice",
                      sent_at=NOW, tenant="acme")
    hidden, shown = LiveState(Settings()), LiveState(Settings().with_overrides(dashboard={"show_texts": True}))
    for state in (hidden, shown):
        state.add_message(msg)
        state.add_event(_event("c", 0, "angry"))
    assert "text" not in hidden.conversation("acme", "c")["turns"][0]
    assert shown.conversation("acme", "c")["turns"][0]["text"] == "my card was charged twice"
    assert hidden.conversation("acme", "nope") is None
    alert = Alert(alert_id="a-1", rule="negative_streak", summary="3 negative turns", conversation_id="c",
                  tenant="acme", trigger_message_id="c:0", label_set="meld", model="m",
                  evidence=[AlertEvidence(message_id="c:0", conversation_id="c", turn=0, speaker="Dana",
                                          label="angry", probability=0.7)])
    hidden.add_alert(alert)
    snap = hidden.snapshot()
    assert snap["alerts"][0]["conversation_id"] == "c" and snap["alerts"][0]["evidence"][0]["label"] == "angry"
    assert snap["conversations"][0]["alerts"] == 1 and snap["health"]["alerts"] == 1


def test_the_least_recent_conversations_leave_first() -> None:
    state = LiveState(Settings().with_overrides(dashboard={"max_conversations": 3, "timeline_turns": 2}))
    for i in range(5):
        for t in range(3):
            state.add_event(_event(f"c{i}", t, "neutral"))
    assert sorted(c["conversation_id"] for c in state.snapshot()["conversations"]) == ["c2", "c3", "c4"]
    assert [t["turn"] for t in state.conversation("acme", "c4")["turns"]] == [1, 2]


def test_texts_are_cut_and_tenants_are_capped_least_recent_first() -> None:
    state = LiveState(Settings().with_overrides(dashboard={"show_texts": True, "text_chars": 10, "max_tenants": 2}))
    state.add_message(ChatMessage(message_id="c:0", conversation_id="c", turn=0, speaker="Dana", text="x" * 5000,
                                  sent_at=NOW, tenant="acme"))
    state.add_event(_event("c", 0, "angry"))
    text = state.conversation("acme", "c")["turns"][0]["text"]
    assert text == "x" * 9 + "…" and len(text) == 10
    for tenant in ("t1", "t2", "acme", "t3"):  # acme active again after t1: t1 and t2 leave
        state.add_event(_event(f"conv-{tenant}", 0, "angry", tenant=tenant))
    assert set(state.snapshot()["negative_rate"]) == {"acme", "t3"}
    assert state.snapshot(allowed={"t1"})["health"]["events"] == 0  # its counters left with it


def test_a_scope_limits_every_part_of_a_snapshot() -> None:
    state = LiveState(Settings())
    state.add_event(_event("a", 0, "angry"))
    state.add_event(_event("b", 0, "angry", tenant="beta").model_copy(update={"adapter": "beta-lora"}))
    state.add_event(_event("n", 0, "angry", tenant=None))
    snap = state.snapshot(allowed={"acme"})
    assert [c["conversation_id"] for c in snap["conversations"]] == ["a"] and snap["tenants"] == ["acme"]
    assert snap["health"]["adapters"] == {"smollm2-135m/meld-smollm2-lora": "abc123"}  # not beta's adapter
    assert snap["health"]["events"] == 1 and snap["health"]["events_per_s"] == 0.1
    assert state.conversation("beta", "b", allowed={"acme"}) is None
    assert state.conversation(None, "n", allowed={"acme"}) is None
    assert state.conversation(None, "n")["tenant"] is None  # the admin's scope: everything
    assert len(state.snapshot()["health"]["adapters"]) == 2


def test_a_timeline_is_read_incrementally_and_trimmed_by_what_it_keeps() -> None:
    state = LiveState(Settings().with_overrides(dashboard={"timeline_turns": 3}))
    for t in range(2):
        state.add_event(_event("c", t, "neutral"))
    first = state.conversation("acme", "c")
    state.add_event(_event("other", 0, "angry"))  # another conversation's change: not in c's answer
    assert state.conversation("acme", "c", after=first["seq"])["turns"] == []
    for t in range(2, 5):
        state.add_event(_event("c", t, "angry"))
    later = state.conversation("acme", "c", after=first["seq"])
    assert [t["turn"] for t in later["turns"]] == [2, 3, 4] and later["kept"] == 3
    assert later["seq"] > first["seq"] and state.snapshot()["conversations"][0]["seq"] == later["seq"]
