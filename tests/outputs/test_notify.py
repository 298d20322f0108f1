"""The notifier against a real broker, Redis and a local webhook receiver that fails its first requests: every
alert arrives once per target it routes to, through failures, duplicate copies on the topic and a restart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
from kafka import KafkaConsumer, TopicPartition

from core.readers import read_dead_letters
from core.records import Alert, AlertEvidence
from core.settings import NotifyTarget, Settings
from outputs.notify import Notifier, NotifyMetrics, payload, routes
from outputs.notify_payloads import Notification, render
from outputs.notify_webhook import MAX_BODY_BYTES, post, retry_after, scrub
from tests.conftest import free_port
from tests.kafka_helpers import PacedSender, produce_raw
from tests.outputs.webhook_receiver import Receiver
from tests.procs import PROJECT, service_env
from tests.waiting import wait_for


def _alert(i: int, tenant: str, rule: str = "negative_streak", *, speaker: str = "Dana", conv: str | None = None,
           label: str = "anger") -> Alert:
    conv = conv or f"{tenant}-call-{i}"
    ev = [AlertEvidence(message_id=f"{conv}:{t}", conversation_id=conv, turn=t, speaker=speaker, label=label,
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
               "group_id": f"{settings.kafka.group_id}-notify", "group_wait_s": 0, "group_interval_s": 0},
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


def test_slack_text_escapes_every_value_from_messages_and_alerts() -> None:
    """A display name, conversation id, tenant or label cannot ping a channel, hide a link or forge a line."""
    slack = NotifyTarget(name="s", url="https://hooks.example/x", kind="slack")
    hostile = "<!channel> <https://evil.example|Open ticket>"
    a = _alert(1, "<!here>", speaker=hostile + "\n> #9 Boss: joy (100%)", conv="c<@U0123>&amp;1", label="<b>anger</b>")
    b = _alert(2, "<!here>", conv="<!subteam^S1|ops>")
    texts = [payload(a, slack)["text"],
             render(Notification("s", (a, b)), slack, listed=10)["text"]]
    for text in texts:
        assert "<" not in text and ">" not in text.replace("\n> ", "\n")  # only the quote marks of our own lines
        assert "&lt;!here&gt;" in text and "<!" not in text and "<@" not in text and "<http" not in text
        assert "&amp;amp;" in text  # an & that came in is shown as typed, not read as an entity
    one = texts[0]
    assert "&lt;!channel&gt; &lt;https://evil.example|Open ticket&gt; &gt; #9 Boss" in one
    assert one.count("\n") == 1 + 3  # the header, the summary, three evidence lines: no forged line
    assert "&lt;b&gt;anger&lt;/b&gt;" in one and "c&lt;@U0123&gt;&amp;amp;1" in one
    assert "2 alerts in one summary" in texts[1] and "&lt;!subteam^S1|ops&gt;" in texts[1]


def test_a_summary_says_what_it_folds() -> None:
    alerts = tuple(_alert(i, "acme") for i in range(7))
    n = Notification("sup", alerts)
    body = render(n, NotifyTarget(name="sup", url="https://hooks.example/x"), listed=3)
    assert body["kind"] == "alert_summary" and body["summary_id"] == n.key and body["count"] == 7
    assert body["alert_ids"] == [a.alert_id for a in alerts] and len(body["alerts"]) == 3
    assert body["alerts"][0]["conversation_id"] == "acme-call-0" and body["tenant"] == "acme"
    assert Notification("sup", alerts[::-1]).key == n.key != Notification("other", alerts).key  # the same fold
    slack = render(n, NotifyTarget(name="sup", url="https://hooks.example/x", kind="slack"), listed=3)["text"]
    assert slack.count("\n> ") == 3 and "and 4 more" in slack and alerts[0].alert_id in slack


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("7") == 7.0 and retry_after(" 0 ") == 0.0
    assert retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90.0
    assert retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now) == 0.0
    assert retry_after(None) is None and retry_after("soon") is None and retry_after("-3") is None


def test_a_response_body_is_read_only_so_far_and_errors_never_name_the_url_or_token() -> None:
    """A receiver answering 500 with an endless body: a few KiB are read, the connection dropped, the reason
    bounded and without the target's URL path or token (even when the body echoes them)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    target = NotifyTarget(name="noisy", url=f"http://127.0.0.1:{port}/T01/B02/s3cr3t-path", token="tok-s3cr3t")
    written = [0]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 1073741824\r\n\r\n")
            chunk = f"{target.url.get_secret_value()} Bearer tok-s3cr3t ".encode() * 1000
            try:
                while written[0] < 1 << 30:
                    conn.sendall(chunk)
                    written[0] += len(chunk)
            except OSError:
                pass  # the client hung up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with httpx.Client(timeout=5) as client:
        started = time.monotonic()
        outcome = post(client, target, {"x": 1}, {"Content-Type": "application/json"}, timeout_s=5)
        took = time.monotonic() - started
    thread.join(10)
    server.close()
    assert not outcome.delivered and not outcome.final and outcome.label == "500"
    assert outcome.reason.startswith("HTTP 500: ") and len(outcome.reason) < 300, outcome.reason
    assert "s3cr3t" not in outcome.reason and "<redacted>" in outcome.reason
    assert took < 3 and written[0] < 64 << 20, (took, written[0])  # hung up long before the gigabyte
    assert MAX_BODY_BYTES <= 8192
    refused = NotifyTarget(name="gone", url=f"http://127.0.0.1:{free_port()}/s3cr3t", token="tok-s3cr3t")
    with httpx.Client(timeout=2) as client:
        outcome = post(client, refused, {}, {}, timeout_s=2)
    assert not outcome.delivered and outcome.label == "ConnectError" and "s3cr3t" not in outcome.reason
    assert scrub(f"see {refused.url.get_secret_value()}?x=1 and /s3cr3t, tok-s3cr3t", refused).count("s3cr3t") == 0


def test_retry_after_is_honoured_up_to_backoff_max(settings: Settings) -> None:
    with Receiver() as rx:
        settings = settings.with_overrides(notify={
            "targets": [{"name": "asks", "url": rx.url("asks")}, {"name": "greedy", "url": rx.url("greedy")}],
            "backoff_s": 0.05, "backoff_max_s": 2.0, "attempts": 4, "timeout_s": 2, "metrics_port": 0,
            "group_wait_s": 0, "group_id": f"{settings.kafka.group_id}-notify"})
        rx.fail["asks"], rx.retry_after["asks"] = [503, 429], "1"
        rx.fail["greedy"], rx.retry_after["greedy"] = [503], "3600"
        produce_raw(settings, settings.kafka.alerts_topic, [(b"k", _alert(1, "acme").to_bytes())])
        notifier = Notifier(settings)
        _run(notifier, lambda: len(rx.received["asks"]) == 1 and len(rx.received["greedy"]) == 1,
             "both targets to accept the alert", lambda: dict(rx.attempts))
    asks = [b - a for a, b in zip(rx.requested_at["asks"], rx.requested_at["asks"][1:])]
    greedy = [b - a for a, b in zip(rx.requested_at["greedy"], rx.requested_at["greedy"][1:])]
    assert len(asks) == 2 and all(0.95 <= gap < 1.9 for gap in asks), asks  # 1 s asked, not 0.05 then 0.1
    assert len(greedy) == 1 and 1.95 <= greedy[0] < 3.5, greedy  # an hour asked, backoff_max_s waited


def test_the_notifiers_logs_and_dead_letters_name_targets_never_urls_or_tokens(settings: Settings) -> None:
    """``erc-stream notify`` at DEBUG, with a target that accepts, one that refuses and one that is gone: its whole
    output names them and carries no URL path or token."""
    with Receiver() as rx:
        sup, strict = "T0001/B0002/sup-s3cr3t-path", "strict-s3cr3t-path?key=s3cr3t-query"
        rx.refuse = lambda target, body: 400 if target == strict else None
        targets = [{"name": "sup", "url": rx.url(sup), "token": "tok-s3cr3t-value"},
                   {"name": "strict", "url": rx.url(strict)},
                   {"name": "gone", "url": f"http://127.0.0.1:{free_port()}/gone-s3cr3t-path", "token": "s3cr3t-2"}]
        produce_raw(settings, settings.kafka.alerts_topic,
                    [(b"k", _alert(i, "acme").to_bytes()) for i in range(2)])
        env = {k: v for k, v in os.environ.items() if not k.startswith("ERC_")}
        env.update(service_env(settings))
        env.update({"ERC_NOTIFY__TARGETS": json.dumps(targets), "ERC_NOTIFY__ATTEMPTS": "2",
                    "ERC_NOTIFY__BACKOFF_S": "0.05", "ERC_NOTIFY__GROUP_WAIT_S": "0",
                    "ERC_NOTIFY__GROUP_INTERVAL_S": "0", "ERC_NOTIFY__METRICS_PORT": "0",
                    "ERC_NOTIFY__GROUP_ID": f"{settings.kafka.group_id}-notify", "ERC_LOG_LEVEL": "DEBUG",
                    "PYTHONUNBUFFERED": "1"})
        done = subprocess.run([sys.executable, "-m", "erc_stream", "notify", "--idle-exit", "3"], env=env, cwd=PROJECT,
                              capture_output=True, text=True, timeout=120)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        assert len(rx.received[sup]) == 2 and rx.attempts[strict] == 2, out[-5000:]
    assert "s3cr3t" not in out, [line for line in out.splitlines() if "s3cr3t" in line]
    for name in ("sup", "strict", "gone"):
        assert f"target={name}" in out, name
    assert out.count("alerts dead-lettered") == 4  # strict refused both alerts, gone never answered
    letters, _ = read_dead_letters(settings)
    assert len(letters) == 4 and {d.stage for d in letters} == {"notify:strict", "notify:gone"}
    assert not [d.reason for d in letters if "s3cr3t" in d.reason]


def test_a_summary_is_sent_once_even_to_a_notifier_that_reads_its_alerts_again(settings: Settings) -> None:
    """A storm folded into a summary; then a notifier that lost its offsets (another group, the same Redis) reads
    every alert again, with copies and a few new ones: only the new ones go, as one notification, and not before
    the group's interval since the first one (the pace survives the restart)."""
    old = [_alert(i, "acme") for i in range(12)]
    new = [_alert(i, "acme") for i in range(12, 15)]
    with Receiver() as rx:
        base = {"targets": [{"name": "sup", "url": rx.url("sup")}], "group_wait_s": 0.5, "group_interval_s": 4.0,
                "metrics_port": 0, "summary_list": 3}
        first = Notifier(settings.with_overrides(notify={**base, "group_id": f"{settings.kafka.group_id}-n1"}))
        produce_raw(settings, settings.kafka.alerts_topic, [(b"k", a.to_bytes()) for a in old])
        _run(first, lambda: sum(len(b.get("alert_ids", [b.get("alert_id")])) for _, b in rx.received["sup"]) == 12,
             "the first 12 alerts at the target", lambda: rx.received["sup"])
        produce_raw(settings, settings.kafka.alerts_topic, [(b"k", a.to_bytes()) for a in [old[0], *new, old[5]]])
        second = Notifier(settings.with_overrides(notify={**base, "group_id": f"{settings.kafka.group_id}-n2"}))
        _run(second, lambda: len(rx.received["sup"]) >= 2 and not second.tracker.pending(),
             "the new alerts at the target", lambda: rx.received["sup"])
    keys = [key for key, _ in rx.received["sup"]]
    ids = [i for _, b in rx.received["sup"] for i in b.get("alert_ids", [b.get("alert_id")])]
    assert len(keys) == len(set(keys)) == 2 and rx.received["sup"][0][1]["kind"] == "alert_summary"
    assert Counter(ids) == Counter(a.alert_id for a in old + new)
    assert _total(second.metrics, "erc_notify_skipped_total") == 12
    assert rx.received_at["sup"][1] - rx.received_at["sup"][0] >= 4.0 - 0.1


def test_a_dead_targets_full_backlog_is_dead_lettered_and_holds_up_nobody(settings: Settings) -> None:
    """A target that never answers holds at most backlog_max alerts; the others that come meanwhile are
    dead-lettered for it at once, while a healthy target gets every alert; a burst that fills the healthy one's
    backlog waits for it instead (it is delivering)."""
    alerts = [_alert(i, "acme") for i in range(10)]
    burst = [_alert(i, "beta") for i in range(10)]
    with Receiver() as rx:
        settings = settings.with_overrides(notify={
            "targets": [{"name": "down", "url": rx.url("down")}, {"name": "ok", "url": rx.url("ok")}],
            "backlog_max": 3, "attempts": 5, "backoff_s": 0.2, "backoff_max_s": 0.2, "group_wait_s": 0,
            "group_interval_s": 0, "metrics_port": 0, "group_id": f"{settings.kafka.group_id}-notify"})
        rx.down_until["down"] = float("inf")
        group = KafkaConsumer(group_id=settings.notify.group_id, enable_auto_commit=False,
                              **settings.kafka.client_options())
        notifier = Notifier(settings)
        thread = threading.Thread(target=notifier.run, name="notifier", daemon=True)
        thread.start()
        try:
            wait_for(lambda: notifier.follower.assigned == settings.kafka.partitions, timeout_s=30, thread=thread,
                     what="the notifier to hold every partition")
            sender = PacedSender(settings, settings.kafka.alerts_topic, [(b"k", a.to_bytes()) for a in alerts],
                                 rate=10)  # one alert every 100 ms: the down target takes ~1 s to give one up
            sender.start()
            acked = sender.join_acked()
            acked += produce_raw(settings, settings.kafka.alerts_topic, [(b"k", a.to_bytes()) for a in burst])
            ends = {p: max((md.offset + 1 for md in acked if md.partition == p), default=0)
                    for p in range(settings.kafka.partitions)}
            wait_for(lambda: _committed(group, settings) == ends, timeout_s=30, thread=thread,
                     what="every alert committed", state=lambda: (dict(rx.attempts), _committed(group, settings)))
        finally:
            notifier.stop()
            thread.join(30)
            notifier.close()
            group.close(autocommit=False)
    assert Counter(key for key, _ in rx.received["ok"]) == Counter(a.alert_id for a in alerts + burst)
    letters, _ = read_dead_letters(settings)
    assert sorted(Alert.from_bytes(d.original()).alert_id for d in letters) == sorted(a.alert_id for a in alerts + burst)
    full = [d for d in letters if "backlog full (3 alerts)" in d.reason]
    assert 10 <= len(full) <= 20 - 3 and all(d.stage == "notify:down" for d in letters), [d.reason for d in letters]
    assert _total(notifier.metrics, "erc_notify_backlog") == 0
