"""A part every message needs goes down for 30 s in the middle of a stream: the model backend, then the output
topics. Nobody's message is to blame, so nothing may be dead-lettered: the consumer pauses, answers not ready,
probes with backoff and resumes, and every message gets exactly one event (one distinct event id) afterwards.

The opposite case — a backend that fails one message and still answers a probe — dead-letters that message only
(tests/consumer/test_failures.py)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence

from kafka.errors import KafkaTimeoutError

from consumer.app import StreamApp
from consumer.delivery import AtLeastOnce
from core.readers import read_dead_letters, read_events
from core.records import ChatMessage
from core.settings import Settings
from scoring.backends.base import ScoreRequest
from scoring.backends.null import NullBackend
from tests.app_threads import start
from tests.kafka_helpers import produce_raw
from tests.procs import stream_messages

OUTAGE_S = 30.0


class _DeadEngine(NullBackend):
    """Every call fails while the outage lasts, the probe's too: an engine that died, then came back."""

    def __init__(self) -> None:
        super().__init__()
        self.down_until = 0.0
        self.failed_calls = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        if time.monotonic() < self.down_until:
            self.failed_calls += 1
            raise RuntimeError("EngineDeadError: EngineCore encountered an issue")
        return super().score(requests)


class _UnwritableOutput:
    """The emitter's real producer, except that while the outage lasts every send times out, as it does when the
    output topic has no leader or the broker is unreachable."""

    def __init__(self, real) -> None:
        self.real = real
        self.down_until = 0.0
        self.refused = 0

    def send(self, *args, **kwargs):
        if time.monotonic() < self.down_until:
            self.refused += 1
            raise KafkaTimeoutError("Failed to update metadata after 30.0 secs.")
        return self.real.send(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def _ready(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _send(settings: Settings, msgs: Sequence[ChatMessage]) -> None:
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])


def _through_an_outage(settings: Settings, app: StreamApp, part: str, begin: Callable[[float], None]) -> None:
    """A third of the stream, then the part down for OUTAGE_S with the second third arriving, then the rest."""
    msgs = stream_messages(6, 9, run_id=uuid.uuid4().hex[:8])
    thirds = [msgs[:18], msgs[18:36], msgs[36:]]
    url = app.serve_metrics().url
    thread, errors = start(app)
    try:
        _send(settings, thirds[0])
        _wait(lambda: app.stats.events == 18 and _ready(url)[0] == 200, 60, "the first third, ready")

        outage_ends = time.monotonic() + OUTAGE_S
        begin(outage_ends)
        _send(settings, thirds[1])
        _wait(lambda: _ready(url)[0] == 503, 30, "not ready during the outage")
        status, body = _ready(url)
        assert body["down"] == [part], body
        assert app.metrics.value("erc_part_down", {"part": part}) == 1
        while time.monotonic() < outage_ends - 1:  # through the outage: nothing dead-lettered, member alive
            assert thread.is_alive(), errors
            assert app.stats.dead_letters == 0, app.stats.dead_by_type
            time.sleep(1)

        _send(settings, thirds[2])
        _wait(lambda: app.stats.events >= len(msgs), 90, "every message after the outage")
        _wait(lambda: _ready(url)[0] == 200, 30, "ready again")
        assert app.metrics.value("erc_part_down", {"part": part}) == 0
        assert app.stats.outages[part] == 1 and app.stats.dead_letters == 0
    finally:
        app.stop()
        thread.join(30)
    assert not errors, errors

    out = read_events(settings, timeout_s=20)
    assert sorted(e.message_id for e in out.events) == sorted(m.message_id for m in msgs)
    assert len({e.event_id for e in out.events}) == len(msgs)
    letters, _ = read_dead_letters(settings, timeout_s=5)
    assert letters == []


def _settings(settings: Settings) -> Settings:
    return settings.with_overrides(
        batch={"micro_batch_size": 8, "max_wait_ms": 100}, metrics={"port": 0},
        delivery={"backend_backoff_max_s": 2.0, "kafka_backoff_max_s": 2.0},
        # shorter than the outage: the member stays in its group only because it keeps polling while paused
        kafka={"max_poll_interval_ms": 10_000},
    )


def test_a_backend_down_for_30_s_pauses_the_stream_and_dead_letters_nothing(settings: Settings) -> None:
    settings = _settings(settings)
    backend = _DeadEngine()

    def begin(until: float) -> None:
        backend.down_until = until

    _through_an_outage(settings, StreamApp(settings, backend), "backend", begin)
    assert backend.failed_calls > 3  # the batch, an item alone, the probe, then the probes with backoff


def test_an_unwritable_output_for_30_s_pauses_the_stream_and_loses_nothing(settings: Settings) -> None:
    settings = _settings(settings)
    emitter = AtLeastOnce(settings)
    output = emitter.producer = _UnwritableOutput(emitter.producer)

    def begin(until: float) -> None:
        output.down_until = until

    _through_an_outage(settings, StreamApp(settings, NullBackend(), emitter=emitter), "output", begin)
    assert output.refused > 1  # the batch was tried again during the outage (with backoff)


def test_a_backend_that_never_comes_back_makes_the_worker_exit_with_nothing_committed(settings: Settings) -> None:
    """An in-process engine that died does not recover: after ``delivery.backend_down_exit_s`` the worker exits
    (``erc-stream consume``: code 4) for its orchestrator to restart it; the paused batch was never committed."""
    from consumer.app import BackendGone
    from tests.kafka_helpers import committed_offsets

    settings = _settings(settings).with_overrides(delivery={"backend_down_exit_s": 3.0})
    backend = _DeadEngine()
    backend.down_until = float("inf")
    msgs = stream_messages(2, 3, run_id=uuid.uuid4().hex[:8])
    _send(settings, msgs)
    app = StreamApp(settings, backend)
    began = time.monotonic()
    thread, errors = start(app)
    thread.join(60)
    assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], BackendGone), errors
    assert 3.0 <= time.monotonic() - began < 30
    assert app.stats.dead_letters == 0 and app.stats.events == 0
    assert all(offset is None for offset in committed_offsets(settings).values())
