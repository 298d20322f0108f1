"""``erc-stream bench --long``: what a turn costs once a conversation outgrows its window, through the consumer.

A call-center call runs 50–150 turns; the benchmark's MELD scenes run about ten. Here the same utterances are
sent three ways, turn by turn, through a real consumer (tansu broker, Redis, the chosen backend):

- ``scenes``: every scene its own conversation (the short-scene figure: the whole history fits the window);
- ``sliding``: the scenes of an episode joined into one long conversation, ``window.hop`` = 1 (the window
  drops its oldest line every turn: the old behaviour, each turn recomputes its whole window);
- ``hop``: the same long conversations with the configured ``window.hop`` (the window's first turn moves in
  hops, speakers keep their conversation numbers: consecutive turns share every history line but the new one).

Data: EmoryNLP dev's scenes joined per (Season, Episode) (:func:`model_store.data.load_episodes`; episodes of
60 turns or more; the EmoryNLP adapter, its label set), the first ``turns`` turns of the first
``conversations`` episodes; synthetic conversations joined the same way where no data directory exists (and
the report says so). ``conversations`` lanes run side by side: each round sends one turn of every lane and
waits for their events, as live calls do (a turn arrives once the previous one was answered), so a
micro-batch never holds two turns of one conversation.

Per arrangement: prompt and computed tokens per utterance (the backend's own counters, which feed
``erc_prompt_tokens_total`` / ``erc_computed_tokens_total``) against the turn's own line, split into the rounds
inside the first window (turn < ``window.size``) and after it, utterances/s over the rounds (paced: each round waits
for its answers), and weighted F1 of the emitted events against the gold labels. Every arrangement runs in its own
process with its own backend, topics, group and Redis keys.

    ERC_DATA__DIR=../shared/data erc-stream bench --long --json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Sequence

from core.settings import Settings

ARRANGEMENTS: tuple[str, ...] = ("scenes", "sliding", "hop")
LABEL_SET = "emorynlp"


@dataclass(frozen=True)
class Lane:
    """One stream of turns: a long conversation's scenes, in order (the ``scenes`` arrangement splits it)."""

    episode: str
    scenes: tuple  # tuple[model_store.data.Conversation, ...]


def lanes(settings: Settings, conversations: int, turns: int, min_turns: int = 60) -> tuple[list[Lane], str]:
    """The first ``conversations`` episodes of at least ``min_turns`` turns, each cut to ``turns`` turns."""
    from model_store.data import default_file, episode_scenes

    path = default_file(settings.data.dir, LABEL_SET, "dev")
    if path.exists():
        episodes, source = episode_scenes(LABEL_SET, path), f"EmoryNLP dev episodes ({path})"
    else:
        from producer_sim.synthetic import synthetic_conversations

        convs = synthetic_conversations(conversations * max(1, -(-min_turns // 6)))
        per = len(convs) // conversations
        episodes = [(f"synthetic-{i}", convs[i * per: (i + 1) * per]) for i in range(conversations)]
        source = "synthetic conversations joined (no data directory)"
    out: list[Lane] = []
    for episode, scenes in episodes:
        if sum(len(s.utterances) for s in scenes) < min(min_turns, turns):
            continue
        kept, left = [], turns
        for scene in scenes:
            if left <= 0:
                break
            cut = scene.utterances[:left]
            kept.append(type(scene)(scene.dataset, scene.conversation_id, cut))
            left -= len(cut)
        out.append(Lane(episode, tuple(kept)))
        if len(out) == conversations:
            break
    return out, source


def rounds(lanes_: Sequence[Lane], arrangement: str, run_id: str) -> list[list]:
    """The messages of each round (one turn of every lane), ``ChatMessage`` objects with turns and gold labels."""
    from core.records import ChatMessage

    start = datetime.now(UTC)
    streams = []
    for lane in lanes_:
        stream = []
        turn_in_episode = 0
        for scene in lane.scenes:
            for i, u in enumerate(scene.utterances):
                conversation = (f"{run_id}:{scene.conversation_id}" if arrangement == "scenes"
                                else f"{run_id}:{lane.episode}")
                turn = i if arrangement == "scenes" else turn_in_episode
                stream.append(ChatMessage(
                    message_id=f"{conversation}:{turn}", conversation_id=conversation, turn=turn,
                    speaker=u.speaker or "unknown", text=u.text, sent_at=start + timedelta(seconds=turn_in_episode),
                    gold_label=u.label))
                turn_in_episode += 1
        streams.append(stream)
    return [[s[r] for s in streams if r < len(s)] for r in range(max(map(len, streams)))]


def own_line_tokens(plan: Sequence[Sequence], count_tokens, max_turn_chars: int) -> dict[str, int]:
    """Per message id, the tokens of its own line (``Speaker_k: "…"``, speakers numbered per conversation by first
    appearance): the least any prompt layout must compute for the turn."""
    from bench.scoring_paths import own_line

    speakers: dict[str, dict[str, int]] = {}
    out = {}
    for round_ in plan:
        for m in round_:
            numbers = speakers.setdefault(m.conversation_id, {})
            k = numbers.setdefault(m.speaker, len(numbers))
            out[m.message_id] = count_tokens(own_line(f"Speaker_{k}", m.text, max_turn_chars))
    return out


# -- one arrangement, in its own process ---------------------------------------------------------------


def run_arrangement(settings: Settings, arrangement: str, conversations: int, turns: int) -> dict[str, Any]:
    """Send the lanes' turns round by round through a consumer in this process; the figures."""
    from kafka import KafkaProducer

    from consumer.app import StreamApp
    from core.labels import get_label_set
    from local_services.supervisor import ensure_topics
    from model_store.evaluation import metrics
    from model_store.loading import load_backend

    hop = 1 if arrangement == "sliding" else settings.window.hop
    s = _run_settings(settings, hop)
    lanes_, _ = lanes(s, conversations, turns)
    plan = rounds(lanes_, arrangement, f"long-{uuid.uuid4().hex[:8]}")
    ensure_topics(s)
    events: dict[str, Any] = {}
    started = time.monotonic()
    backend = load_backend(s)
    app = StreamApp(s, backend, on_event=lambda event, msg: events.__setitem__(event.message_id, event))
    app.routes.choose_adapters()
    load_s = time.monotonic() - started
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    producer = KafkaProducer(**s.kafka.client_options(), acks="all", linger_ms=0)

    def send(messages: Sequence, timeout_s: float = 600.0) -> None:
        for m in messages:
            producer.send(s.kafka.input_topic, key=m.conversation_id.encode(), value=m.to_bytes())
        producer.flush()
        deadline = time.monotonic() + timeout_s
        while any(m.message_id not in events for m in messages):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"{arrangement}: {sum(m.message_id not in events for m in messages)} of "
                                   f"{len(messages)} messages unanswered after {timeout_s:.0f} s")
            time.sleep(0.005)

    try:
        from core.records import ChatMessage

        send([ChatMessage(message_id="warm-up", conversation_id="warm-up", turn=0, speaker="x", text="Hello.",
                          sent_at=datetime.now(UTC))], timeout_s=900)
        tokens = backend.tokens
        own = own_line_tokens(plan, backend.count_tokens, s.window.max_turn_chars)
        # utterances, prompt tokens, computed tokens, own-line tokens
        split = {"first_window": [0, 0, 0, 0], "after": [0, 0, 0, 0]}
        seconds = 0.0
        for r, messages in enumerate(plan):
            before = (tokens.prompts, tokens.prompt_tokens, tokens.computed)
            t0 = time.monotonic()
            send(messages)
            seconds += time.monotonic() - t0
            part = split["first_window" if (arrangement == "scenes" or r < s.window.size) else "after"]
            for i, (now, then) in enumerate(zip((tokens.prompts, tokens.prompt_tokens, tokens.computed), before)):
                part[i] += now - then
            part[3] += sum(own[m.message_id] for m in messages)
    finally:
        producer.close()
        app.stop()
        thread.join(60)
    sent = [m for round_ in plan for m in round_]
    label_set = get_label_set(s.model.label_set)
    golds = [label_set.map_gold(m.gold_label) for m in sent]
    m = metrics([g for g in golds if g], [events[x.message_id].label for x, g in zip(sent, golds) if g],
                label_set.labels)
    total = [a + b for a, b in zip(split["first_window"], split["after"])]

    def per_utt(part: list[int]) -> dict[str, float | int]:
        n = max(part[0], 1)
        return {"utterances": part[0], "prompt_tokens_per_utterance": round(part[1] / n, 1),
                "computed_tokens_per_utterance": round(part[2] / n, 1),
                "own_line_tokens_per_utterance": round(part[3] / n, 1),
                "computed_vs_own_line": round(part[2] / max(part[3], 1), 2)}

    return {
        "arrangement": arrangement, "backend": s.model.backend, "dtype": getattr(backend, "dtype", None),
        "window_size": s.window.size, "window_hop": hop, "conversations": len(lanes_),
        "turns_per_conversation": [sum(len(c.utterances) for c in lane.scenes) for lane in lanes_],
        "messages": len(sent), "load_seconds": round(load_s, 1), "seconds": round(seconds, 1),
        "utterances_per_s": round(len(sent) / seconds, 3), **per_utt(total),
        "first_window": per_utt(split["first_window"]), "after_first_window": per_utt(split["after"]),
        "weighted_f1": m["weighted_f1"], "accuracy": m["accuracy"],
        "degraded_windows": sum(e.window_degraded for e in events.values()),
        "adapter": next(iter(events.values())).adapter if events else None,
    }


def _run_settings(settings: Settings, hop: int) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return settings.with_overrides(
        kafka={"input_topic": f"long-{suffix}.messages", "output_topic": f"long-{suffix}.emotions",
               "dlq_topic": f"long-{suffix}.dlq", "alerts_topic": f"long-{suffix}.alerts", "partitions": 1,
               "group_id": f"erc-long-{suffix}", "client_id": f"erc-long-{suffix}",
               "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
        redis={"key_prefix": f"erc-long-{suffix}"},
        model={"label_set": LABEL_SET, "adapter": settings.model.adapter},
        window={"hop": hop},
        conversation={"retain_turns": max(settings.conversation.retain_turns, settings.window.size + hop - 1)},
        batch={"max_wait_ms": 5},
        metrics={"enabled": False},
    )


# -- orchestration -----------------------------------------------------------------------------------------


def run_long(settings: Settings, *, backends: Sequence[str] = ("hf", "vllm"), conversations: int = 4,
             turns: int = 80, arrangements: Sequence[str] = ARRANGEMENTS, log=print) -> dict[str, Any]:
    """Every (backend, arrangement) on a throwaway tansu broker and Redis; one JSON-able dict."""
    from bench.consumer_throughput import with_services
    from bench.scoring_paths import machine

    started = time.monotonic()
    _, source = lanes(settings, conversations, turns)
    results: dict[str, dict[str, Any]] = {}

    def measure_all(base: Settings) -> None:
        for backend in backends:
            for arrangement in arrangements:
                log(f"{backend} / {arrangement}…")
                r = _in_process(base.with_overrides(model={"backend": backend}), arrangement, conversations, turns)
                results[f"{backend}/{arrangement}"] = r
                log("  " + json.dumps({k: r.get(k) for k in ("computed_tokens_per_utterance", "utterances_per_s",
                                                              "weighted_f1", "error")}))

    with_services(measure_all, settings)
    for backend in backends:
        scenes, hop = results.get(f"{backend}/scenes", {}), results.get(f"{backend}/hop", {})
        sliding = results.get(f"{backend}/sliding", {})
        if "computed_tokens_per_utterance" in scenes:
            for r in (hop, sliding):
                if "computed_tokens_per_utterance" in r:
                    r["computed_tokens_vs_scenes"] = round(r["computed_tokens_per_utterance"]
                                                           / scenes["computed_tokens_per_utterance"], 3)
        if "after_first_window" in hop and "after_first_window" in sliding:
            hop["computed_tokens_after_first_window_vs_sliding"] = round(
                hop["after_first_window"]["computed_tokens_per_utterance"]
                / max(sliding["after_first_window"]["computed_tokens_per_utterance"], 1e-9), 3)
    return {"machine": machine(), "source": source, "label_set": LABEL_SET, "window_size": settings.window.size,
            "window_hop": settings.window.hop, "results": results, "seconds": round(time.monotonic() - started, 1)}


def _in_process(settings: Settings, arrangement: str, conversations: int, turns: int) -> dict[str, Any]:
    from bench.scoring_paths import settings_env

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, **settings_env(settings), "ERC_MODEL__BACKEND": settings.model.backend,
               "ERC_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
               "ERC_REDIS__URL": settings.redis.url.get_secret_value(), "ERC_WINDOW__SIZE": str(settings.window.size),
               "ERC_WINDOW__HOP": str(settings.window.hop)}
        env.pop("ERC_MODEL__LABEL_SET", None)  # this benchmark's label set is EmoryNLP's
        cmd = [sys.executable, "-m", "bench.long_conversations", arrangement, str(conversations), str(turns), str(out)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"arrangement": arrangement, "error": proc.stderr[-3000:]}
        return json.loads(out.read_text())


if __name__ == "__main__":  # one arrangement's process: python -m bench.long_conversations ARRANGEMENT K TURNS OUT
    from core.logs import configure

    configure("WARNING")
    _arrangement, _k, _turns, _out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    _out.write_text(json.dumps(run_arrangement(Settings(), _arrangement, _k, _turns)))
