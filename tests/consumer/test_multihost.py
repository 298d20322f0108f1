"""Three consumer hosts, one broker, a three-master Redis Cluster; one host leaves mid-stream and comes back.

Each "host" is a network namespace of this machine (:class:`tests.netns.Hosts`): its consumer reaches
the broker and the Redis Cluster only over its own veth and the bridge, at the addresses the servers
announce (tansu's advertised listener, the nodes' ``cluster-announce-ip``): the setup of three machines
on one switch, without separate CPUs. The stream is replayed at a steady rate; a third of the way in
host 2 gets SIGTERM (graceful: it commits what it finished and leaves the group), two thirds in it is
started again. Checks, from the output topic and the Redis Cluster, never deduplicated:

- every input message has an event and nothing else is there; every copy of a message's event has the same
  ``event_id``; copies are counted (never deduplicated away), printed, and must stay within what the
  stream's at-least-once delivery allows at a rebalance: one stream batch per member per assignment.
  A graceful leave or join is not copy-free: a batch whose records were taken before the group rebalanced
  (``Partitions.poll_batch`` polls several times per batch, and the revocation happens inside one of those polls), or
  whose commit the broker refused while the rebalance was pending (tansu answers error 27), is processed
  and emitted, and the partition's next owner emits it again (same ids): 1-8 copies of 2,100 in 5 of the
  first 7 runs, none in the other 2;
- each conversation's events come in turn order with whole windows (never degraded), and its window
  in Redis holds all its turns in order; the conversations' windows lie on all three primaries;
- each consumer runs in its own namespace, its TCP connections to the broker come from its host's
  address, and the partitions are spread over the hosts (2 each of 6).

Marked ``multihost`` (needs root for ``ip netns``; skipped with the reason otherwise). Run it alone:

    .venv/bin/pytest -m multihost -s tests/consumer/test_multihost.py
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from consumer.conversation_store import ConversationStore
from core.records import EmotionEvent, conversation_scope
from core.settings import (
    BatchSettings,
    KafkaSettings,
    ModelSettings,
    RedisSettings,
    ServicesSettings,
    Settings,
    StoreSettings,
)
from local_services.supervisor import ensure_topics, kafka_down, kafka_up
from scoring.prompts import WindowShape
from tests.conftest import _start_on_free_port
from tests.kafka_helpers import PacedSender, read_all
from tests.netns import Hosts, netns_unavailable
from tests.procs import ConsumerGroupProcs, ConsumerProc, stream_messages
from tests.redis_cluster import RedisClusterProcs

pytestmark = pytest.mark.multihost

HOSTS = 3
PARTITIONS = 6
CONVERSATIONS = 100
TURNS = 21  # 2,100 messages
RATE = 100.0  # messages/s: ~21 s of stream, so the leave and the return land mid-way


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"the multi-host test makes network namespaces: {reason}")
    made = Hosts(HOSTS)
    made.create()
    try:
        yield made
    finally:
        made.destroy()
        assert not made.leftovers(), f"namespaces or links left behind: {made.leftovers()}"


@pytest.fixture
def bootstrap(hosts: Hosts, tmp_path: Path) -> Iterator[str]:
    """tansu on the bridge address: it listens and advertises there, so every host reaches what it is told."""
    started = _start_on_free_port(
        lambda port, d: Settings(kafka=KafkaSettings(bootstrap_servers=f"{hosts.gateway}:{port}"),
                                 services=ServicesSettings(run_dir=d, start_timeout_s=20.0)),
        lambda s: kafka_up(s, create_topics=False),
        tmp_path / "kafka",
    )
    try:
        yield started.kafka.bootstrap_servers
    finally:
        kafka_down(started)


@pytest.fixture
def redis_cluster(hosts: Hosts, tmp_path: Path) -> Iterator[RedisClusterProcs]:
    cluster = RedisClusterProcs(tmp_path / "redis-cluster", host=hosts.gateway)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _broker_peers(port: int) -> set[str]:
    """Addresses of the clients connected to the broker now (seen from the broker's side, with ``ss``)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def test_three_hosts_share_the_stream_and_one_leaves_and_returns(
    hosts: Hosts, bootstrap: str, redis_cluster: RedisClusterProcs, tmp_path: Path, capsys
) -> None:
    started = time.monotonic()
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap, input_topic=f"mh-{suffix}.messages", output_topic=f"mh-{suffix}.emotions",
            dlq_topic=f"mh-{suffix}.dlq", alerts_topic=f"mh-{suffix}.alerts", partitions=PARTITIONS,
            group_id=f"erc-mh-{suffix}", client_id=f"erc-mh-{suffix}", session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        ),
        redis=RedisSettings(url=redis_cluster.url, cluster=True, key_prefix=f"erc-mh-{suffix}"),
        batch=BatchSettings(micro_batch_size=25, max_wait_ms=50),
        model=ModelSettings(max_prompt_tokens=100_000),  # whole windows: each event's window length is checked
        store=StoreSettings(dir=tmp_path / "store"),
        services=ServicesSettings(run_dir=tmp_path / "run"),
    )
    ensure_topics(settings)
    names = [f"h{i + 1}" for i in range(HOSTS)]
    group = ConsumerGroupProcs(
        settings, tmp_path / "hosts", settle_timeout_s=90.0,
        make=lambda name: ConsumerProc(settings, tmp_path / "hosts", name, prefix=hosts.exec_prefix(names.index(name))),
    )
    messages = stream_messages(CONVERSATIONS, TURNS, run_id=f"mh-{suffix}", seed=3)
    sender = PacedSender(settings, settings.kafka.input_topic,
                         [(m.conversation_id.encode(), m.to_bytes()) for m in messages], RATE)
    port = int(bootstrap.rsplit(":", 1)[1])
    try:
        for name in names:  # joins only (nobody leaves while a rebalance is pending): all at once is safe
            group.start(name)
        group.settle({})
        spread = {name: group.members[name].assigned() for name in names}
        namespaces = {name: hosts.namespace_of(group.members[name].proc.pid) for name in names}
        peers = _broker_peers(port)

        sender.start()
        sender.wait_sent(len(messages) // 3)
        stopped_at = sender.sent
        marks = group.marks()
        assert group.members["h2"].terminate() == 0, group.members["h2"].tail()
        marks.pop("h2")
        group.settle(marks)
        without_h2 = {name: group.members[name].assigned() for name in ("h1", "h3")}

        sender.wait_sent(2 * len(messages) // 3)
        restarted_at = sender.sent
        marks = group.marks()
        group.start("h2")
        group.settle(marks)
        back = group.members["h2"].assigned()
        sender.join_acked()

        # Drained once every message has an event; then the hosts leave one at a time (graceful).
        deadline = time.monotonic() + 120
        while len({EmotionEvent.from_bytes(r.value).message_id
                   for r in read_all(settings, settings.kafka.output_topic, len(messages), timeout_s=10)}) \
                < len(messages):
            assert time.monotonic() < deadline, "the stream did not drain within 120 s"
        for name in names[:-1]:
            marks = group.marks()
            assert group.members[name].terminate() == 0, group.members[name].tail()
            marks.pop(name)
            group.settle(marks)
        assert group.members[names[-1]].terminate() == 0, group.members[names[-1]].tail()
    finally:
        group.kill_all()

    # -- the hosts ---------------------------------------------------------------------------
    assert namespaces == dict(zip(names, hosts.names)), namespaces
    assert {hosts.address(i) for i in range(HOSTS)} <= peers, f"broker peers {peers}"
    assert all(len(parts or []) == PARTITIONS // HOSTS for parts in spread.values()), spread
    assert sorted(p for parts in without_h2.values() for p in parts or []) == sorted(group.partitions), without_h2
    assert back, "host 2 got no partitions when it came back"
    assert 0 < stopped_at < restarted_at < len(messages), (stopped_at, restarted_at)

    # -- one event per message, copies counted (never deduplicated away) ------------------------
    records = read_all(settings, settings.kafka.output_topic, len(messages), timeout_s=30)
    events = [EmotionEvent.from_bytes(r.value) for r in records]  # sorted by (partition, offset)
    per_message = Counter(e.message_id for e in events)
    assert set(per_message) == {m.message_id for m in messages}  # none lost, nothing else
    event_ids: dict[str, set[str]] = defaultdict(set)
    for e in events:
        event_ids[e.message_id].add(e.event_id)
    assert [mid for mid, ids in event_ids.items() if len(ids) != 1] == []  # a copy is the same event, never another
    copies = {mid: n - 1 for mid, n in per_message.items() if n > 1}
    # Copies come only from stream batches in flight when the group rebalanced (see the module docstring):
    # at most one batch per member per assignment it received.
    assignments = sum(m.count("partitions assigned") for m in group.members.values())  # all runs' logs
    in_flight_bound = assignments * settings.batch.stream_records
    assert sum(copies.values()) <= in_flight_bound, (copies, in_flight_bound)

    # -- turn order and whole windows ----------------------------------------------------------
    turns: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    shape = WindowShape(settings.window.size, settings.window.hop)
    for e in events:  # first copies, in log order (a conversation's events share one partition)
        assert not e.window_degraded and e.window == e.turn - shape.first(e.turn) + 1, e
        if e.event_id not in seen:
            seen.add(e.event_id)
            turns[e.conversation_id].append(e.turn)
    assert all(t == list(range(TURNS)) for t in turns.values())
    client = RedisCluster.from_url(redis_cluster.url, socket_timeout=5)
    try:
        store = ConversationStore(client, prefix=settings.redis.key_prefix, size=settings.window.span,
                            retain=settings.conversation.retain_turns, ttl_s=settings.conversation.ttl_s)
        retained = min(TURNS, settings.conversation.retain_turns)
        for conv in turns:
            stored = store.get(conversation_scope(None, conv))
            assert [t.turn for t in stored] == list(range(TURNS - retained, TURNS)), conv
            assert [t.message_id for t in stored] == [f"{conv}:t{t}" for t in range(TURNS - retained, TURNS)]
        owners = Counter(client.get_node_from_key(store.key(conversation_scope(None, conv))).name for conv in turns)
    finally:
        client.close()
    assert len(owners) == 3, owners

    with capsys.disabled():
        print(f"\nmultihost: {len(messages)} messages, {len(turns)} conversations, {PARTITIONS} partitions over "
              f"{HOSTS} hosts {spread}; h2 stopped at {stopped_at} sent, back at {restarted_at} sent with {back}; "
              f"windows per Redis primary {dict(owners)}; events {len(events)}, redelivered copies "
              f"{sum(copies.values())} (bound {in_flight_bound}); {time.monotonic() - started:.0f} s")
