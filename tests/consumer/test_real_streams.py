"""The streams users run, through the real broker, Redis and the embedded model with the shipped adapter: a
support call (schema 2, roles, no turn numbers), a branching comment thread (reply_to), and version-1
messages in the same stream."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from consumer.app import StreamApp
from core.readers import read_alerts, read_events
from core.records import ChatMessage
from core.settings import Settings
from producer_sim.synthetic import call_center_messages
from scoring.prompts import MARKER
from tests.app_threads import run_until
from tests.kafka_helpers import produce_raw

THREAD = [  # (id, reply_to, speaker, text)
    ("r", None, "op", "Just got the new phone and the battery already died after two hours."),
    ("a", "r", "u1", "Same here, mine gets really hot too."),
    ("b", "r", "u2", "Did you try turning off the always-on display? Fixed it for me, love it now."),
    ("b1", "b", "op", "Oh nice, that actually helped!"),
    ("a1", "a", "u3", "Mine caught fire last night. I am terrified to charge it."),
    ("z", "gone", "u4", "Exactly what I said above."),  # its parent never arrived
]


@pytest.mark.slow
def test_roles_threads_and_version_1_in_one_stream_on_the_real_model(settings: Settings, own_hf_backend) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 8, "max_wait_ms": 200}, model={"threads": 2},
                                       alerts={"tenants": {"callcenter": {"streak_roles": ["customer"]}}})
    run = uuid.uuid4().hex[:6]
    now = datetime.now(UTC)
    thread = [ChatMessage(schema_version=2, message_id=mid, conversation_id=f"{run}-post", speaker=speaker, text=text,
                          reply_to=parent, sent_at=now + timedelta(seconds=i), tenant="social")
              for i, (mid, parent, speaker, text) in enumerate(THREAD)]
    call = call_center_messages(run, tenant="callcenter", start=now)
    v1 = [ChatMessage(message_id=f"{run}-v1:{t}", conversation_id=f"{run}-v1", turn=t, speaker=s, text=x, sent_at=now)
          for t, (s, x) in enumerate([("Ross", "We were on a break!"), ("Rachel", "Oh, that is so not the point.")])]
    msgs = thread + call + v1
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])

    prompts: list[str] = []
    score = own_hf_backend.score

    def recording(requests):
        prompts.extend(r.prompt for r in requests)
        return score(requests)

    own_hf_backend.score = recording
    app = StreamApp(settings, own_hf_backend)
    app.routes.choose_adapters()  # the registry's default for meld: the shipped adapter
    run_until(app, lambda: app.stats.events >= len(msgs), timeout_s=240)
    assert app.stats.events == len(msgs) and app.stats.dead_letters == 0, app.stats

    events = {(e.conversation_id, e.message_id): e for e in read_events(settings, timeout_s=20).events}
    post = {m.message_id: events[(m.conversation_id, m.message_id)] for m in thread}
    # Turns numbered by arrival, replies carried, the orphan flagged.
    assert [post[mid].turn for mid, *_ in THREAD] == list(range(len(THREAD)))
    assert post["a1"].reply_to == "a" and post["z"].window_degraded and not post["a1"].window_degraded
    assert post["a1"].window == 3 and post["b1"].window == 3 and post["r"].window == 1

    # The prompt of a reply holds its chain of ancestors, oldest first, never the sibling branch.
    def history_of(text: str) -> str:
        """The history lines, target included, of the prompt whose target is ``text``: in the stream layout the
        lines after the head (the target's last), in the InstructERC one the block between '### ' and ' ###'."""
        prompt = next(p for p in prompts if f'"{text}">' in p or p.endswith(f'"{text}"{MARKER}'))
        if prompt.endswith(MARKER):
            return "\n".join(line for line in prompt.split("\n") if line.startswith("Speaker_"))
        return prompt.split("\n### ", 1)[1].split(" ###", 1)[0]

    history = history_of(THREAD[4][3])
    assert [history.find(THREAD[i][3]) for i in (0, 1, 4)] == sorted(history.find(THREAD[i][3]) for i in (0, 1, 4))
    assert all(THREAD[i][3] in history for i in (0, 1, 4))
    assert THREAD[2][3] not in history and THREAD[3][3] not in history
    assert history_of(THREAD[5][3]).count("\n") == 0  # the orphan: itself only

    # The support call: one alert, over the customer's turns only; every role carried into its events.
    alerts, _ = read_alerts(settings, timeout_s=20)
    on_call = [a for a in alerts if a.conversation_id == call[0].conversation_id]
    assert [a.rule for a in on_call] == ["negative_streak"], [a.summary for a in alerts]
    assert {e.speaker for e in on_call[0].evidence} == {"Dana"}
    assert [events[(m.conversation_id, m.message_id)].role for m in call] == [m.role for m in call]
    # Version 1 still works, in the same stream.
    assert [events[(m.conversation_id, m.message_id)].turn for m in v1] == [0, 1]
