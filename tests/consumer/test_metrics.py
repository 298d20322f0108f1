"""The metrics endpoint on a running consumer (real broker, real Redis), its probes, and its log lines."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from consumer.app import StreamApp
from consumer.delivery import make_emitter
from core.settings import Settings
from scoring.backends.base import ScoreRequest
from scoring.backends.null import NullBackend
from tests.app_threads import FailOnce
from tests.conftest import free_port
from tests.kafka_helpers import produce_raw
from tests.procs import ConsumerProc, RedisProc, stream_messages


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(base + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class _SlowBackend(NullBackend):
    """The null backend, 0.15 s a batch: records pile up on the partitions, so the lag is seen. It counts
    tokens as a prefix-caching backend would: every prompt token asked for, a third of them computed."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        time.sleep(0.15)
        prompt = sum(self.count_tokens(r.prompt) for r in requests)
        self.tokens.add(prompt_tokens=prompt, computed=prompt // 3)
        return super().score(requests)


def _start(app: StreamApp) -> threading.Thread:
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    return thread


def _wait(cond, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_endpoint_serves_the_stream_metrics_and_probes(settings: Settings) -> None:
    settings = settings.with_overrides(batch={"micro_batch_size": 4, "max_wait_ms": 0},
                                       metrics={"host": "127.0.0.1", "port": 0, "lag_interval_s": 0.05})
    msgs = stream_messages(6, 10, run_id=uuid.uuid4().hex[:8])
    bad = [(b"k", b'{"message_id": "x", '), (b"k", b'{"message_id": "x"}')]  # invalid JSON, schema
    produce_raw(settings, settings.kafka.input_topic,
                [(m.conversation_id.encode(), m.to_bytes()) for m in msgs] + bad)
    total = len(msgs) + len(bad)

    backend = _SlowBackend()
    app = StreamApp(settings, backend, emitter=FailOnce(make_emitter(settings)))
    server = app.serve_metrics()
    base = server.url
    assert _get(base + "/readyz")[0] == 503  # no partitions yet
    thread = _start(app)
    try:
        _wait(lambda: _get(base + "/readyz")[0] == 200, what="readiness")
        status, body = _get(base + "/readyz")
        assert json.loads(body) == {"ready": True, "partitions": 4, "redis": "ok", "down": []}
        # 62 records at 4 a batch, 0.15 s each: while they are worked off, the lag shows them.
        lags: list[float] = []
        _wait(lambda: lags.append(sum(v for (n, _), v in _samples(base).items() if n == "erc_consumer_lag"))
              or lags[-1] > 0, timeout_s=20, what="a non-zero lag")
        assert 0 < lags[-1] <= total
        _wait(lambda: app.stats.consumed >= total, what="the input")
        _wait(lambda: sum(v for (n, _), v in _samples(base).items() if n == "erc_consumer_lag") == 0,
              timeout_s=10, what="lag 0")
        s = _samples(base)
        assert _get(base + "/healthz")[0] == 200
    finally:
        app.stop()
        thread.join(30)

    assert _value(s, "erc_messages_consumed_total") == total
    assert _value(s, "erc_events_emitted_total") == len(msgs)
    assert _value(s, "erc_dead_letters_total", reason="invalid_json") == 1
    assert _value(s, "erc_dead_letters_total", reason="schema") == 1
    assert _value(s, "erc_stream_batch_records_sum") == total and _value(s, "erc_stream_batch_records_count") == app.stats.batches
    assert _value(s, "erc_inference_seconds_count") >= app.stats.batches - 1  # a batch of bad records only: none
    assert _value(s, "erc_inference_seconds_sum") >= 0.15 * _value(s, "erc_inference_seconds_count")
    assert _value(s, "erc_end_to_end_latency_seconds_count") == len(msgs)
    assert _value(s, "erc_prompt_tokens_total") == backend.tokens.prompt_tokens > 0
    assert _value(s, "erc_computed_tokens_total") == backend.tokens.computed > 0
    assert _value(s, "erc_end_to_end_latency_seconds_sum") > 0
    # Poll to ack: every event, each at least its batch's scoring (0.15 s); sent_at to ack is longer still.
    assert _value(s, "erc_processing_latency_seconds_count") == len(msgs)
    assert _value(s, "erc_processing_latency_seconds_sum") >= 0.15 * len(msgs)
    assert _value(s, "erc_end_to_end_latency_seconds_sum") >= _value(s, "erc_processing_latency_seconds_sum")
    assert _value(s, "erc_clock_skew_total") == 0
    assert _value(s, "erc_adapter_info", backend="_SlowBackend", model="null", adapter="none", version="none", label_set="meld") == 1
    assert {labels for (n, labels) in s if n == "erc_consumer_lag"} == {
        (("partition", str(p)), ("topic", settings.kafka.input_topic)) for p in range(4)}
    # The injected failure after the first batch's send: one broker error, one rewind.
    assert _value(s, "erc_broker_errors_total") == 1 and _value(s, "erc_rewinds_total") == 1
    assert _value(s, "erc_assigned_partitions") == 4
    assert time.time() - _value(s, "erc_loop_heartbeat_timestamp_seconds") < 30
    # The endpoint closes with the app.
    try:
        urllib.request.urlopen(base + "/healthz", timeout=2)
        raise AssertionError("the endpoint still answers after close")
    except (urllib.error.URLError, ConnectionError):
        pass


def test_readiness_and_redis_errors_follow_redis(settings: Settings, tmp_path: Path) -> None:
    redis_proc = RedisProc(free_port(), tmp_path / "redis")
    redis_proc.start()
    settings = settings.with_overrides(redis={"url": redis_proc.url}, batch={"micro_batch_size": 4, "max_wait_ms": 0},
                                       metrics={"host": "127.0.0.1", "port": 0},
                                       delivery={"redis_backoff_max_s": 0.5})
    app = StreamApp(settings, NullBackend())
    base = app.serve_metrics().url
    thread = _start(app)
    try:
        _wait(lambda: _get(base + "/readyz")[0] == 200, what="readiness")
        redis_proc.kill()
        status, body = _get(base + "/readyz")
        assert status == 503 and "ConnectionError" in json.loads(body)["redis"]
        msgs = stream_messages(2, 3, run_id=uuid.uuid4().hex[:8])
        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])
        _wait(lambda: _value(_samples(base), "erc_redis_errors_total", operation="window") >= 1, what="a redis error")
        assert _get(base + "/healthz")[0] == 200  # paused for Redis is alive, not wedged
        redis_proc.start()
        _wait(lambda: app.stats.events >= len(msgs), what="the events after Redis came back")
        assert _get(base + "/readyz")[0] == 200
    finally:
        app.stop()
        thread.join(30)
        redis_proc.stop()


def test_liveness_fails_when_the_loop_stops_beating(settings: Settings) -> None:
    settings = settings.with_overrides(metrics={"host": "127.0.0.1", "port": 0, "liveness_timeout_s": 0.3})
    app = StreamApp(settings, NullBackend())
    server = app.serve_metrics()
    try:
        app.metrics.beat()
        assert _get(server.url + "/healthz")[0] == 200
        time.sleep(0.5)  # the loop is not running: no beat
        status, body = _get(server.url + "/healthz")
        assert status == 503 and json.loads(body)["alive"] is False
    finally:
        app.close()


def test_json_logs_carry_ids_and_no_texts_unless_configured(settings: Settings, tmp_path: Path) -> None:
    marker = f"secret-{uuid.uuid4().hex[:8]}"
    msgs = stream_messages(2, 3, run_id=uuid.uuid4().hex[:8])
    msgs = [m.model_copy(update={"text": f"{marker} {m.text}"}) for m in msgs]
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])
    proc = ConsumerProc(settings, tmp_path, "quiet", ERC_LOG_LEVEL="DEBUG")
    proc.start()
    try:
        _wait(lambda: proc.count("event") >= len(msgs) or not proc.alive, what="event log lines")
        metrics_line = next(line for line in proc.lines() if line.get("event") == "metrics endpoint")
        status, body = _get(metrics_line["url"] + "/metrics")
        assert status == 200 and b"erc_events_emitted_total 6.0" in body
    finally:
        assert proc.terminate() == 0
    events = [line for line in proc.lines() if line.get("event") == "event"]
    assert {(e["conversation_id"], e["message_id"]) for e in events} == {(m.conversation_id, m.message_id)
                                                                        for m in msgs}
    assert marker not in proc.log_path.read_text()

    # The same, with texts allowed in the logs (a fresh group re-reads the topic).
    loud = ConsumerProc(settings.with_overrides(kafka={"group_id": settings.kafka.group_id + "-loud"}), tmp_path,
                        "loud", ERC_LOG_LEVEL="DEBUG", ERC_LOG_TEXTS="true")
    loud.start()
    try:
        _wait(lambda: loud.count("event") >= len(msgs) or not loud.alive, what="event log lines")
    finally:
        loud.terminate()
    assert sum(marker in line.get("text", "") for line in loud.lines() if line.get("event") == "event") == len(msgs)


def test_a_taken_metrics_port_stops_the_consumer_with_a_clear_message(settings: Settings, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ConsumerProc(settings, tmp_path, "clash", ERC_METRICS__PORT=str(port), ERC_METRICS__HOST="127.0.0.1")
        proc.start()
        assert proc.proc.wait(60) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.tail() and "ERC_METRICS__PORT" in proc.tail()


def test_metrics_with_a_token_refuse_requests_without_it() -> None:
    from consumer.metrics import ConsumerMetrics
    from core.http_endpoint import start_http_server

    server = start_http_server(ConsumerMetrics(), host="127.0.0.1", port=0, liveness_timeout_s=60,
                               ready=lambda: (True, {}), token="s3cret")
    try:
        url = server.url + "/metrics"
        assert _get(url)[0] == 401
        for wrong in ("Bearer nope", "s3cret", "Basic s3cret", "Bearer s3cret-and-more"):
            assert _get(url, {"Authorization": wrong})[0] == 401, wrong
        status, body = _get(url, {"Authorization": "Bearer s3cret"})
        assert status == 200 and b"erc_messages_consumed_total" in body
        assert _get(server.url + "/healthz")[0] == 200  # probes stay open
    finally:
        server.close()


def test_the_documented_default_binds_to_loopback() -> None:
    assert Settings().metrics.host == "127.0.0.1" and Settings().dashboard.host == "127.0.0.1"
    assert Settings().metrics.token is None and Settings().dashboard.auth is True
