"""Alert rules on a real Redis (the engine alone), then in the stream on the real broker.

The labels are scripted here (events built by hand, or a backend that reads the label from the text): the
rules are under test, not the model. The demo test runs them behind the real model.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis

from consumer.alerts import AlertEngine
from consumer.app import StreamApp
from core.readers import read_alerts, read_events
from core.records import Alert, ChatMessage, EmotionEvent, conversation_scope
from core.settings import AlertSettings, Settings
from tests.app_threads import FailOnce, run_until
from tests.kafka_helpers import produce_raw
from tests.keyword_backend import KeywordBackend

LABELS = ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry")
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _pair(conv: str, turn: int, label: str, *, speaker: str = "A", tenant: str | None = "acme",
          sent_at: datetime | None = None, p: float = 0.7, role: str | None = None) -> tuple[EmotionEvent, ChatMessage]:
    probs = {name: (p if name == label else (1 - p) / (len(LABELS) - 1)) for name in LABELS}
    msg = ChatMessage(message_id=f"{conv}:{turn}", conversation_id=conv, turn=turn, speaker=speaker, text="x",
                      sent_at=sent_at or T0 + timedelta(seconds=turn), tenant=tenant)
    event = EmotionEvent(event_id=EmotionEvent.make_id(tenant=msg.tenant, conversation_id=msg.conversation_id, message_id=msg.message_id, model="m", adapter=None), message_id=msg.message_id,
                         conversation_id=conv, turn=turn, speaker=speaker, role=role, tenant=tenant, label=label,
                         probabilities=probs, label_set="meld", model="m", window=1, latency_ms=1.0,
                         emitted_at=T0)
    return event, msg


@pytest.fixture
def client(any_redis: redis.Redis) -> redis.Redis:
    """Standalone Redis, then Redis Cluster (every key a script touches shares one hash tag)."""
    return any_redis


def _engine(client: redis.Redis, **rules) -> AlertEngine:
    # Rules not under test are off unless given.
    base = {"streak_length": 0, "shift": False, "tenant_threshold": 1.0}
    return AlertEngine(client, AlertSettings(**{**base, **rules}), prefix=f"t-{uuid.uuid4().hex[:8]}", ttl_s=600)


def test_a_streak_alerts_once_when_it_first_reaches_its_length(client) -> None:
    engine = _engine(client, streak_length=3)
    labels = ["neutral", "angry", "sad", "angry", "disgust", "angry", "neutral", "sad", "sad", "fear", "fear"]
    conv = "c-streak"
    pairs = [_pair(conv, t, label) for t, label in enumerate(labels)]
    alerts = [a for pair in pairs for a in engine.evaluate([pair])]  # one event per batch, like a slow stream

    # Turns 1-5 are one streak of five (alert on its third turn, 3); turns 7-10 another (alert on turn 9).
    assert [a.trigger_message_id for a in alerts] == [f"{conv}:3", f"{conv}:9"]
    first = alerts[0]
    assert first.rule == "negative_streak" and first.conversation_id == conv and first.tenant == "acme"
    assert [(e.message_id, e.label) for e in first.evidence] == [(f"{conv}:1", "angry"), (f"{conv}:2", "sad"),
                                                                (f"{conv}:3", "angry")]
    assert all(e.probability == pytest.approx(0.7) and e.probabilities["angry"] > 0 for e in first.evidence)
    assert first.metrics["streak_length"] == 3 and first.severity == "critical"  # anger in the streak
    assert alerts[1].severity == "warning"  # sad, sad, fear
    assert first.alert_id == Alert.make_id("negative_streak", tenant="acme", conversation_id=conv, trigger_message_id=f"{conv}:3")

    # The same events again (a redelivery), and all of them in one batch: the same alerts, same ids.
    again = engine.evaluate(pairs)
    assert [a.alert_id for a in again] == [a.alert_id for a in alerts]
    # Once recorded as sent, a redelivered message's alert is not sent again.
    assert engine.unsent(again) == again
    engine.mark_sent(alerts[:1])
    assert engine.unsent(again) == again[1:]


def test_streaks_are_per_conversation_and_a_gap_breaks_them(client) -> None:
    engine = _engine(client, streak_length=3)
    a = [_pair("c-a", t, "sad") for t in range(2)]
    b = [_pair("c-b", t, "sad") for t in range(2)]
    gap = [_pair("c-gap", t, "sad") for t in (0, 1, 3, 4)]  # turn 2 never arrived
    assert engine.evaluate(a + b + gap) == []
    assert [x.trigger_message_id for x in engine.evaluate([_pair("c-b", 2, "angry")])] == ["c-b:2"]


def test_a_shift_to_anger_compares_a_speaker_with_their_own_previous_turn(client) -> None:
    engine = _engine(client, shift=True)
    conv = "c-shift"
    script = [("Customer", "neutral"), ("Agent", "neutral"), ("Customer", "angry"),  # shift: neutral -> angry
              ("Agent", "joyful"), ("Customer", "angry"),  # still angry: no new shift
              ("Agent", "angry")]  # the agent went from joyful to angry: a shift
    alerts = engine.evaluate([_pair(conv, t, label, speaker=who) for t, (who, label) in enumerate(script)])
    assert [(a.rule, a.trigger_message_id) for a in alerts] == [("shift_to_anger", f"{conv}:2"),
                                                                ("shift_to_anger", f"{conv}:5")]
    assert [(e.turn, e.speaker, e.label) for e in alerts[0].evidence] == [(0, "Customer", "neutral"),
                                                                          (2, "Customer", "angry")]
    # A sad customer turning angry is not a shift from neutral/positive.
    assert engine.evaluate([_pair("c-2", 0, "sad"), _pair("c-2", 1, "angry")]) == []


def test_a_tenants_negative_rate_over_a_sliding_window(client) -> None:
    engine = _engine(client, tenant_threshold=0.5, tenant_min_count=6, tenant_window_s=60, tenant_cooldown_s=120)
    pairs = []
    second = 0

    def add(tenant: str, labels: list[str]) -> None:
        nonlocal second
        for label in labels:
            conv = f"{tenant}-conv-{second}"
            pairs.append(_pair(conv, 0, label, tenant=tenant, sent_at=T0 + timedelta(seconds=second)))
            second += 1

    # acme: 3 neutral then negatives; the rate passes 50 % with 6+ events at the 7th event (4 of 7 negative).
    add("acme", ["neutral", "joyful", "neutral", "sad", "angry", "fear", "disgust", "angry", "sad"])
    add("other", ["angry"] * 5)  # 5 events: under the minimum count
    alerts = engine.evaluate(pairs)
    assert len(alerts) == 1, [a.summary for a in alerts]
    alert = alerts[0]
    assert alert.rule == "tenant_negative_rate" and alert.tenant == "acme" and alert.conversation_id is None
    assert alert.trigger_message_id == pairs[6][0].message_id
    assert alert.metrics["events"] == 7 and alert.metrics["negative_events"] == 4
    assert alert.metrics["negative_rate"] == pytest.approx(4 / 7, abs=1e-4)
    assert sorted(e.label for e in alert.evidence) == ["angry", "disgust", "fear", "sad"]  # newest first, negatives

    # Redelivered: the same alert (same id), not a new one; the cooldown keeps later negatives quiet.
    assert [a.alert_id for a in engine.evaluate(pairs)] == [alert.alert_id]
    # 61 s later the old events left the window; past the cooldown a fresh burst alerts again.
    late = [_pair(f"acme-late-{i}", 0, "angry", tenant="acme", sent_at=T0 + timedelta(seconds=200 + i))
            for i in range(6)]
    later = engine.evaluate(late)
    assert [a.trigger_message_id for a in later] == [late[5][0].message_id]  # 6 of 6, the minimum count at the 6th
    assert later[0].metrics["events"] == 6


@pytest.mark.parametrize("tenant", [None, "acme", "a}b{c"])
def test_every_script_touches_one_hash_slot(client, tenant: str | None) -> None:
    """On Redis Cluster a script may only touch keys of one slot: a conversation's, or a tenant's, even without one."""
    from redis.crc import key_slot

    engine = _engine(client, tenant_threshold=0.5, tenant_min_count=2)
    assert len({key_slot(k.encode()) for k in engine._tenant_keys(tenant)}) == 1
    # Tenant-less and tenant events through the scripts on this Redis (standalone or cluster): no CROSSSLOT.
    pairs = [_pair(f"c-slot-{i}", 0, "angry", tenant=tenant, sent_at=T0 + timedelta(seconds=i)) for i in range(3)]
    assert [a.rule for a in engine.evaluate(pairs)] == ["tenant_negative_rate"]


def test_bad_state_costs_an_event_its_alerts_not_the_batch(client) -> None:
    engine = _engine(client, streak_length=2)
    key = f"{engine.prefix}:alert:conv:{{{conversation_scope('acme', 'c-bad')}}}"
    client.set(key, "not a sorted set")  # WRONGTYPE for this conversation
    with pytest.raises(redis.ResponseError):
        # An error reply: the pipeline evaluates each event alone and dead-letters this one (stage alerts)
        engine.evaluate([_pair("c-bad", 0, "sad")])
    client.delete(key)
    client.zadd(key, {"{not json": 0})  # a stored turn this code cannot read
    batch = [_pair("c-bad", 1, "sad"), _pair("c-ok", 0, "sad"), _pair("c-ok", 1, "sad")]
    with pytest.raises(json.JSONDecodeError):  # raised, never swallowed: the pipeline dead-letters that event
        engine.evaluate(batch)
    with pytest.raises(json.JSONDecodeError):
        engine.evaluate(batch[:1])
    # Evaluated again event by event (what the pipeline does next), the others raise their alerts as usual.
    alerts = [a for pair in batch[1:] for a in engine.evaluate([pair])]
    assert [a.trigger_message_id for a in alerts] == ["c-ok:1"]


def test_a_customer_streak_counts_across_agent_turns_and_agent_turns_never_count(client) -> None:
    engine = _engine(client, streak_length=3, streak_roles=("customer",))
    script = [("customer", "angry"), ("agent", "sad"), ("customer", "angry"), ("agent", "neutral"),
              ("agent", "joyful"), ("customer", "sad"), ("agent", "sad"), ("customer", "angry")]
    pairs = [_pair("call", t, label, speaker=role.title(), role=role) for t, (role, label) in enumerate(script)]
    alerts = engine.evaluate(pairs)
    # One streak of customer turns 0, 2, 5 (the agent's calm replies between do not break it), once.
    assert [a.trigger_message_id for a in alerts] == ["call:5"]
    assert [e.message_id for e in alerts[0].evidence] == ["call:0", "call:2", "call:5"]
    # An agent's scripted apology streak raises nothing with the rule limited to customers.
    agent = [_pair("call-2", t, "sad", speaker="Agent", role="agent") for t in range(4)]
    assert engine.evaluate(agent) == []


def test_rule_settings_can_be_overridden_per_tenant(client) -> None:
    engine = _engine(client, streak_length=3, tenants={"strict": {"streak_length": 2}, "quiet": {"enabled": False}})
    labels = ["angry", "sad", "angry"]
    by_tenant = {t: engine.evaluate([_pair(f"c-{t}", i, label, tenant=t) for i, label in enumerate(labels)])
                 for t in ("strict", "quiet", "other")}
    assert [a.trigger_message_id for a in by_tenant["strict"]] == ["c-strict:1"]  # its streak of two
    assert by_tenant["quiet"] == []
    assert [a.trigger_message_id for a in by_tenant["other"]] == ["c-other:2"]  # the default streak of three


def test_a_tenants_window_holds_at_most_its_bound_and_judges_the_most_recent_events(client) -> None:
    """20 calm events then 6 negative ones inside one window: over all 26 the share is 23 %, over the most recent 10
    (the bound) it passes 50 % at the 6th negative. The keys never hold more than the bound."""
    engine = _engine(client, tenant_threshold=0.5, tenant_min_count=5, tenant_window_s=3600, tenant_cooldown_s=3600,
                     tenant_window_max_events=10)
    labels = ["neutral"] * 20 + ["angry"] * 6 + ["joyful"] * 12
    pairs = [_pair(f"c-{i}", 0, label, sent_at=T0 + timedelta(seconds=i)) for i, label in enumerate(labels)]
    all_key, neg_key, ev_key, _ = engine._tenant_keys("acme")
    alerts, sizes = [], []
    for batch in (pairs[:13], pairs[13:26], pairs[26:]):  # the bound applies within a batch too
        alerts += engine.evaluate(batch)
        sizes.append((client.zcard(all_key), client.zcard(neg_key), client.hlen(ev_key)))
    assert [a.trigger_message_id for a in alerts] == ["c-25:0"]
    assert alerts[0].metrics["events"] == 10 and alerts[0].metrics["negative_events"] == 6
    # at most 10 events; the negatives and their evidence leave with their events
    assert sizes == [(10, 0, 0), (10, 6, 6), (10, 0, 0)]


def test_the_window_bound_is_one_for_every_tenant_and_holds_the_minimum_count(client) -> None:
    with pytest.raises(ValueError, match="whole section"):
        _engine(client, tenant_threshold=0.5, tenants={"big": {"tenant_window_max_events": 50_000}})
    with pytest.raises(ValueError, match="could never fire"):
        _engine(client, tenant_threshold=0.5, tenant_window_max_events=10, tenants={"x": {"tenant_min_count": 11}})


def test_only_configured_tenants_get_their_own_settings_object(client) -> None:
    """Tenant names come from messages: an unconfigured one must not grow the engine's per-tenant cache."""
    engine = _engine(client, streak_length=3, tenants={"strict": {"streak_length": 2}})
    assert all(engine.settings_for(f"tenant-{i}") is engine.settings for i in range(1000))
    assert engine.settings_for(None) is engine.settings
    assert engine.settings_for("strict").streak_length == 2 and set(engine._by_tenant) == {"strict"}


# -- in the stream -------------------------------------------------------------------------------


def _conversation(conv: str, texts: list[str], tenant: str = "acme") -> list[ChatMessage]:
    now = datetime.now(UTC)
    return [ChatMessage(message_id=f"{conv}:{t}", conversation_id=conv, turn=t, speaker="Customer", text=text,
                        sent_at=now + timedelta(seconds=t), tenant=tenant) for t, text in enumerate(texts)]


def test_a_scripted_negative_streak_raises_exactly_one_alert_on_the_topic(settings: Settings) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 4, "max_wait_ms": 50},
                                       alerts={"streak_length": 3, "tenant_threshold": 1.0})
    run = uuid.uuid4().hex[:6]
    streak = _conversation(f"{run}-streak", ["I am angry about this bill", "still angry, nobody called back",
                                             "so sad that it came to this", "disgust, honestly",
                                             "angry, I am cancelling"])
    calm = _conversation(f"{run}-calm", ["hello there", "joyful news, it works", "thanks a lot"])
    msgs = [m for pair in zip(streak, calm + [None] * 2) for m in pair if m is not None]
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])

    app = StreamApp(settings, KeywordBackend())
    seen: list[Alert] = []
    app.on_alert = seen.append
    run_until(app, lambda: app.stats.events >= len(msgs))

    alerts, copies = read_alerts(settings, timeout_s=20)
    assert len(alerts) == 1 and copies == 0, [a.summary for a in alerts]
    alert = alerts[0]
    assert seen == [alert] and app.metrics.value("erc_alerts_emitted_total", {"rule": "negative_streak"}) == 1
    assert alert.rule == "negative_streak" and alert.conversation_id == streak[0].conversation_id
    assert [(e.message_id, e.label) for e in alert.evidence] == [(streak[0].message_id, "angry"),
                                                                (streak[1].message_id, "angry"),
                                                                (streak[2].message_id, "sad")]
    assert all(e.probability == pytest.approx(0.7) for e in alert.evidence)
    assert alert.model == "keyword" and alert.trigger_message_id == streak[2].message_id

    # A replay of the whole input under a fresh group: every event again (same ids), no alert again.
    replay = StreamApp(settings.with_overrides(kafka={"group_id": f"{settings.kafka.group_id}-replay"}),
                       KeywordBackend())
    run_until(replay, lambda: replay.stats.events >= len(msgs))
    assert replay.stats.alerts == 0
    assert read_alerts(settings, timeout_s=10)[0] == alerts
    assert len(read_events(settings, timeout_s=10).events) == len(msgs)


def test_an_alert_of_a_batch_redone_after_a_failure_is_not_lost_and_keeps_its_id(settings: Settings) -> None:
    from consumer.delivery import make_emitter

    settings = settings.with_overrides(batch={"micro_batch_size": 16, "max_wait_ms": 300},
                                       alerts={"streak_length": 3, "tenant_threshold": 1.0})
    streak = _conversation(f"{uuid.uuid4().hex[:6]}-streak", ["sad day", "so sad", "sad again"])
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in streak])
    # The first batch fails after its events and alert were sent, before the commit.
    failing = FailOnce(make_emitter(settings))
    app = StreamApp(settings, KeywordBackend(), emitter=failing)
    run_until(app, lambda: app.stats.events >= len(streak))
    assert failing.fired and app.stats.rewinds == 1 and app.stats.alerts == 1
    alerts, copies = read_alerts(settings, timeout_s=20)
    # Sent with the failed batch and again with its redo: two records, one alert id.
    assert len(alerts) == 1 and copies == 1
    assert alerts[0].alert_id == Alert.make_id("negative_streak", tenant=streak[0].tenant, conversation_id=streak[0].conversation_id, trigger_message_id=streak[2].message_id)


def test_an_event_whose_alert_rules_fail_is_emitted_dead_lettered_and_counted(settings: Settings) -> None:
    """Unreadable rule state (a stored turn this version cannot parse) fails that event's rules: its event is
    emitted, its message goes to the dead-letter topic with stage ``alerts``, and the failure is counted. The
    other conversations of the same batch raise their alerts as usual."""
    from core.readers import read_dead_letters

    settings = settings.with_overrides(batch={"micro_batch_size": 16, "max_wait_ms": 300},
                                       alerts={"streak_length": 2, "tenant_threshold": 1.0})
    run = uuid.uuid4().hex[:6]
    bad = _conversation(f"{run}-bad", ["sad day", "so sad"])
    good = _conversation(f"{run}-good", ["sad day", "so sad"])
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    client.zadd(f"{settings.redis.key_prefix}:alert:conv:{{{conversation_scope('acme', bad[0].conversation_id)}}}",
                {"{not json": -1})  # before turn 0: both turns read it, neither replaces it
    msgs = [bad[0], good[0], bad[1], good[1]]
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])

    app = StreamApp(settings, KeywordBackend())
    run_until(app, lambda: app.stats.events >= len(msgs))
    letters, _ = read_dead_letters(settings, timeout_s=20)
    assert [(d.error_type, d.stage) for d in letters] == [("processing", "alerts")] * 2, letters
    assert {ChatMessage.from_bytes(d.original()).message_id for d in letters} == {m.message_id for m in bad}
    assert "JSONDecodeError" in letters[0].reason
    assert app.metrics.value("erc_alert_rule_failures_total") == 2
    assert {e.message_id for e in read_events(settings, timeout_s=10).events} == {m.message_id for m in msgs}
    alerts, _ = read_alerts(settings, timeout_s=10)
    assert [a.conversation_id for a in alerts] == [good[0].conversation_id]
