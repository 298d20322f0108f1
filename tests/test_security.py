"""Security basics: SASL/TLS settings reach the Kafka and Redis clients, secrets are SecretStr and never
logged, size limits are settings."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import redis
from kafka import KafkaConsumer, KafkaProducer
from pydantic import SecretStr

from core.readers import read_events
from core.settings import KafkaSettings, RedisSettings, Settings
from tests.conftest import free_port
from tests.kafka_helpers import produce_raw
from tests.procs import ConsumerProc, RedisProc, stream_messages

KAFKA_SECRET = "kafka-pw-" + uuid.uuid4().hex
REDIS_SECRET = "redis-pw-" + uuid.uuid4().hex
KEY_SECRET = "key-pw-" + uuid.uuid4().hex


def _secured() -> Settings:
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers="kafka-1:9093,kafka-2:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
            sasl_username="erc", sasl_password=KAFKA_SECRET, ssl_cafile="/etc/ca.pem", ssl_certfile="/etc/client.pem",
            ssl_keyfile="/etc/client.key", ssl_password=KEY_SECRET,
        ),
        redis=RedisSettings(url="rediss://redis.internal:6380/2", username="erc", password=REDIS_SECRET,
                            ssl_ca_certs="/etc/ca.pem"),
    )


def test_secrets_are_secret_str_and_never_printed() -> None:
    s = _secured()
    assert isinstance(s.kafka.sasl_password, SecretStr) and isinstance(s.kafka.ssl_password, SecretStr)
    assert isinstance(s.redis.password, SecretStr) and isinstance(s.redis.url, SecretStr)
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump())):
        for secret in (KAFKA_SECRET, REDIS_SECRET, KEY_SECRET):
            assert secret not in text


def test_sasl_and_tls_settings_reach_the_kafka_clients() -> None:
    opts = _secured().kafka.client_options()
    assert opts["bootstrap_servers"] == ["kafka-1:9093", "kafka-2:9093"]
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "erc" and opts["sasl_plain_password"] == KAFKA_SECRET
    assert opts["ssl_cafile"] == "/etc/ca.pem" and opts["ssl_certfile"] == "/etc/client.pem"
    assert opts["ssl_keyfile"] == "/etc/client.key" and opts["ssl_password"] == KEY_SECRET
    assert opts["ssl_check_hostname"] is True
    # Every option is one kafka-python's consumer and producer know.
    for name in opts:
        assert name in KafkaConsumer.DEFAULT_CONFIG and name in KafkaProducer.DEFAULT_CONFIG, name


def test_tls_and_auth_settings_reach_the_redis_client() -> None:
    s = _secured()
    client = redis.Redis.from_url(s.redis.url.get_secret_value(), **s.redis.client_options())  # connects lazily
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["password"] == REDIS_SECRET and kwargs["username"] == "erc"
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem" and kwargs["ssl_cert_reqs"] == "required"
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    client.close()


def test_size_limits_are_settings() -> None:
    s = Settings()
    assert s.kafka.max_message_bytes == 1_048_576
    assert s.kafka.dlq_max_original_bytes <= s.kafka.max_message_bytes
    assert s.window.max_turn_tokens <= s.model.max_prompt_tokens
    assert s.window.max_turn_chars > 0 and s.conversation.retain_turns >= s.window.size


def test_a_consumer_authenticates_to_redis_and_logs_no_secret(settings: Settings, tmp_path: Path) -> None:
    server = RedisProc(free_port(), tmp_path / "redis", password=REDIS_SECRET)
    server.start()
    try:
        settings = settings.with_overrides(
            redis={"url": server.url, "password": REDIS_SECRET},  # the password is not in the URL
            kafka={"sasl_password": KAFKA_SECRET},  # unused on a PLAINTEXT broker, and must not be logged either
            store={"dir": tmp_path / "store"},
        )
        msgs = stream_messages(2, 3, run_id=uuid.uuid4().hex[:6])
        produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in msgs])
        consumer = ConsumerProc(settings, tmp_path / "consumers", "auth", ERC_LOG_LEVEL="DEBUG",
                                ERC_KAFKA__SASL_PASSWORD=KAFKA_SECRET)
        consumer.start()
        try:
            deadline = time.monotonic() + 60
            while len(read_events(settings, timeout_s=5).events) < len(msgs):
                assert consumer.alive, consumer.tail()
                assert time.monotonic() < deadline, consumer.tail()
                time.sleep(0.5)
        finally:
            assert consumer.terminate() == 0
        log = consumer.log_path.read_text()
        assert "consumer running" in log
        assert REDIS_SECRET not in log and KAFKA_SECRET not in log
        # Without the password the same Redis refuses the consumer (the setting really is what authenticates).
        anonymous = redis.Redis.from_url(server.url, socket_timeout=2)
        try:
            anonymous.ping()
            raise AssertionError("redis accepted a client without the password")
        except redis.AuthenticationError:
            pass
        finally:
            anonymous.close()
    finally:
        server.stop()
