"""A stream batch (batch.stream_batch_size: one poll, one Redis round trip per stage, one flush and commit) is
labelled in micro-batches of batch.micro_batch_size: the backend never sees more than max_size prompts at once."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

from consumer.app import StreamApp
from core.settings import Settings
from producer_sim.replay import interleave, to_messages
from producer_sim.synthetic import synthetic_conversations
from scoring.backends.base import ScoreRequest
from scoring.backends.null import NullBackend
from tests.kafka_helpers import produce_raw


class _CallSizes(NullBackend):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.sizes.append(len(requests))
        return super().score(requests)


def test_a_stream_batch_is_labelled_in_micro_batches(settings: Settings) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 4, "stream_batch_size": 12, "max_wait_ms": 500})
    assert settings.batch.stream_records == 12 and Settings().batch.stream_records == Settings().batch.micro_batch_size
    per_conv = to_messages(synthetic_conversations(6, seed=2), run_id=f"mb-{uuid.uuid4().hex[:8]}")
    messages = list(interleave(per_conv, concurrency=6, seed=2))
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in messages])

    backend = _CallSizes()
    app = StreamApp(settings, backend)
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while app.stats.events < len(messages) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        app.stop()
        thread.join(30)
    assert app.stats.events == len(messages) and app.stats.dead_letters == 0
    assert sum(backend.sizes) == len(messages)
    assert max(backend.sizes) <= 4  # never more than max_size prompts in one backend call
    assert app.stats.batches <= len(messages) // 4  # yet stream batches held more than one micro-batch
    assert len(backend.sizes) > app.stats.batches
    assert app.metrics.value("erc_inference_seconds_count") == len(backend.sizes)  # one observation per call
    assert app.metrics.value("erc_stream_batch_records_count") == app.stats.batches
