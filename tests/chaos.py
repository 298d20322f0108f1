"""The chaos harness: replay many conversations through `erc-stream consume` processes while killing them.

One run (``run_chaos``):

1. starts a Redis of its own (so it can restart it) and one consumer process (null backend);
2. sends the messages at a steady rate from a thread, and meanwhile, each at a random moment, injects
   one fault after another: ``kill -9`` of the consumer and a restart (``kills`` times), then a second
   consumer joins and one of the two is killed, a third joins, and Redis is killed and restarted empty;
   before each fault it waits for the group to settle (every live member holds its share), because on
   tansu a group whose leader leaves during a pending rebalance can stick for good;
3. waits until every message is accounted for, stops the consumers one at a time (SIGTERM);
4. checks the output: every valid message has an event, no message has two different event ids,
   redelivered copies are counted, each conversation's events come in turn order with whole windows
   until Redis lost them (then ``window_degraded``), and the dead-letter topic holds exactly the
   malformed records that were sent, with their types.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaProducer

from core.readers import read_dead_letters, read_records
from core.records import EmotionEvent
from core.settings import Settings
from scoring.prompts import WindowShape
from tests.procs import ConsumerGroupProcs, RedisProc, stream_messages


@dataclass(frozen=True)
class ChaosPlan:
    conversations: int = 100
    turns: int = 50
    kills: int = 10  # kill -9 of a lone consumer, each followed by a restart
    pair_kill: bool = True  # two consumers, one killed; then a third joins
    redis_restart: bool = True
    malformed_every: int = 100  # one malformed record per this many messages
    rate: float = 40.0  # messages per second, sent steadily while the faults happen
    seed: int = 0
    settle_timeout_s: float = 60.0
    pause_s: tuple[float, float] = (0.3, 2.5)  # random wait before each fault
    burst: int = 300  # before a kill, this many messages are sent at once and the kill lands while they are processed
    kill_delay_s: tuple[float, float] = (0.03, 0.25)  # after the burst's acks (the consumer handles ~1,000 msg/s)
    join_after_pair: bool = True  # a third consumer joins after the pair kill


@dataclass
class ChaosReport:
    messages_in: int = 0
    valid_in: int = 0
    malformed_in: int = 0
    events_out: int = 0
    distinct_events: int = 0
    lost: int = 0
    redelivered_copies: int = 0
    distinct_duplicates: int = 0
    kills_survived: int = 0
    redis_restarts: int = 0
    dead_letters: int = 0
    dead_letter_copies: int = 0
    missing_dead_letters: int = 0
    unexpected_dead_letters: int = 0
    out_of_order: int = 0
    bad_windows: int = 0
    degraded_before_redis_restart: int = 0
    degraded: int = 0
    seconds: float = 0.0
    faults: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"messages in {self.messages_in} ({self.valid_in} valid in {self.conversations} conversations, "
            f"{self.malformed_in} malformed) | events out {self.events_out} | lost {self.lost} | "
            f"redelivered copies {self.redelivered_copies} | distinct duplicates {self.distinct_duplicates} | "
            f"kills survived {self.kills_survived} | redis restarts {self.redis_restarts} | "
            f"dead letters {self.dead_letters} (+{self.dead_letter_copies} copies; missing "
            f"{self.missing_dead_letters}, unexpected {self.unexpected_dead_letters}) | "
            f"out of turn order {self.out_of_order} | bad windows {self.bad_windows} | "
            f"degraded windows {self.degraded} (before the Redis restart: {self.degraded_before_redis_restart}) | "
            f"{self.seconds:.0f} s"
        )

    conversations: int = 0

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.distinct_duplicates == 0 and self.missing_dead_letters == 0
                and self.unexpected_dead_letters == 0 and self.out_of_order == 0 and self.bad_windows == 0
                and self.degraded_before_redis_restart == 0)


def _malformed(rng: random.Random, key: bytes) -> bytes:
    return rng.choice([
        b'{"message_id": "broken", "turn": ',
        json.dumps({"message_id": "x", "conversation_id": key.decode(), "turn": "7", "speaker": "s",
                    "text": "t", "sent_at": "2024-05-01T00:00:00Z"}).encode(),
        b"\xff\xfe not utf-8",
    ])


def run_chaos(settings: Settings, plan: ChaosPlan, workdir: Path, *, log=print) -> ChaosReport:
    started = time.monotonic()
    rng = random.Random(plan.seed)
    report = ChaosReport(conversations=plan.conversations)
    run = f"chaos-{uuid.uuid4().hex[:6]}"
    redis_server = RedisProc(_free_port(), workdir / "redis")
    redis_server.start()
    settings = settings.with_overrides(redis={"url": redis_server.url, "socket_timeout_s": 1.0},
                                       delivery={"redis_backoff_max_s": 1.0, "kafka_backoff_max_s": 2.0},
                                       store={"dir": workdir / "store"})
    valid = stream_messages(plan.conversations, plan.turns, run_id=run, seed=plan.seed)
    stream: list[tuple[bytes, bytes, bool]] = []  # (key, value, malformed)
    for i, m in enumerate(valid):
        stream.append((m.conversation_id.encode(), m.to_bytes(), False))
        if plan.malformed_every and i % plan.malformed_every == plan.malformed_every // 2:
            key = m.conversation_id.encode()
            stream.append((key, _malformed(rng, key), True))
    faults = ["kill"] * plan.kills + (["pair-kill"] if plan.pair_kill else []) + \
             (["join"] if plan.pair_kill and plan.join_after_pair else [])
    if plan.redis_restart:  # mid-stream, so that conversations are under way when Redis forgets them
        faults.insert(len(faults) // 2, "redis")

    producer = KafkaProducer(acks="all", linger_ms=5, **settings.kafka.client_options())
    futures: list = []  # (malformed, future)
    sender_error: list[BaseException] = []

    credit = [0]  # messages to send at once, ahead of the steady schedule (bursts)

    def send_all() -> None:
        try:
            t0 = time.monotonic()
            for i, (k, v, bad) in enumerate(stream):
                delay = t0 + (i - credit[0]) / plan.rate - time.monotonic()
                while delay > 0:
                    time.sleep(min(delay, 0.02))
                    delay = t0 + (i - credit[0]) / plan.rate - time.monotonic()
                futures.append((bad, producer.send(settings.kafka.input_topic, key=k, value=v)))
            producer.flush(60)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            sender_error.append(e)

    def burst() -> None:
        """Send the next ``plan.burst`` messages now and wait for their acks: the consumer is busy with them."""
        target = min(len(stream), len(futures) + plan.burst)
        credit[0] += plan.burst
        deadline = time.monotonic() + 30
        while len(futures) < target and time.monotonic() < deadline and sender.is_alive():
            time.sleep(0.005)
        if futures and len(futures) >= target:
            futures[target - 1][1].get(30)

    sender = threading.Thread(target=send_all, name="chaos-producer", daemon=True)
    placed: list[tuple[bool, int, int]] = []  # (malformed, partition, offset)
    cluster = ConsumerGroupProcs(settings, workdir / "consumers", settle_timeout_s=plan.settle_timeout_s)
    redis_restarted_at: datetime | None = None
    try:
        cluster.start("a")
        cluster.settle({})
        sender.start()
        for n, fault in enumerate(faults):
            time.sleep(rng.uniform(*plan.pause_s))  # a random moment in the stream
            marks = cluster.marks()
            if fault == "kill":
                victim = rng.choice(cluster.live())
                burst()
                time.sleep(rng.uniform(*plan.kill_delay_s))  # somewhere in the processing of the burst
                victim.kill9()
                report.kills_survived += 1
                victim.start()
                marks.pop(victim.name, None)
                cluster.settle(marks)
            elif fault == "pair-kill":
                cluster.start("b")
                cluster.settle(marks)
                time.sleep(rng.uniform(*plan.pause_s))
                marks = cluster.marks()
                victim = rng.choice(cluster.live())
                burst()
                time.sleep(rng.uniform(*plan.kill_delay_s))
                victim.kill9()
                report.kills_survived += 1
                marks.pop(victim.name, None)
                cluster.settle(marks)
            elif fault == "join":
                cluster.start("c")
                cluster.settle(marks)
            elif fault == "redis":
                redis_restarted_at = datetime.now(UTC)
                redis_server.restart()
                report.redis_restarts += 1
            report.faults.append(fault)
            log(f"chaos: fault {n + 1}/{len(faults)} ({fault}) done at {time.monotonic() - started:.0f} s, "
                f"{len(futures)}/{len(stream)} sent")
        log(f"chaos: faults done at {time.monotonic() - started:.0f} s")
        sender.join(600)
        if sender_error:
            raise sender_error[0]
        placed.extend((bad, md.partition, md.offset) for bad, md in ((b, f.get(30)) for b, f in futures))

        # Drain: every valid message has an event and every malformed record a dead letter.
        want = {m.message_id for m in valid}
        n_bad = sum(1 for bad, _, _ in placed if bad)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            have = {EmotionEvent.from_bytes(r.value).message_id for r in read_records(settings, settings.kafka.output_topic)}
            letters, _ = read_dead_letters(settings)
            if have >= want and len(letters) >= n_bad:
                break
            if not cluster.live():
                raise RuntimeError("no consumer left running")
            time.sleep(0.5)
        log(f"chaos: drained at {time.monotonic() - started:.0f} s")
        # Leave one at a time, letting the group settle in between.
        live = cluster.live()
        for m in live[:-1]:
            marks = cluster.marks()
            assert m.terminate() == 0, m.tail()
            marks.pop(m.name, None)
            cluster.settle(marks)
        assert live[-1].terminate() == 0, live[-1].tail()
    finally:
        producer.close(5)
        cluster.kill_all()
        redis_server.stop()

    # -- the checks --------------------------------------------------------------------------
    report.valid_in = len(valid)
    report.malformed_in = sum(1 for bad, _, _ in placed if bad)
    report.messages_in = len(placed)
    records = list(read_records(settings, settings.kafka.output_topic))
    report.events_out = len(records)
    inputs = {m.message_id: m for m in valid}
    ids_per_message: dict[str, set[str]] = defaultdict(set)
    messages_per_id: dict[str, set[str]] = defaultdict(set)
    first: dict[str, EmotionEvent] = {}
    order: dict[str, list[int]] = defaultdict(list)  # conversation -> turns of first copies, in log order
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        e = EmotionEvent.from_bytes(r.value)
        ids_per_message[e.message_id].add(e.event_id)
        messages_per_id[e.event_id].add(e.message_id)
        if e.event_id not in first:
            first[e.event_id] = e
            order[e.conversation_id].append(e.turn)
    report.distinct_events = len(first)
    report.redelivered_copies = len(records) - len(first)
    report.lost = sum(1 for mid in inputs if mid not in ids_per_message)
    report.distinct_duplicates = (sum(1 for ids in ids_per_message.values() if len(ids) > 1)
                                  + sum(1 for ms in messages_per_id.values() if len(ms) > 1)
                                  + sum(1 for mid in ids_per_message if mid not in inputs))
    report.out_of_order = sum(1 for turns in order.values() if turns != sorted(turns) or len(set(turns)) != len(turns))
    shape = WindowShape(settings.window.size, settings.window.hop)
    for e in first.values():
        report.degraded += e.window_degraded
        if e.window_degraded:
            if redis_restarted_at is None or e.emitted_at < redis_restarted_at:
                report.degraded_before_redis_restart += 1
        elif e.window != e.turn - shape.first(e.turn) + 1:  # every turn of its window (no token budget cut)
            report.bad_windows += 1

    letters, report.dead_letter_copies = read_dead_letters(settings)
    report.dead_letters = len(letters)
    expected = {(p, o) for bad, p, o in placed if bad}
    got = {(d.source_partition, d.source_offset) for d in letters}
    report.missing_dead_letters = len(expected - got)
    report.unexpected_dead_letters = len(got - expected)
    report.seconds = time.monotonic() - started
    return report


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()
