"""The notifier against a real broker, Redis and a local webhook receiver that fails its first requests: every
alert arrives once per target it routes to, through failures, duplicate copies on the topic and a restart."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition

from core.readers import read_dead_letters
from core.records import Alert, AlertEvidence
from core.settings import Settings
from outputs.notify import Notifier, NotifyMetrics, payload, routes
from tests.kafka_helpers import produce_raw
from tests.outputs.webhook_receiver import Receiver
from tests.waiting import wait_for


def _alert(i: int, tenant: str, rule: str = "negative_streak") -> Alert:
    conv = f"{tenant}-call-{i}"
    ev = [AlertEvidence(message_id=f"{conv}:{t}", conversation_id=conv, turn=t, speaker="Dana", label="anger",
                        probability=0.9) for t in range(3)]
    return Alert(alert_id=Alert.make_id(rule, tenant=tenant, conversation_id=conv, trigger_message_id=f"{conv}:2"),
                 rule=rule, summary=f"3 negative turns in a row in {conv}", conversation_id=conv, tenant=tenant,
                 trigger_message_id=f"{conv}:2", evidence=ev, metrics={"streak": 3}, label_set="meld",
                 model="smollm2-135m")


def test_routes_and_payloads() -> None:
    s = Settings().with_overrides(notify={"targets": [
        {"name": "acme-sup", "url": "http://x/a", "tenants": ["acme"]},
        {"name": "anger-only", "url": "http://x/b", "kind": "slack", "rules": ["shift_to_anger"]},
        {"name": "all", "url": "http://x/c"}]})
    a = _alert(1, "acme")
    assert [t.name for t in routes(a, s.notify.targets)] == ["acme-sup", "all"]
    assert [t.name for t in routes(_alert(2, "beta", "shift_to_anger"), s.notify.targets)] == ["anger-only", "all"]
    slack = payload(a, s.notify.targets[1])
    assert set(slack) == {"text"} and "negative_streak" in slack["text"] and "#2 Dana: anger (90%)" in slack["text"]
    assert payload(a, s.notify.targets[0])["alert_id"] == a.alert_id


def _run(notifier: Notifier, until: Callable[[], bool], what: str, state: Callable[[], object],
         timeout_s: float = 60.0) -> None:
    """Run ``notifier`` in a thread until ``until()`` holds, then stop and close it."""
    thread = threading.Thread(target=notifier.run, name="notifier", daemon=True)
    thread.start()
    try:
        wait_for(until, timeout_s=timeout_s, what=what, state=state, thread=thread)
    finally:
        notifier.stop()
        thread.join(30)
        notifier.close()


def _committed(group: KafkaConsumer, settings: Settings) -> dict[int, int]:
    """The committed offset of each alerts partition of ``group`` (a consumer in the notifier's group that does not
    join it), 0 where nothing was committed: the notifier commits a poll's offsets only once each of its alerts was
    delivered, skipped or dead-lettered."""
    return {p: group.committed(TopicPartition(settings.kafka.alerts_topic, p)) or 0
            for p in range(settings.kafka.partitions)}


def _total(metrics: NotifyMetrics, name: str) -> float:
    """A notifier counter summed over its labels (``erc_notify_delivered_total`` ...)."""
    return sum(s.value for m in metrics.registry.collect() for s in m.samples if s.name == name)


def test_each_alert_reaches_each_target_once_through_failures_copies_and_a_restart(settings: Settings) -> None:
    acme = [_alert(i, "acme") for i in range(6)]
    beta = [_alert(i, "beta") for i in range(4)]
    with Receiver() as rx:
        settings = settings.with_overrides(
            notify={"targets": [
                {"name": "supervisors", "url": rx.url("supervisors"), "tenants": ["acme"]},
                {"name": "slack", "url": rx.url("slack"), "kind": "slack"},
                {"name": "strict", "url": rx.url("strict"), "tenants": ["beta"]},
            ], "backoff_s": 0.05, "backoff_max_s": 0.2, "attempts": 5, "timeout_s": 2, "metrics_port": 0,
               "group_id": f"{settings.kafka.group_id}-notify"},
        )
        rx.fail["supervisors"] = [503, 503, 429]  # transient: retried
        rx.fail["slack"] = [500, 502]
        refused = {beta[1].alert_id, beta[3].alert_id}
        rx.refuse = lambda target, body: 400 if target == "strict" and body.get("alert_id") in refused else None
        # every alert, then copies of three of them (a redelivered batch of the consumer)
        items = [(a.conversation_id.encode(), a.to_bytes()) for a in [*acme[:3], *beta, *acme[3:], acme[0], beta[1],
                                                                       acme[4]]]
        acked = produce_raw(settings, settings.kafka.alerts_topic, items)
        ends = {p: max((md.offset + 1 for md in acked if md.partition == p), default=0)
                for p in range(settings.kafka.partitions)}
        group = KafkaConsumer(group_id=settings.notify.group_id, enable_auto_commit=False,
                              **settings.kafka.client_options())

        def counts() -> str:
            return (f"received {dict((k, len(v)) for k, v in rx.received.items())}, committed "
                    f"{_committed(group, settings)} of {ends}")

        try:
            first = Notifier(settings)
            # stopped part-way through, from the receiver itself: polling from here let it finish on a fast machine
            rx.on_accept = lambda target, n: first.stop() if target == "slack" and n == 4 else None
            _run(first, lambda: len(rx.received["slack"]) >= 4, "the first 4 slack deliveries", counts)
            rx.on_accept = lambda target, n: None
            delivered_before_restart = {k: len(v) for k, v in rx.received.items()}
            # Until every alert, the copies at the topic's end included, was handled and committed: stopping at the
            # expected counts instead could stop before the copies were read, and a resent copy would go unseen.
            second = Notifier(settings)
            _run(second, lambda: _committed(group, settings) == ends, "the restarted notifier to commit every alert",
                 counts)
            # A second restart over committed offsets: it joins, reads up to the end and has nothing to send or skip.
            third = Notifier(settings)
            _run(third, lambda: third.follower.assigned == settings.kafka.partitions and third.follower.last_lag == 0,
                 "the third notifier to hold every partition and reach its end", counts, timeout_s=30)
            assert _committed(group, settings) == ends
        finally:
            group.close(autocommit=False)
        assert _total(third.metrics, "erc_notify_delivered_total") == 0
        assert _total(third.metrics, "erc_notify_skipped_total") == 0  # nothing re-read: the offsets held

        ids = {k: Counter(key for key, _ in v) for k, v in rx.received.items()}
        assert ids["supervisors"] == Counter(a.alert_id for a in acme)  # acme only, each once
        assert ids["slack"] == Counter(a.alert_id for a in acme + beta)  # every tenant, each once
        assert ids["strict"] == Counter(a.alert_id for a in beta if a.alert_id not in refused)
        assert all(set(body) == {"text"} for _, body in rx.received["slack"])
        assert rx.attempts["supervisors"] == 6 + 3 and rx.attempts["slack"] == 10 + 2
        assert 0 < sum(delivered_before_restart.values()) < 18

    letters, _ = read_dead_letters(settings)
    mine = [d for d in letters if d.error_type == "notify_refused"]
    assert sorted(Alert.from_bytes(d.original()).alert_id for d in mine) == sorted(refused)
    assert all(d.stage == "notify:strict" and "HTTP 400" in d.reason and d.source_topic == settings.kafka.alerts_topic
               for d in mine)
