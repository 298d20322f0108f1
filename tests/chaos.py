"""The chaos harness: replay many conversations through `erc-stream consume` processes while killing them.

One run (``run_chaos``):

1. starts a Redis of its own (so it can restart it) and one consumer process (null backend);
2. sends the messages at a steady rate from a thread, and meanwhile, each at a random moment, injects
   one fault after another: ``kill -9`` of the consumer and a restart (``kills`` times), then a second
   consumer joins and one of the two is killed (the other takes its partitions over) and restarted, a third
   joins, and Redis is killed and restarted empty; before each fault it waits for the group to settle (every
   live member holds its share), because on tansu a group whose leader leaves during a pending rebalance can
   stick for good;
3. after each restart, measures whether the killed consumer came back: its new run answered ready on
   ``/readyz`` and delivered messages of its own (its ``erc_messages_consumed_total`` above 0; the counters
   start at 0 with the process). Input for that is held back from the steady schedule (a reserve per kill,
   also feeding each kill's burst), so a kill late in the run still finds messages to process;
4. waits until every message is accounted for, stops the consumers one at a time (SIGTERM);
5. checks the output: every valid message has an event, no message has two different event ids,
   redelivered copies are counted, each conversation's events come in turn order with whole windows
   until Redis lost them (then ``window_degraded``), and the dead-letter topic holds exactly the
   malformed records that were sent, with their types.

A kill counts as survived only when its consumer came back (3) and the run ended with nothing lost (5: every
valid message has exactly one distinct event id, copies of it allowed, and every malformed record its dead
letter): ``ChaosReport.kills_survived`` is measured, never counted as the kills are made.
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
from kafka.producer.future import FutureRecordMetadata

from core.readers import read_dead_letters, read_records
from core.records import EmotionEvent
from core.settings import Settings
from scoring.prompts import WindowShape
from tests.procs import ConsumerGroupProcs, ConsumerProc, RedisProc, stream_messages


#: Nudges of input a restarted consumer gets at most while it has delivered nothing yet: the first at once (held
#: back for it), the others, spaced over ``comeback_timeout_s``, from what is left unsent.
COMEBACK_NUDGES = 3


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
    nudge: int = 20  # after a restart, this many messages are sent at once for the new run to process
    comeback_timeout_s: float = 30.0  # from the group's settling to the new run ready and delivering


@dataclass(frozen=True)
class Comeback:
    """A killed consumer's restart, as its new run's endpoint told it within ``comeback_timeout_s``."""

    victim: str
    run: int  # the restarted process's run number (its log is ``<victim>.<run>.log``)
    fault: str  # "kill" (a lone consumer) or "pair-kill" (one of two; the other took its partitions over first)
    ready: bool  # /readyz answered 200 after the restart: it holds partitions and Redis answers
    consumed: int  # messages it delivered since the restart (its own erc_messages_consumed_total)
    events: int
    seconds: float  # from the kill to the last probe

    @property
    def came_back(self) -> bool:
        return self.ready and self.consumed > 0


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
    kills: int = 0  # kill -9s made
    comebacks: list[Comeback] = field(default_factory=list)  # one per kill, measured after its restart
    kills_survived: int = 0  # comebacks that came back, if the run lost nothing (0 otherwise)
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
            f"kills survived {self.kills_survived} of {self.kills} (came back {self.came_back}) | "
            f"redis restarts {self.redis_restarts} | "
            f"dead letters {self.dead_letters} (+{self.dead_letter_copies} copies; missing "
            f"{self.missing_dead_letters}, unexpected {self.unexpected_dead_letters}) | "
            f"out of turn order {self.out_of_order} | bad windows {self.bad_windows} | "
            f"degraded windows {self.degraded} (before the Redis restart: {self.degraded_before_redis_restart}) | "
            f"{self.seconds:.0f} s"
        )

    conversations: int = 0

    @property
    def came_back(self) -> int:
        """Kills whose consumer came back: its new run was ready and delivered messages."""
        return sum(1 for c in self.comebacks if c.came_back)

    @property
    def nothing_lost(self) -> bool:
        """Every valid message has exactly one distinct event id (copies of it allowed: at-least-once) and every
        malformed record its dead letter."""
        return self.lost == 0 and self.distinct_duplicates == 0 and self.missing_dead_letters == 0

    @property
    def ok(self) -> bool:
        return (self.nothing_lost and self.unexpected_dead_letters == 0 and self.out_of_order == 0
                and self.bad_windows == 0 and self.degraded_before_redis_restart == 0
                and self.kills_survived == self.kills)


def _malformed(rng: random.Random, key: bytes) -> bytes:
    return rng.choice([
        b'{"message_id": "broken", "turn": ',
        json.dumps({"message_id": "x", "conversation_id": key.decode(), "turn": "7", "speaker": "s",
                    "text": "t", "sent_at": "2024-05-01T00:00:00Z"}).encode(),
        b"\xff\xfe not utf-8",
    ])


class _Feed:
    """The input stream, sent from a thread: steadily at ``rate`` per second, except that

    - ``release(n)`` sends the next ``n`` at once (a burst before a kill, a nudge after a restart), and
    - the last ``held`` messages wait until released: a reserve per kill still to come, so that its burst and
      its restarted consumer find input even after the steady schedule has reached the reserve.
    """

    def __init__(self, producer: KafkaProducer, topic: str, stream: list[tuple[bytes, bytes, bool]],
                 rate: float, held: int) -> None:
        self.producer, self.topic, self.stream, self.rate = producer, topic, stream, rate
        self.held = min(held, len(stream))  # the last this many wait for a release
        self.credit = 0  # messages sent ahead of the steady schedule
        self.released_to = 0  # every message before this index was released
        self.futures: list[tuple[bool, FutureRecordMetadata]] = []  # (malformed, its send)
        self.error: BaseException | None = None
        self.stopped = False  # the run ended early (a fault failed): stop waiting for releases
        self.thread = threading.Thread(target=self._run, name="chaos-producer", daemon=True)

    def _run(self) -> None:
        try:
            t0 = time.monotonic()
            for i, (k, v, bad) in enumerate(self.stream):
                while (i >= len(self.stream) - self.held
                       or time.monotonic() < t0 + (i - self.credit) / self.rate):
                    if self.stopped:
                        return
                    time.sleep(0.01)
                self.futures.append((bad, self.producer.send(self.topic, key=k, value=v)))
            self.producer.flush(60)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def release(self, n: int, *, wait_acked: bool = False) -> None:
        """Send the next ``n`` now (out of the reserve where the schedule has reached it); with ``wait_acked``,
        return once the broker acknowledged them: the consumer is busy with them then."""
        target = min(len(self.stream), max(len(self.futures), self.released_to) + n)
        self.released_to = target
        self.credit += n
        self.held = min(self.held, len(self.stream) - target)
        if not wait_acked:
            return
        deadline = time.monotonic() + 30
        while len(self.futures) < target and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.005)
        if self.futures and len(self.futures) >= target:
            self.futures[target - 1][1].get(30)

    def hold(self, n: int) -> None:
        """Keep the last ``n`` messages back (those not sent or released yet, at most); the rest go out on the
        steady schedule."""
        self.held = min(n, len(self.stream) - max(len(self.futures), self.released_to))


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

    kills = plan.kills + (1 if plan.pair_kill else 0)
    per_kill = plan.burst + plan.nudge  # held back for each kill still to come
    producer = KafkaProducer(acks="all", linger_ms=5, **settings.kafka.client_options())
    feed = _Feed(producer, settings.kafka.input_topic, stream, plan.rate, held=kills * per_kill)

    def comeback(victim: ConsumerProc, fault: str, killed_at: float) -> Comeback:
        """After the victim's restart and the group's settling: until its new run answered ready and delivered
        messages of its own, sending it a nudge of input at once and again while it has none (its first nudge
        is held back for it: see COMEBACK_NUDGES)."""
        deadline = time.monotonic() + plan.comeback_timeout_s
        ready, probe, nudges, next_nudge = False, None, 0, 0.0
        while victim.alive:
            probe = victim.probe() or probe
            ready = ready or bool(probe and probe.ready)
            if ready and probe is not None and probe.consumed > 0:
                break
            now = time.monotonic()
            if now >= deadline:
                break
            if nudges < COMEBACK_NUDGES and now >= next_nudge:
                feed.release(plan.nudge)
                nudges, next_nudge = nudges + 1, now + plan.comeback_timeout_s / (COMEBACK_NUDGES + 1)
            time.sleep(0.1)
        c = Comeback(victim=victim.name, run=victim.starts, fault=fault, ready=ready,
                     consumed=probe.consumed if probe else 0, events=probe.events if probe else 0,
                     seconds=time.monotonic() - killed_at)
        report.comebacks.append(c)
        log(f"chaos: {victim.name}.{victim.starts} after the {fault}: "
            f"{'came back' if c.came_back else 'DID NOT come back'} ({c})")
        return c

    placed: list[tuple[bool, int, int]] = []  # (malformed, partition, offset)
    cluster = ConsumerGroupProcs(settings, workdir / "consumers", settle_timeout_s=plan.settle_timeout_s)
    redis_restarted_at: datetime | None = None
    try:
        cluster.start("a")
        cluster.settle({})
        feed.thread.start()
        for n, fault in enumerate(faults):
            time.sleep(rng.uniform(*plan.pause_s))  # a random moment in the stream
            marks = cluster.marks()
            if fault == "kill":
                victim = rng.choice(cluster.live())
                feed.release(plan.burst, wait_acked=True)
                time.sleep(rng.uniform(*plan.kill_delay_s))  # somewhere in the processing of the burst
                victim.kill9()
                killed_at = time.monotonic()
                report.kills += 1
                victim.start()
                marks.pop(victim.name, None)
                cluster.settle(marks)
                comeback(victim, fault, killed_at)
            elif fault == "pair-kill":
                cluster.start("b")
                cluster.settle(marks)
                time.sleep(rng.uniform(*plan.pause_s))
                marks = cluster.marks()
                victim = rng.choice(cluster.live())
                feed.release(plan.burst, wait_acked=True)
                time.sleep(rng.uniform(*plan.kill_delay_s))
                victim.kill9()
                killed_at = time.monotonic()
                report.kills += 1
                marks.pop(victim.name, None)
                cluster.settle(marks)  # the other member took every partition over
                marks = cluster.marks()
                victim.start()
                cluster.settle(marks)
                comeback(victim, fault, killed_at)
            elif fault == "join":
                cluster.start("c")
                cluster.settle(marks)
            elif fault == "redis":
                redis_restarted_at = datetime.now(UTC)
                redis_server.restart()
                report.redis_restarts += 1
            report.faults.append(fault)
            feed.hold((kills - report.kills) * per_kill)  # what this kill did not use goes out steadily
            log(f"chaos: fault {n + 1}/{len(faults)} ({fault}) done at {time.monotonic() - started:.0f} s, "
                f"{len(feed.futures)}/{len(stream)} sent")
        log(f"chaos: faults done at {time.monotonic() - started:.0f} s")
        feed.hold(0)
        feed.thread.join(600)
        if feed.error is not None:
            raise feed.error
        if feed.thread.is_alive():
            raise TimeoutError(f"the sender did not finish ({len(feed.futures)}/{len(stream)} sent)")
        placed.extend((bad, md.partition, md.offset) for bad, md in ((b, f.get(30)) for b, f in feed.futures))

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
        feed.stopped = True
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
    # Survived: the killed consumer came back, and nothing was lost over the whole run.
    report.kills_survived = report.came_back if report.nothing_lost else 0
    report.seconds = time.monotonic() - started
    return report


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()
