"""Redis memory per conversation and per event, measured on a real Redis through the stream's own scripts.

The capacity plan (docs/capacity.md) sizes Redis from these figures:

- ``MEMORY USAGE`` of one conversation's window key with ``window.size`` (12) turns and with ``conversation.retain_turns``
  (24) turns, and of its alert-state key (``max(streak_length, shift_lookback) + 1`` turns with their labels
  and probabilities), and of its speaker numbers (``:spk:``), written by :class:`~consumer.conversation_store.ConversationStore` and
  :class:`~consumer.alerts.AlertEngine` as the stream writes them;
- the growth of ``used_memory`` per conversation over ``--conversations`` conversations of ``retain`` turns
  (key, TTL and dictionary overhead included: what a shard really holds);
- a thread where every turn is a new commenter: its speaker hash at ``conversation.max_speakers`` numbers (its
  largest), after thousands of commenters (bounded), and in a store that never forgets (what the bound saves);
- the tenant rule's bytes per event held in its sliding window (``:all`` every event, ``:neg`` + ``:ev``
  the negative ones with their evidence), and one tenant's keys at ``alerts.tenant_window_max_events`` events
  (its largest, whatever the tenant sends);
- the bytes of one alert id remembered as sent (kept ``alerts.dedupe_ttl_s``), and the average record sizes
  of a chat message and of an emotion event on the topics (for the Kafka figures).

Texts are the synthetic templates of ``producer_sim`` (MELD-like utterances, ~40-60 characters)::

    python -m bench.redis_memory --conversations 2000 --json
"""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, datetime, timedelta

from bench.consumer_throughput import make_messages, with_services
from core.records import conversation_scope
from core.settings import Settings

LABELS = ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry")


def _event(msg, label: str):
    from core.records import EmotionEvent

    probs = {name: (0.7 if name == label else 0.05) for name in LABELS}
    return EmotionEvent(event_id=EmotionEvent.make_id(tenant=msg.tenant, conversation_id=msg.conversation_id, message_id=msg.message_id, model="smollm2-135m", adapter="meld-smollm2-lora"),
                        message_id=msg.message_id, conversation_id=msg.conversation_id, turn=msg.turn,
                        speaker=msg.speaker, tenant=msg.tenant, label=label, probabilities=probs, label_set="meld",
                        model="smollm2-135m", adapter="meld-smollm2-lora", window=12, latency_ms=1.0,
                        emitted_at=datetime.now(UTC))


def _alert(msg):
    from core.records import Alert

    return Alert(alert_id=Alert.make_id("negative_streak", tenant=msg.tenant, conversation_id=msg.conversation_id, trigger_message_id=msg.message_id), rule="negative_streak",
                 severity="warning", summary="s", conversation_id=msg.conversation_id, tenant=msg.tenant,
                 trigger_message_id=msg.message_id, evidence=[], metrics={}, label_set="meld", model="m", adapter=None)


def _speakers_of_a_thread(client, settings: Settings, prefix: str, texts: list[str]) -> dict[str, float]:
    """A thread of 5,000 turns, each by a new commenter, in a store with ``conversation.max_speakers`` and in one
    that never forgets: the speaker hash at its largest (just before the absent speakers are forgotten), at the
    end, and unbounded."""
    from consumer.conversation_store import ConversationStore, StoredTurn

    c = settings.conversation
    turns = 5_000

    def thread(store: ConversationStore, conv: str, start: int, stop: int) -> None:
        for lo in range(start, stop, 500):
            store.append_many([(conv, StoredTurn(n, f"commenter-{n}", texts[n % len(texts)], f"{conv}:{n}"))
                               for n in range(lo, min(lo + 500, stop))])

    out: dict[str, float] = {}
    bounded = ConversationStore(client, prefix=f"{prefix}-b", size=settings.window.span, retain=c.retain_turns,
                                ttl_s=c.ttl_s, max_speakers=c.max_speakers)
    # After max_speakers new speakers the hash holds max_speakers numbers and the counter: the next one forgets.
    thread(bounded, "thread", 0, bounded.max_speakers)
    out["speakers_at_bound"] = client.hlen(bounded.speakers_key("thread")) - 1
    out["speakers_key_bytes_at_bound"] = client.memory_usage(bounded.speakers_key("thread"), samples=0)
    thread(bounded, "thread", bounded.max_speakers, turns)
    out["thread_turns"] = turns
    out["speakers_after_thread"] = client.hlen(bounded.speakers_key("thread")) - 1
    out["speakers_key_bytes_after_thread"] = client.memory_usage(bounded.speakers_key("thread"), samples=0)
    unbounded = ConversationStore(client, prefix=f"{prefix}-u", size=settings.window.span, retain=c.retain_turns,
                                  ttl_s=c.ttl_s, max_speakers=10 * turns)
    thread(unbounded, "thread", 0, turns)
    out["speakers_key_bytes_after_thread_unbounded"] = client.memory_usage(unbounded.speakers_key("thread"),
                                                                           samples=0)
    return out


def measure(settings: Settings, *, conversations: int) -> dict[str, float]:
    from consumer.alerts import AlertEngine
    from consumer.conversation_store import ConversationStore, StoredTurn
    from core.redis_client import connect

    w, c = settings.window, settings.conversation
    client = connect(settings.redis)
    prefix = f"mem-{uuid.uuid4().hex[:6]}"
    store = ConversationStore(client, prefix=prefix, size=w.span, retain=c.retain_turns, ttl_s=c.ttl_s,
                              max_speakers=c.max_speakers)
    alerts = AlertEngine(client, settings.alerts.model_copy(update={"tenant_threshold": 1.0}), prefix=prefix,
                         ttl_s=c.ttl_s)
    msgs = make_messages(conversations * c.retain_turns, conversations, seed=1)
    out: dict[str, float] = {}
    try:
        base = client.info("memory")["used_memory"]
        by_conv: dict[str, list] = {}
        for m in msgs:
            by_conv.setdefault(m.conversation_id, []).append(m)
        for start in range(0, len(msgs), 500):
            chunk = msgs[start:start + 500]
            store.append_many([(conversation_scope(m.tenant, m.conversation_id),
                                StoredTurn(m.turn, m.speaker, m.text, m.message_id)) for m in chunk])
            alerts.evaluate([(_event(m, LABELS[(m.turn * 3) % len(LABELS)]), m) for m in chunk])
        used = client.info("memory")["used_memory"] - base
        first = next(iter(by_conv))
        first_msg = by_conv[first][0]
        scope = conversation_scope(first_msg.tenant, first)
        out["conversation_bytes_used_memory"] = round(used / len(by_conv), 1)
        out["window_key_bytes_retain"] = client.memory_usage(store.key(scope), samples=0)
        out["id_index_key_bytes_retain"] = client.memory_usage(store.ids_key(scope), samples=0)
        out["speakers_key_bytes"] = client.memory_usage(store.speakers_key(scope), samples=0)
        out["alert_conv_key_bytes"] = client.memory_usage(alerts._conv_key(_event(first_msg, "neutral")), samples=0)
        out["avg_text_chars"] = round(sum(len(m.text) for m in msgs) / len(msgs), 1)
        # A window of exactly `size` turns: a fresh conversation of `size` turns.
        conv12 = f"{prefix}-w{w.size}"
        store.append_many([(conv12, StoredTurn(t.turn, t.speaker, t.text, f"{conv12}:{t.turn}"))
                           for t in by_conv[first][:w.size]])
        out["window_key_bytes_size"] = client.memory_usage(store.key(conv12), samples=0)

        out.update(_speakers_of_a_thread(client, settings, prefix, [m.text for m in msgs[:500]]))

        # The tenant rule: 2,000 events of one tenant, every third negative, inside one window.
        tenant_alerts = AlertEngine(client, settings.alerts.model_copy(update={"streak_length": 0, "shift": False,
                                                                               "tenant_threshold": 0.99}),
                                    prefix=f"{prefix}-t", ttl_s=c.ttl_s)
        t0 = datetime.now(UTC)
        tenant_msgs = [m.model_copy(update={"tenant": "acme", "sent_at": t0 + timedelta(milliseconds=i)})
                       for i, m in enumerate(msgs[:2000])]
        for start in range(0, len(tenant_msgs), 500):
            chunk = tenant_msgs[start:start + 500]
            tenant_alerts.evaluate([(_event(m, "angry" if i % 3 == 0 else "neutral"), m)
                                    for i, m in enumerate(chunk, start)])
        tenant_bytes = sum(client.memory_usage(k, samples=0) or 0 for k in tenant_alerts._tenant_keys("acme"))
        out["tenant_bytes_per_event_in_window"] = round(tenant_bytes / len(tenant_msgs), 1)
        # One tenant sending more than the bound inside one window: its keys hold the most recent N events.
        bound = settings.alerts.tenant_window_max_events
        burst = [msgs[i % len(msgs)].model_copy(update={"tenant": "burst", "message_id": f"burst-{i}",
                                                        "sent_at": t0 + timedelta(milliseconds=i)})
                 for i in range(bound + bound // 5)]
        for start in range(0, len(burst), 500):
            tenant_alerts.evaluate([(_event(m, "angry" if i % 3 == 0 else "neutral"), m)
                                    for i, m in enumerate(burst[start:start + 500], start)])
        burst_keys = tenant_alerts._tenant_keys("burst")
        out["tenant_window_events_sent"] = len(burst)
        out["tenant_window_events_held"] = client.zcard(burst_keys[0])
        out["tenant_window_bytes_at_bound"] = sum(client.memory_usage(k, samples=0) or 0 for k in burst_keys)
        # Alert ids remembered as sent (SET NX EX alerts.dedupe_ttl_s), per alert: one per message, so that the
        # keyspace's table doublings are spread over many keys as on a real shard.
        before = client.info("memory")["used_memory"]
        fired = [_alert(m) for m in msgs]
        alerts.mark_sent(fired)
        out["sent_alert_id_bytes"] = round((client.info("memory")["used_memory"] - before) / len(fired), 1)
        # Record sizes on the topics (JSON, as produced): a chat message in, an emotion event out.
        sample = msgs[:2000]
        out["message_bytes"] = round(sum(len(m.to_bytes()) for m in sample) / len(sample), 1)
        out["event_bytes"] = round(sum(len(_event(m, "neutral").to_bytes()) for m in sample) / len(sample), 1)
        out["redis_version"] = client.info("server")["redis_version"]
        out["conversations"] = len(by_conv)
        out["turns_per_conversation"] = c.retain_turns
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.unlink(key)
        client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from core.logs import configure

    configure("WARNING")
    result = with_services(lambda s: measure(s, conversations=a.conversations))
    print(json.dumps(result) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
