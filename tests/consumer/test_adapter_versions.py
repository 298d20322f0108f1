"""Adapter versions through a running consumer: a new version of the same name is promoted, then rolled back,
and the events say which version labelled them — without a restart."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from consumer.app import StreamApp
from core.records import ChatMessage, EmotionEvent
from core.settings import Settings
from model_store.registry import Registry, publish, versions
from producer_sim.replay import interleave, to_messages
from producer_sim.synthetic import synthetic_conversations
from tests.kafka_helpers import produce_raw, read_all
from tests.waiting import wait_for


def _stage(src: Path, tmp: Path, label_set: str) -> Path:
    """A finished adapter directory, as training leaves it before publishing."""
    out = tmp / f"staging-{src.name}"
    shutil.copytree(src, out)
    meta = json.loads((out / "erc_meta.json").read_text())
    (out / "erc_meta.json").write_text(json.dumps({**meta, "name": "live", "label_set": label_set}))
    return out


def test_a_new_version_is_promoted_and_rolled_back_in_a_running_consumer(
    settings: Settings, own_hf_backend, lora_adapter: Path, unified_lora_adapter: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    first = publish(_stage(lora_adapter, tmp_path, "meld"), store, "live")
    registry = Registry(store)
    registry.promote("live")
    settings = settings.with_overrides(store={"dir": store}, model={"adapter_poll_s": 0.2},
                                       batch={"micro_batch_size": 4, "max_wait_ms": 50})
    app = StreamApp(settings, own_hf_backend)
    app.routes.choose_adapters()
    msgs = list(interleave(to_messages(synthetic_conversations(2), run_id="ver"), concurrency=2, seed=0))[:6]
    seen: dict[str, EmotionEvent] = {}

    def send_and_wait(batch: list[ChatMessage]) -> list[EmotionEvent]:
        """The events this batch produced (the topic's new event ids), in the batch's order."""
        want = len(seen) + len(batch)
        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in batch])
        wait_for(lambda: app.stats.events >= want, timeout_s=90, what=f"{want} events", state=lambda: app.stats,
                 thread=thread)
        assert app.stats.events == want, app.stats
        new = {e.event_id: e for r in read_all(settings, settings.kafka.output_topic, want, timeout_s=20)
               if (e := EmotionEvent.from_bytes(r.value)).event_id not in seen}
        seen.update(new)
        by_message = {e.message_id: e for e in new.values()}
        return [by_message[m.message_id] for m in batch]

    def wait_version(version: str) -> None:
        """Until the running loop has switched to ``version`` (it looks every adapter_poll_s, between batches):
        messages sent after this cannot be labelled by the version before."""
        wait_for(lambda: app.labeler.adapter_version == version, timeout_s=30, what=f"the switch to live@{version}",
                 state=lambda: f"adapter now {app.labeler.adapter_key!r}", thread=thread)

    thread = threading.Thread(target=app.run, name="stream-app", daemon=True)
    thread.start()
    try:
        assert app.labeler.adapter_version == first.name
        before = send_and_wait(msgs[:3])
        # Retrained under the same name: a second version beside the first, which is left as it was.
        second = publish(_stage(unified_lora_adapter, tmp_path, "meld"), store, "live")
        assert second != first and first.exists() and len(versions("live", store)) == 2
        registry.promote("live")  # the newest version
        wait_version(second.name)
        after = send_and_wait(msgs[:3])  # the same messages again, labelled by the new version
        registry.rollback("meld")
        wait_version(first.name)
        rolled_back = send_and_wait(msgs[3:6])
    finally:
        app.stop()
        thread.join(30)
    assert thread.is_alive() is False
    v1, v2 = first.name, second.name
    assert {e.adapter for e in seen.values()} == {"live"}
    assert {e.adapter_version for e in before} == {v1} and {e.adapter_version for e in after} == {v2}
    assert {e.adapter_version for e in rolled_back} == {v1}
    # The same message under another version of the same name is another event.
    assert [e.message_id for e in before] == [e.message_id for e in after]
    assert not {e.event_id for e in before} & {e.event_id for e in after}
    assert any(b.probabilities != a.probabilities for b, a in zip(before, after))
    assert registry.active("meld").version == v1


def test_the_same_content_published_twice_is_one_version(lora_adapter: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    a = publish(_stage(lora_adapter, tmp_path / "a", "meld"), store, "same")
    b = publish(_stage(lora_adapter, tmp_path / "b", "meld"), store, "same")
    assert a == b and [ref.version for ref in versions("same", store)] == [a.name]
    assert Registry(store).info(f"same@{a.name}").path == a
