"""An alert storm through the notifier, against a real broker, Redis and two local webhooks, one of them answering
503 for its first 30 s: the healthy one gets its grouped notifications within seconds, undelayed by the other; the
failing one gets every alert once it recovers; no alert reaches a target twice, alone or in a summary."""

from __future__ import annotations

import threading
import time
from collections import Counter

from kafka import KafkaConsumer

from core.settings import Settings
from outputs.notify import Notifier
from tests.kafka_helpers import produce_raw
from tests.outputs.test_notify import _alert, _committed
from tests.outputs.webhook_receiver import Receiver
from tests.waiting import wait_for

TENANTS = ("acme", "beta", "gamma", "delta")
RULES = ("negative_streak", "shift_to_anger")
ALERTS = 1_000
DOWN_S = 30.0
LISTED = 5


def _ids(received: list[tuple[str, dict]]) -> tuple[list[str], list[str], list[str]]:
    """(alerts delivered alone, summary ids, alerts folded into summaries) in what a target accepted."""
    alone, summaries, folded = [], [], []
    for key, body in received:
        if body.get("kind") == "alert_summary":
            assert key == body["summary_id"] and body["count"] == len(body["alert_ids"]) > 1
            assert len(body["alerts"]) == min(LISTED, body["count"])
            assert [a["alert_id"] for a in body["alerts"]] == body["alert_ids"][:LISTED]
            summaries.append(body["summary_id"])
            folded += body["alert_ids"]
        else:
            assert key == body["alert_id"]
            alone.append(body["alert_id"])
    return alone, summaries, folded


def test_a_storm_reaches_a_healthy_target_at_once_and_a_failing_one_in_full_once_it_recovers(
        settings: Settings) -> None:
    alerts = [_alert(i, TENANTS[i % len(TENANTS)], RULES[(i // len(TENANTS)) % len(RULES)]) for i in range(ALERTS)]
    every_id = {a.alert_id for a in alerts}
    assert len(every_id) == ALERTS
    with Receiver() as rx:
        settings = settings.with_overrides(notify={
            "targets": [{"name": "healthy", "url": rx.url("healthy")}, {"name": "failing", "url": rx.url("failing")}],
            "group_wait_s": 1.0, "group_interval_s": 5.0, "summary_list": LISTED, "attempts": 200,
            "backoff_s": 0.2, "backoff_max_s": 2.0, "timeout_s": 2, "metrics_port": 0,
            "group_id": f"{settings.kafka.group_id}-notify"})
        rx.retry_after["failing"] = "1"
        notifier = Notifier(settings)
        thread = threading.Thread(target=notifier.run, name="notifier", daemon=True)
        thread.start()
        group = KafkaConsumer(group_id=settings.notify.group_id, enable_auto_commit=False,
                              **settings.kafka.client_options())
        try:
            wait_for(lambda: notifier.follower.assigned == settings.kafka.partitions, timeout_s=30, thread=thread,
                     what="the notifier to hold every partition")
            started = time.monotonic()
            rx.down_until["failing"] = started + DOWN_S
            acked = produce_raw(settings, settings.kafka.alerts_topic,
                                [(a.conversation_id.encode(), a.to_bytes()) for a in alerts])
            produced_s = time.monotonic() - started
            ends = {p: max((md.offset + 1 for md in acked if md.partition == p), default=0)
                    for p in range(settings.kafka.partitions)}

            def got(target: str) -> set[str]:
                alone, _, folded = _ids(list(rx.received[target]))
                return set(alone) | set(folded)

            def state() -> str:
                return (f"received {dict((k, len(v)) for k, v in rx.received.items())}, attempts {dict(rx.attempts)}, "
                        f"committed {_committed(group, settings)} of {ends}, backlog "
                        f"{ {n: w.backlog for n, w in notifier.workers.items()} }")

            wait_for(lambda: got("healthy") == every_id, timeout_s=20, thread=thread, state=state,
                     what="every alert at the healthy target")
            healthy_done_s = time.monotonic() - started
            wait_for(lambda: got("failing") == every_id, timeout_s=DOWN_S + 30, thread=thread, state=state,
                     what="every alert at the failing target")
            wait_for(lambda: _committed(group, settings) == ends, timeout_s=15, thread=thread, state=state,
                     what="the notifier to commit every alert")
        finally:
            notifier.stop()
            thread.join(30)
            notifier.close()
            group.close(autocommit=False)

    first_healthy_s = rx.received_at["healthy"][0] - started
    first_failing_s = rx.received_at["failing"][0] - started
    print(f"\n{ALERTS} alerts produced in {produced_s:.2f} s; healthy: first notification after {first_healthy_s:.2f} "
          f"s, every alert after {healthy_done_s:.2f} s, {len(rx.received['healthy'])} notifications; failing: "
          f"{rx.attempts['failing'] - len(rx.received['failing'])} refused tries, first accepted after "
          f"{first_failing_s:.2f} s, {len(rx.received['failing'])} notifications")
    assert produced_s < 60
    # the healthy target at once, whatever the failing one does meanwhile (it refuses everything until DOWN_S)
    assert first_healthy_s < 5.0, first_healthy_s
    assert healthy_done_s < DOWN_S / 2, healthy_done_s
    assert rx.requested_at["failing"][0] - started < 5.0  # it was tried at the same time, and failed
    assert first_failing_s >= DOWN_S - 0.5
    groups = len(TENANTS) * len(RULES)
    for target in ("healthy", "failing"):
        alone, summaries, folded = _ids(rx.received[target])
        assert not [i for i, n in Counter(alone).items() if n > 1], f"{target}: an alert delivered alone twice"
        assert len(summaries) == len(set(summaries)), f"{target}: a summary delivered twice"
        assert len(folded) == len(set(folded)), f"{target}: an alert folded into two summaries"
        assert not set(alone) & set(folded), f"{target}: an alert delivered alone and in a summary"
        assert set(alone) | set(folded) == every_id
        # grouped: a few notifications per (tenant, rule), not one per alert
        assert len(rx.received[target]) <= 3 * groups, (target, len(rx.received[target]))
        assert summaries, target
