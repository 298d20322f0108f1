"""Tenants that cannot reach each other: state scopes no id can forge, and the tenant taken from a source the
producer cannot choose (the input topic, or a gateway's header) — real broker, real Redis."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from consumer.app import StreamApp
from core.readers import read_dead_letters, read_events
from core.records import ChatMessage, conversation_scope
from core.settings import Settings
from scoring.backends.null import NullBackend
from tests.app_threads import run_until

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def _msg(conv: str, turn: int, *, tenant: str | None = None, run: str) -> ChatMessage:
    return ChatMessage(message_id=f"{run}:{conv}:{turn}:{tenant}", conversation_id=conv, turn=turn, speaker="s",
                       text=f"turn {turn}", sent_at=T0 + timedelta(seconds=turn), tenant=tenant)


def _send(settings: Settings, topic: str, msgs, headers=None) -> None:
    producer = KafkaProducer(acks="all", **settings.kafka.client_options())
    try:
        for m in msgs:
            producer.send(topic, key=m.conversation_id.encode(), value=m.to_bytes(), headers=headers)
        producer.flush(30)
    finally:
        producer.close(5)


def test_no_conversation_id_names_another_tenants_conversation() -> None:
    assert conversation_scope(None, "t4:acme:c1") != conversation_scope("acme", "c1")
    assert conversation_scope("acme", "c1") != conversation_scope("acme:c1", "")
    assert len({conversation_scope(t, c) for t, c in [(None, "a"), ("", "a"), ("a", ""), (None, "t0::a"),
                                                       ("", "t0::a")]}) == 5


def test_a_tenant_less_message_cannot_reach_a_tenants_state(settings: Settings) -> None:
    run = uuid.uuid4().hex[:6]
    acme = [_msg("c1", t, tenant="acme", run=run) for t in range(2)]
    intruder = _msg(conversation_scope("acme", "c1"), 2, run=run)  # the id a tenant's scope used to be
    later = _msg("c1", 2, tenant="acme", run=run)
    _send(settings, settings.kafka.input_topic, acme)
    app = StreamApp(settings, NullBackend())
    run_until(app, lambda: app.stats.events >= 2)
    _send(settings, settings.kafka.input_topic, [intruder])
    app = StreamApp(settings, NullBackend())
    run_until(app, lambda: app.stats.events >= 1)
    _send(settings, settings.kafka.input_topic, [later])
    app = StreamApp(settings, NullBackend())
    run_until(app, lambda: app.stats.events >= 1)
    events = {e.message_id: e for e in read_events(settings, timeout_s=20).events}
    assert events[intruder.message_id].window == 1 and events[intruder.message_id].window_degraded
    assert events[later.message_id].window == 3 and not events[later.message_id].window_degraded


def _tenant_topics(settings: Settings, tenants: list[str]) -> tuple[Settings, dict[str, str]]:
    base = settings.kafka.input_topic.removesuffix(".messages")
    topics = {t: f"{base}.in.{t}" for t in tenants}
    admin = KafkaAdminClient(**settings.kafka.client_options())
    try:
        admin.create_topics([NewTopic(name, 2, 1) for name in topics.values()])
    finally:
        admin.close()
    pattern = rf"^{base.replace('.', chr(92) + '.')}\.in\.(?P<tenant>[a-z]+)$"
    return settings.with_overrides(tenancy={"source": "topic", "topic_pattern": pattern},
                                   batch={"max_wait_ms": 100}), topics


def test_with_the_tenant_from_the_topic_a_message_claiming_another_tenant_is_dead_lettered(settings: Settings) -> None:
    run = uuid.uuid4().hex[:6]
    settings, topics = _tenant_topics(settings, ["acme", "globex"])
    plain = _msg("c1", 0, run=run)  # no tenant of its own: its topic's
    own = _msg("c2", 0, tenant="acme", run=run)
    forged = _msg("c3", 0, tenant="globex", run=run)  # written to acme's topic, claiming globex
    theirs = _msg("c1", 0, run=f"{run}g")
    _send(settings, topics["acme"], [plain, own, forged])
    _send(settings, topics["globex"], [theirs])
    app = StreamApp(settings, NullBackend())
    run_until(app, lambda: app.stats.consumed >= 4)

    events = {e.message_id: e for e in read_events(settings, timeout_s=20).events}
    assert {m: e.tenant for m, e in events.items()} == {plain.message_id: "acme", own.message_id: "acme",
                                                        theirs.message_id: "globex"}
    letters, _ = read_dead_letters(settings, timeout_s=10)
    assert [(d.error_type, d.source_topic) for d in letters] == [("tenant_mismatch", topics["acme"])]
    assert "claims tenant 'globex'" in letters[0].reason
    # acme's c1 and globex's c1 are two conversations
    assert events[plain.message_id].window == 1 and events[theirs.message_id].window == 1


def test_with_the_tenant_from_a_header_a_record_without_it_or_against_it_is_dead_lettered(settings: Settings) -> None:
    run = uuid.uuid4().hex[:6]
    settings = settings.with_overrides(tenancy={"source": "header", "header": "x-tenant"}, batch={"max_wait_ms": 100})
    ok = _msg("c1", 0, run=run)
    forged = _msg("c2", 0, tenant="globex", run=run)
    missing = _msg("c3", 0, run=run)
    _send(settings, settings.kafka.input_topic, [ok, forged], headers=[("x-tenant", b"acme")])
    _send(settings, settings.kafka.input_topic, [missing])
    app = StreamApp(settings, NullBackend())
    run_until(app, lambda: app.stats.consumed >= 3)
    events = read_events(settings, timeout_s=20).events
    assert [(e.message_id, e.tenant) for e in events] == [(ok.message_id, "acme")]
    letters, _ = read_dead_letters(settings, timeout_s=10)
    assert sorted(d.error_type for d in letters) == ["tenant_mismatch", "tenant_missing"]
    assert app.metrics.value("erc_dead_letters_total", {"reason": "tenant_missing"}) == 1
