"""deploy/kubernetes: what the manifests name must exist and hold together — settings, the CLI, the image's user
and paths, the scaler's group and topic — and every pod is locked down (non-root, read-only root file system,
no privilege escalation, secrets only from the Secret). Rendered with kustomize (kubectl) as deploy/
validate_kubernetes.py renders them for its schema check, which `.ci/run` runs."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest

from core.settings import Settings
from erc_stream.cli import main
from erc_stream.settings_doc import env_names

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("validate_kubernetes", ROOT / "deploy" / "validate_kubernetes.py")
assert _spec and _spec.loader
vk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vk)

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None and not os.environ.get("CI"),
                                reason="kubectl (kustomize) is not installed; CI installs it")
#: Environment variable names that carry secrets: they must come from the Secret, never a literal value.
SECRET_NAMES = re.compile(r"TOKEN|PASSWORD|TARGETS")


@pytest.fixture(scope="module", params=vk.VARIANTS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[tuple[str, str], dict]]:
    return request.param, {(o["kind"], o["metadata"]["name"]): o for o in vk.render(request.param)}


def _pods(objects: dict) -> dict[str, dict]:
    return {name: o["spec"]["template"]["spec"] for (kind, name), o in objects.items() if kind == "Deployment"}


def test_every_pod_runs_locked_down(rendered) -> None:
    _, objects = rendered
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert uid, "the Dockerfile's USER must be numeric (runAsNonRoot can only check a numeric user)"
    for name, pod in _pods(objects).items():
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == uid.group(1), name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            c = container["securityContext"]
            assert c["readOnlyRootFilesystem"] is True and c["allowPrivilegeEscalation"] is False, name
            assert c["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: a read-only root needs /tmp mounted"


def test_commands_and_variables_exist_and_secrets_come_from_the_secret(rendered, monkeypatch) -> None:
    _, objects = rendered
    known = env_names()
    config = objects[("ConfigMap", "erc-stream")]["data"]
    assert set(config) <= known
    for name, pod in _pods(objects).items():
        for container in pod["containers"]:
            command = container["args"]
            assert command[0] in main.commands, (name, command)
            options = {o for p in main.commands[command[0]].params for o in p.opts}
            assert {c for c in command[1:] if c.startswith("--")} <= options, (name, command)
            env = container.get("env", [])
            assert {e["name"] for e in env} - {"ERC_HEALTHCHECK_URL"} <= known, name
            for e in env:
                if SECRET_NAMES.search(e["name"]):
                    assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "erc-stream", (name, e)
            # The literal values, with the ConfigMap's, are what the settings accept.
            for key in [k for k in os.environ if k.startswith("ERC_")]:
                monkeypatch.delenv(key)
            for key, value in {**config, **{e["name"]: e["value"] for e in env if "value" in e}}.items():
                monkeypatch.setenv(key, value)
            Settings()


def test_the_consumer_is_probed_drains_and_is_scraped(rendered) -> None:
    variant, objects = rendered
    consumer = objects[("Deployment", "erc-consumer")]["spec"]["template"]["spec"]
    container = consumer["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports["metrics"] == int(env["ERC_METRICS__PORT"]) and env["ERC_METRICS__HOST"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # A stopping consumer finishes its batch (at most batch.max_wait_s to fill it, then scoring) and commits
    # before the kubelet kills it.
    assert consumer["terminationGracePeriodSeconds"] >= 30
    service = objects[("Service", "erc-consumer-metrics")]
    assert service["spec"]["selector"] == objects[("Deployment", "erc-consumer")]["spec"]["selector"]["matchLabels"]
    monitor = objects[("ServiceMonitor", "erc-stream")]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"]["key"] == "metrics-token"
    if variant == "gpu":
        assert env["ERC_MODEL__BACKEND"] == "vllm" and env["ERC_MODEL__DEVICE"] == "cuda"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith("-gpu")
        for name, pod in _pods(objects).items():  # the others keep the CPU image
            if name != "erc-consumer":
                assert not pod["containers"][0]["image"].endswith("-gpu"), name
    else:
        assert env["ERC_MODEL__BACKEND"] == "hf" and "nvidia.com/gpu" not in container["resources"]["requests"]
    store = next(v for v in consumer["volumes"] if v["name"] == "store")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "store")
    assert mount["mountPath"] == "/var/lib/erc-stream/store" in (ROOT / "Dockerfile").read_text()
    if variant == "shared-store":
        claim = objects[("PersistentVolumeClaim", store["persistentVolumeClaim"]["claimName"])]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_lag_autoscaling_targets_the_consumer_group(rendered) -> None:
    _, objects = rendered
    scaled = objects[("ScaledObject", "erc-consumer")]["spec"]
    config = objects[("ConfigMap", "erc-stream")]["data"]
    assert scaled["scaleTargetRef"]["name"] == "erc-consumer"
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == config["ERC_KAFKA__BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == config["ERC_KAFKA__GROUP_ID"]
    assert meta["topic"] == config["ERC_KAFKA__INPUT_TOPIC"]
    # Never more members than partitions (an idle member only adds rebalances): as many as compose creates.
    assert meta["allowIdleConsumers"] == "false"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= Settings().kafka.partitions
    assert int(meta["lagThreshold"]) > 0


def test_the_single_writers_stay_single(rendered) -> None:
    _, objects = rendered
    for name in ("erc-dashboard", "erc-notifier", "erc-exporter"):
        assert objects[("Deployment", name)]["spec"]["replicas"] == 1, name
    for name in ("erc-notifier", "erc-exporter"):  # never two at once, not even during a rollout
        assert objects[("Deployment", name)]["spec"]["strategy"]["type"] == "Recreate", name


def test_the_schema_check_catches_an_unknown_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = next(o for o in vk.render("base") if o["kind"] == "Deployment")
    kubernetes_validate.validate(deployment, "1.32", strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.32", strict=True)
