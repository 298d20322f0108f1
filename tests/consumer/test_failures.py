"""Dependencies failing under a running consumer: Redis down (pause, back off, resume by itself), Redis
restarted empty (events say their window was degraded), inference failing on one item while the backend still
answers a probe (that item's dead letter; a backend that is down pauses the stream: test_outages.py),
and partitions revoked with finished-but-uncommitted offsets (committed on revoke)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from consumer.app import StreamApp
from core.readers import read_dead_letters, read_events
from core.records import ChatMessage
from core.settings import Settings
from scoring.backends.base import ScoreRequest
from scoring.backends.null import NullBackend
from tests.conftest import free_port
from tests.kafka_helpers import committed_offsets, produce_raw, read_all
from tests.keyword_backend import target_text
from tests.procs import RedisProc, stream_messages


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server of this test's own, which the test may kill and restart."""
    server = RedisProc(free_port(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class _Running:
    """A StreamApp in a thread."""

    def __init__(self, app: StreamApp) -> None:
        self.app = app
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.app.run()
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)

    def wait(self, cond, timeout_s: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert self.thread.is_alive(), f"the app died: {self.errors}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.app.stats}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.app.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors


def _send(settings: Settings, msgs: Sequence[ChatMessage]) -> None:
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])


def test_redis_outage_pauses_consumption_and_resumes_by_itself(settings: Settings, own_redis: RedisProc) -> None:
    settings = settings.with_overrides(
        redis={"url": own_redis.url, "socket_timeout_s": 0.5},
        batch={"micro_batch_size": 8, "max_wait_ms": 50},
        window={"size": 4, "hop": 1}, conversation={"retain_turns": 8},
        delivery={"redis_backoff_max_s": 0.5},
        # Shorter than the outage below: the member survives it only because it keeps polling (paused).
        kafka={"max_poll_interval_ms": 6000},
    )
    msgs = stream_messages(4, 8, run_id=uuid.uuid4().hex[:8])
    first = [m for m in msgs if m.turn < 4]
    second = [m for m in msgs if m.turn >= 4]
    running = _Running(StreamApp(settings, NullBackend()))
    try:
        _send(settings, first)
        running.wait(lambda: running.app.stats.events == len(first), what="the first half")
        committed_before = committed_offsets(settings)
        generation = running.app.consumer.group_metadata().generation_id

        own_redis.kill()  # Redis down, its data lost
        _send(settings, second)
        running.wait(lambda: running.app.stats.redis_outages >= 1, what="the outage to be noticed")
        time.sleep(8)  # > max_poll_interval_ms
        assert running.app.stats.events == len(first)  # nothing processed meanwhile...
        assert committed_offsets(settings) == committed_before  # ...and nothing committed
        assert running.app.consumer.paused(), "partitions are not paused during the outage"

        own_redis.start()  # back, empty
        running.wait(lambda: running.app.stats.events == len(msgs), what="the second half")
        # The member kept its place in the group through the outage: no rebalance happened.
        assert running.app.consumer.group_metadata().generation_id == generation
        assert not running.app.consumer.paused()
    finally:
        running.stop()

    out = read_events(settings, timeout_s=20)
    assert out.copies == 0 and len(out.events) == len(msgs)
    by_turn = {(e.conversation_id, e.turn): e for e in out.events}
    # Before the outage every window was whole; after it Redis was empty, so turns 4..7 lack their
    # history (turn 7 of a window of 4 needs turns 4..7: complete again).
    for (conv, turn), e in by_turn.items():
        assert e.window_degraded == (4 <= turn < 7), (conv, turn, e.window_degraded, e.window)
        assert e.window == (min(turn + 1, 4) if turn < 4 else turn - 3)
    assert running.app.stats.degraded == 3 * 4


class _PoisonBackend(NullBackend):
    """Fails any batch holding a prompt with POISON in it (a real exception, from a real scoring call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.calls += 1
        if any("POISON" in target_text(r.prompt) for r in requests):
            raise ValueError("token id 50311 is out of range for this prompt")  # this prompt's fault, not the model's
        return super().score(requests)


def test_inference_failure_is_retried_item_by_item_and_dead_letters_only_the_failing_item(
    settings: Settings,
) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 16, "max_wait_ms": 200})
    msgs = stream_messages(3, 4, run_id=uuid.uuid4().hex[:8])
    poison = msgs[5].model_copy(update={"text": "POISON pill"})
    msgs[5] = poison
    _send(settings, msgs)
    backend = _PoisonBackend()
    running = _Running(StreamApp(settings, backend))
    try:
        running.wait(lambda: running.app.stats.consumed == len(msgs), what="all messages")
    finally:
        running.stop()
    out = read_events(settings, timeout_s=20)
    assert {e.message_id for e in out.events} == {m.message_id for m in msgs} - {poison.message_id}
    letters, _ = read_dead_letters(settings, timeout_s=20)
    assert [d.error_type for d in letters] == ["inference"]
    assert "out of range for this prompt" in letters[0].reason
    assert ChatMessage.from_bytes(letters[0].original()).message_id == poison.message_id
    assert backend.calls > 1  # the batch call failed, then item by item


def test_finished_offsets_are_committed_when_partitions_are_revoked(settings: Settings) -> None:
    """With commits deferred (commit_interval_ms), a member joining makes the first one commit on revoke:
    the newcomer starts where the first stopped, so nothing is emitted twice."""
    settings = settings.with_overrides(batch={"micro_batch_size": 8, "max_wait_ms": 50},
                                       delivery={"commit_interval_ms": 3_600_000})
    msgs = stream_messages(8, 4, run_id=uuid.uuid4().hex[:8])
    first = _Running(StreamApp(settings, NullBackend()))
    second = None
    try:
        _send(settings, msgs)
        first.wait(lambda: first.app.stats.events == len(msgs), what="the first member")
        assert all(v is None for v in committed_offsets(settings).values())  # deferred: nothing committed yet
        second = _Running(StreamApp(settings, NullBackend()))  # joins: the first member's partitions are revoked
        first.wait(lambda: first.app.stats.commits_on_revoke >= 1, what="a commit on revoke")
        more = stream_messages(8, 2, run_id=uuid.uuid4().hex[:8])
        _send(settings, more)
        first.wait(lambda: first.app.stats.events + second.app.stats.events == len(msgs) + len(more),
                   what="the second round")
    finally:
        if second:
            second.stop()
        first.stop()
    out = read_events(settings, timeout_s=20)
    assert out.copies == 0, "a partition was re-read from an old offset after the rebalance"
    assert len(out.events) == len(msgs) + len(more)
    assert second.app.stats.events >= 1
    # Committed on close too: each partition up to its end; one that no conversation hashed to has nothing.
    inputs = read_all(settings, settings.kafka.input_topic, len(msgs) + len(more))
    ends = {p: max(r.offset for r in inputs if r.partition == p) + 1 for p in {r.partition for r in inputs}}
    assert committed_offsets(settings) == {p: ends.get(p) for p in range(settings.kafka.partitions)}


def test_redis_refusing_writes_pauses_the_stream_too(settings: Settings, own_redis: RedisProc) -> None:
    """Redis up but out of memory (`maxmemory` reached, `noeviction`): same as down, nothing lost."""
    settings = settings.with_overrides(redis={"url": own_redis.url}, batch={"micro_batch_size": 8, "max_wait_ms": 50},
                                       delivery={"redis_backoff_max_s": 0.5})
    admin = redis.Redis.from_url(own_redis.url)
    msgs = stream_messages(3, 4, run_id=uuid.uuid4().hex[:8])
    running = _Running(StreamApp(settings, NullBackend()))
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # every write is refused with OOM
        _send(settings, msgs)
        running.wait(lambda: running.app.stats.redis_outages >= 2, what="OOM to be noticed")
        assert running.app.stats.events == 0
        admin.config_set("maxmemory", 0)
        running.wait(lambda: running.app.stats.events == len(msgs), what="the stream to resume")
    finally:
        admin.close()
        running.stop()
    out = read_events(settings, timeout_s=20)
    assert len(out.events) == len(msgs) and out.copies == 0
    assert not any(e.window_degraded for e in out.events)
