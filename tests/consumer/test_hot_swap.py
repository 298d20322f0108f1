"""A running consumer picks up a newly promoted adapter between batches, without a restart."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from consumer.app import StreamApp
from core.records import EmotionEvent
from core.settings import Settings
from model_store.loading import choose_adapter
from model_store.registry import Registry
from producer_sim.replay import interleave, to_messages
from producer_sim.synthetic import synthetic_conversations
from tests.kafka_helpers import produce_raw, read_all


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
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in first])
        deadline = time.monotonic() + 60
        while app.stats.events < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        Registry(store).promote("swap-me")
        time.sleep(0.5)  # > adapter_poll_s: the next loop iteration switches
        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in second])
        while app.stats.events < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        app.stop()
        thread.join(30)
    events = {e.message_id: e for e in (EmotionEvent.from_bytes(r.value)
                                        for r in read_all(settings, settings.kafka.output_topic, 6))}
    assert {events[m.message_id].adapter for m in first} == {initial}
    assert {events[m.message_id].adapter for m in second} == {"swap-me"}
    # The event id names the adapter too: the same message under another adapter is another event.
    assert all(e.event_id == EmotionEvent.make_id(tenant=e.tenant, conversation_id=e.conversation_id, message_id=e.message_id, model=e.model, adapter=f"{e.adapter}@{e.adapter_version}" if e.adapter else None) for e in events.values())
