"""A long conversation through the real stream (broker, Redis, the embedded model with its prefix cache): every
speaker keeps its id from its first turn to its last, and a turn that does not hop computes only its new line
and what follows the history."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta

from bench.prefix_sharing import shared_prefix
from consumer.app import StreamApp
from core.records import ChatMessage
from core.settings import Settings
from scoring.prompts import WindowShape
from tests.kafka_helpers import produce_raw

TURNS = 40
LINE = re.compile(r'(Speaker_\d+): "turn (\d+):')


def _speaker(turn: int) -> str:
    """The customer opens, the agent answers; a supervisor joins at turn 9 and speaks every seventh turn."""
    if turn >= 9 and turn % 7 == 2:
        return "Supervisor"
    return "Customer" if turn % 2 == 0 else "Agent"


def test_a_40_turn_conversation_keeps_its_speaker_ids_and_computes_only_new_tokens(
    settings: Settings, hf_cached_backend
) -> None:
    shape = WindowShape(6, 4)  # windows of 6 to 9 turns: the conversation hops seven times
    settings = settings.with_overrides(window={"size": shape.size, "hop": shape.hop},
                                       conversation={"retain_turns": 12}, model={"adapter": "none"},
                                       batch={"micro_batch_size": 4, "max_wait_ms": 10})
    backend = hf_cached_backend
    calls: list[tuple[str, int]] = []  # each backend call's prompt and the positions it computed
    score = backend.score

    def recording(requests):
        before = backend.tokens.computed
        out = score(requests)
        calls.extend((r.prompt, backend.tokens.computed - before) for r in requests)
        return out

    backend.score = recording
    app = StreamApp(settings, backend)
    app.routes.choose_adapters()
    plan = backend.plan(app.labeler.label_set.labels)
    assert plan.branches == ((),)  # one forward row per prompt: computed positions are the prompt's alone
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    start = datetime.now(UTC)
    try:
        for turn in range(TURNS):  # turn by turn: the next one is sent when this one's event is out
            msg = ChatMessage(message_id=f"call:{turn}", conversation_id="call", turn=turn, speaker=_speaker(turn),
                              text=f"turn {turn}: " + ("I still have no refund." if turn % 2 == 0 else "Let me check."),
                              sent_at=start + timedelta(seconds=turn))
            produce_raw(settings, settings.kafka.input_topic, [(b"call", msg.to_bytes())])
            deadline = time.monotonic() + 60
            while app.stats.events <= turn and time.monotonic() < deadline and thread.is_alive():
                time.sleep(0.01)
            assert app.stats.events == turn + 1, app.stats
    finally:
        app.stop()
        thread.join(30)
    assert len(calls) == TURNS

    # Speaker ids: by first appearance in the conversation, the same in every prompt that shows the turn.
    expected = {"Customer": "Speaker_0", "Agent": "Speaker_1", "Supervisor": "Speaker_2"}
    seen_supervisor = 0
    for turn, (prompt, _) in enumerate(calls):
        lines = LINE.findall(prompt)
        shown = [int(t) for _, t in lines]
        assert shown[:-1] == list(range(shape.first(turn), turn + 1)), prompt  # the window, then the target
        for name, t in lines:
            assert name == expected[_speaker(int(t))], (turn, prompt)
        seen_supervisor += "Speaker_2" in prompt
    assert seen_supervisor > 10

    # Cost: a turn that does not hop reuses the previous prompt up to the end of its history.
    tokenize = backend.encode_prompts
    hops = 0
    for turn in range(1, TURNS):
        prev, cur = tokenize([calls[turn - 1][0], calls[turn][0]])
        computed = calls[turn][1]
        if shape.first(turn) != shape.first(turn - 1):
            hops += 1
            assert computed > len(cur) // 2  # the rebuilt window: most of the prompt
            continue
        history = tokenize([calls[turn - 1][0][: calls[turn - 1][0].index(" ###\n")]])[0]
        shared = shared_prefix(prev, cur)
        assert shared >= len(history) - 1, turn  # every history line of the previous turn is reused
        assert computed == len(cur) - shared, turn  # and nothing else is recomputed
    assert hops == len({shape.first(t) for t in range(TURNS)}) - 1 == 8
