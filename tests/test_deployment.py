"""docker-compose.yml and deploy/: what they name must exist — settings, CLI commands, build arguments, topics.

No container engine runs here. `docker compose config` runs when docker's compose plugin is installed
(as in CI with docker); otherwise the file is checked in Python: its structure, profiles, healthchecks and
volumes, every ERC_* variable against the settings object (names and values), every command against the CLI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core.settings import KafkaSettings, Settings
from erc_stream.cli import main
from erc_stream.settings_doc import env_names

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: object) -> object:
    """Compose's interpolation with an empty environment: ${X:-default} -> default, ${X} -> '', $$ -> $."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()))  # safe_load resolves the << merge keys


def _services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed here (CI with docker runs this; the other tests check the file)")
    for profiles in ([], ["--profile", "gpu", "--profile", "sim", "--profile", "bi"], ["--profile", "cpu"]):
        result = subprocess.run([docker, "compose", "-f", str(COMPOSE), *profiles, "config", "--quiet"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr


def test_services_profiles_healthchecks_and_volumes(compose: dict) -> None:
    services = _services(compose)
    assert set(services) == {"kafka", "redis", "topics", "consumer-gpu", "consumer-cpu", "producer-sim", "exporter",
                             "prometheus"}
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert profiles == {"kafka": (), "redis": (), "topics": (), "prometheus": (), "consumer-gpu": ("gpu",),
                        "consumer-cpu": ("cpu",), "producer-sim": ("sim",), "exporter": ("bi",)}
    for name in ("kafka", "redis", "consumer-gpu", "consumer-cpu", "prometheus"):  # long-running: healthchecked
        assert services[name]["healthcheck"]["test"], name
    named = set(compose["volumes"])
    assert named == {"kafka-data", "redis-data", "erc-store", "prometheus-data"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in named or source.startswith("./"), (name, volume)
            if source.startswith("./") and source != "./exports":
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"

    # Apache Kafka, official image, KRaft with one node that is broker and controller.
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller" and env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "kafka-data:/var/lib/kafka/data" in kafka["volumes"]
    # Redis with AOF persistence on a volume.
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes" and "redis-data:/data" in services["redis"]["volumes"]
    # The GPU consumer gets a GPU and the vLLM backend; the CPU one the transformers backend.
    gpu, cpu = services["consumer-gpu"], services["consumer-cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["ERC_MODEL__BACKEND"] == "vllm" and gpu["environment"]["ERC_MODEL__DEVICE"] == "cuda"
    assert cpu["environment"]["ERC_MODEL__BACKEND"] == "hf" and "deploy" not in cpu
    for consumer in (gpu, cpu):
        assert consumer["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert consumer["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "consumer" in consumer["networks"]["default"]["aliases"]


def test_every_erc_variable_exists_in_the_settings_and_its_value_validates(compose: dict,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    known = env_names()
    for name, service in _services(compose).items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith("ERC_")}
        unknown = sorted(set(env) - known)
        assert not unknown, f"{name} sets variables the settings do not have: {unknown}"
        for key in [k for k in os.environ if k.startswith("ERC_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # raises on a value the settings refuse (e.g. a backend that does not exist)
        if name.startswith("consumer"):
            assert settings.model.backend == env["ERC_MODEL__BACKEND"]
            assert settings.metrics.port == 9400


def test_prometheus_scrapes_the_consumer_metrics_port(compose: dict) -> None:
    services = _services(compose)
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "consumer:9400" in targets
    for name in ("consumer-gpu", "consumer-cpu"):
        assert services[name]["environment"]["ERC_METRICS__PORT"] == "9400"
        assert "9400/healthz" in " ".join(services[name]["healthcheck"]["test"])
    rules = yaml.safe_load((ROOT / "deploy" / "alerts.rules.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    from consumer.metrics import ConsumerMetrics

    exported = {m.name for m in ConsumerMetrics().registry.collect()}
    used = set(re.findall(r"\b(erc_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\b", exprs))
    assert used and used <= exported, used - exported


def test_images_commands_and_build_arguments_match_the_project(compose: dict) -> None:
    services = _services(compose)
    dockerfile = (ROOT / "Dockerfile").read_text()
    declared_args = set(re.findall(r"^ARG (\w+)", dockerfile, re.M))
    pyproject = (ROOT / "pyproject.toml").read_text()
    commands = set(main.commands)
    for name, service in services.items():
        if "build" not in service:
            continue
        build = service["build"]
        args = build.get("args", {}) if isinstance(build, dict) else {}
        assert set(args) <= declared_args, (name, set(args) - declared_args)
        if args.get("EXTRAS"):
            assert re.search(rf"^{args['EXTRAS']} = \[", pyproject, re.M), f"extra {args['EXTRAS']!r} not in pyproject"
        assert service["image"].startswith("erc-stream:"), name
        # The image's entrypoint is the CLI: the command must be one of its subcommands, with options it takes.
        command = service.get("command", ["consume"])
        assert command[0] in commands, (name, command)
        options = {o for p in main.commands[command[0]].params for o in p.opts}
        assert {c for c in command[1:] if c.startswith("--")} <= options, (name, command)
    assert 'ENTRYPOINT ["erc-stream"]' in dockerfile and "EXPOSE 9400" in dockerfile
    # The topics job creates the four topics the settings name.
    script = services["topics"]["command"][0]
    env = services["topics"]["environment"]
    created = {env[v] for v in re.findall(r"\$(ERC_KAFKA__\w+_TOPIC)", script)}
    k = KafkaSettings()
    assert created == {k.input_topic, k.output_topic, k.dlq_topic, k.alerts_topic}
