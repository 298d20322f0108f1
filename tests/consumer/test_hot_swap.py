"""A running consumer picks up a newly promoted adapter between batches, without a restart."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from consumer.app import StreamApp
from core.records import EmotionEvent
from core.settings import Settings
from model_store.loading import choose_adapter
from model_store.registry import Registry
from producer_sim.replay import interleave, to_messages
from producer_sim.synthetic import synthetic_conversations
from tests.kafka_helpers import produce_raw, read_all
from tests.waiting import wait_for


def test_promoted_adapter_is_used_between_batches(settings: Settings, own_hf_backend, lora_adapter: Path,
                                                  tmp_path: Path) -> None:
    hf_backend = own_hf_backend
    store = tmp_path / "store"
    shutil.copytree(lora_adapter, store / "adapters" / "swap-me")
    settings = settings.with_overrides(store={"dir": store}, model={"adapter_poll_s": 0.2},
                                       batch={"micro_batch_size": 4, "max_wait_ms": 50})
    initial = choose_adapter(settings).name  # the shipped default for meld, if any
    assert initial != "swap-me"
    app = StreamApp(settings, hf_backend)
    app.labeler.use(choose_adapter(settings))
    msgs = list(interleave(to_messages(synthetic_conversations(2), run_id="swap"), concurrency=2, seed=0))
    first, second = msgs[:3], msgs[3:6]
    thread = threading.Thread(target=app.run, name="stream-app", daemon=True)
    thread.start()
    try:
        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in first])
        wait_for(lambda: app.stats.events >= 3, timeout_s=60, what="the first 3 events", state=lambda: app.stats,
                 thread=thread)
        assert app.labeler.adapter == initial
        Registry(store).promote("swap-me")
        # The loop looks at the registry every adapter_poll_s, between batches: wait for the switch itself, so
        # that the second messages cannot reach a batch labelled before it.
        wait_for(lambda: app.labeler.adapter == "swap-me", timeout_s=30, what="the switch to 'swap-me'",
                 state=lambda: f"adapter now {app.labeler.adapter_key!r}", thread=thread)
        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in second])
        wait_for(lambda: app.stats.events >= 6, timeout_s=60, what="the 6 events", state=lambda: app.stats,
                 thread=thread)
    finally:
        app.stop()
        thread.join(30)
    events = {e.message_id: e for e in (EmotionEvent.from_bytes(r.value)
                                        for r in read_all(settings, settings.kafka.output_topic, 6))}
    assert {events[m.message_id].adapter for m in first} == {initial}
    assert {events[m.message_id].adapter for m in second} == {"swap-me"}
    # The event id names the adapter too: the same message under another adapter is another event.
    assert all(e.event_id == EmotionEvent.make_id(tenant=e.tenant, conversation_id=e.conversation_id, message_id=e.message_id, model=e.model, adapter=f"{e.adapter}@{e.adapter_version}" if e.adapter else None) for e in events.values())
