"""producer_sim: synthetic conversations, message building, interleaving, and a replay to a real broker."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from core.labels import get_label_set
from core.records import ChatMessage
from core.settings import Settings
from model_store.data import Conversation, Utterance
from producer_sim.replay import TURN_GAP, interleave, replay, to_messages
from producer_sim.synthetic import (
    CALL_CENTER_ID, MELD_RAW_LABELS, NEGATIVE_STREAK_ID, scripted_conversations, synthetic_conversations,
    templates,
)


def _conversations(sizes: list[int]) -> list[Conversation]:
    return [
        Conversation("toy", f"c{i}", tuple(Utterance(f"s{t % 2}", f"c{i} turn {t}", "neutral") for t in range(n)))
        for i, n in enumerate(sizes)
    ]


# --- synthetic ------------------------------------------------------------------------------------


def test_templates_are_realistic_sized() -> None:
    base = templates()
    assert len(base) >= 12
    for conv in base:
        assert 4 <= len(conv.utterances) <= 8, conv.conversation_id
        assert 2 <= len({u.speaker for u in conv.utterances}) <= 3, conv.conversation_id


def test_the_scripted_conversations_hold_every_hand_written_one_once() -> None:
    scripted = scripted_conversations()
    ids = [c.conversation_id for c in scripted]
    assert len(set(ids)) == len(ids) == len(templates()) + 2
    assert ids[-2:] == [NEGATIVE_STREAK_ID, CALL_CENTER_ID] and scripted[:-2] == templates()
    call = scripted[-1]
    assert [u.label for u in call.utterances] == ["anger", "neutral"] * 3 + ["anger"]  # the demo's streak
    assert all(u.label in MELD_RAW_LABELS for c in scripted for u in c.utterances)


@pytest.mark.parametrize("n", [0, 1, 12, 31])
def test_synthetic_conversations(n: int) -> None:
    convs = synthetic_conversations(n, seed=7)
    assert len(convs) == n
    assert len({c.conversation_id for c in convs}) == n
    meld = get_label_set("meld")
    for conv in convs:
        assert conv.dataset == "synthetic"
        for utt in conv.utterances:
            assert utt.speaker and utt.text
            assert utt.label in MELD_RAW_LABELS
            assert meld.map_gold(utt.label, "meld") in meld.labels
    assert synthetic_conversations(n, seed=7) == convs


def test_synthetic_cycles_every_template_per_pass() -> None:
    convs = synthetic_conversations(2 * len(templates()), seed=1)
    slugs = [c.conversation_id.split("-", 1)[1] for c in convs]
    assert sorted(slugs) == sorted(2 * [t.conversation_id for t in templates()])
    with pytest.raises(ValueError):
        synthetic_conversations(-1)


# --- to_messages ----------------------------------------------------------------------------------


def test_to_messages_ids_and_fields() -> None:
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    convs = _conversations([2, 1])
    per = to_messages(convs, run_id="run7", tenant="acme", start=start)
    assert [len(m) for m in per] == [2, 1]
    first, second = per[0]
    assert first.conversation_id == "run7:toy:c0"
    assert [first.message_id, second.message_id] == ["run7:toy:c0:0", "run7:toy:c0:1"]
    assert [first.turn, second.turn] == [0, 1]
    assert (first.speaker, first.text, first.gold_label, first.tenant) == ("s0", "c0 turn 0", "neutral", "acme")
    assert first.sent_at == start and second.sent_at == start + TURN_GAP
    assert per[1][0].message_id == "run7:toy:c1:0"
    # Round trip through the wire format.
    assert ChatMessage.from_bytes(second.to_bytes()) == second


def test_to_messages_defaults_and_naive_start() -> None:
    (msgs,) = to_messages(_conversations([1]), run_id="r")
    assert msgs[0].sent_at.tzinfo is not None
    assert abs(msgs[0].sent_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert msgs[0].tenant is None
    with pytest.raises(ValueError, match="timezone"):
        to_messages(_conversations([1]), run_id="r", start=datetime(2024, 1, 1))


# --- interleave -----------------------------------------------------------------------------------


def _stream(sizes: list[int], concurrency: int, seed: int) -> list[ChatMessage]:
    return list(interleave(to_messages(_conversations(sizes), run_id="r"), concurrency=concurrency, seed=seed))


def test_interleave_keeps_each_conversation_in_order() -> None:
    sizes = [5, 3, 0, 8, 1, 6, 4]
    stream = _stream(sizes, concurrency=3, seed=11)
    assert len(stream) == sum(sizes)
    turns: dict[str, list[int]] = defaultdict(list)
    for msg in stream:
        turns[msg.conversation_id].append(msg.turn)
    assert {cid: t for cid, t in turns.items()} == {
        f"r:toy:c{i}": list(range(n)) for i, n in enumerate(sizes) if n
    }


@pytest.mark.parametrize("concurrency", [1, 2, 4, 100])
def test_interleave_respects_concurrency(concurrency: int) -> None:
    sizes = [3, 5, 2, 7, 4, 6, 1, 5]
    stream = _stream(sizes, concurrency=concurrency, seed=3)
    remaining = {f"r:toy:c{i}": n for i, n in enumerate(sizes)}
    open_: set[str] = set()
    finished = 0
    max_open = 0
    for msg in stream:
        cid = msg.conversation_id
        if cid not in open_:
            # Conversation k may open only once k - concurrency + 1 earlier ones have finished.
            k = int(cid.rsplit("c", 1)[1])
            assert finished >= k - concurrency + 1, (cid, finished)
            open_.add(cid)
        max_open = max(max_open, len(open_))
        remaining[cid] -= 1
        if remaining[cid] == 0:
            open_.discard(cid)
            finished += 1
    assert finished == len(sizes)
    assert max_open <= concurrency
    if concurrency == 1:
        assert [m.conversation_id for m in stream] == [f"r:toy:c{i}" for i, n in enumerate(sizes) for _ in range(n)]
    if concurrency >= len(sizes):
        assert max_open > 2  # all opened at once, so several are live together


def test_interleave_is_deterministic_by_seed() -> None:
    sizes = [6] * 10
    a = [m.message_id for m in _stream(sizes, concurrency=4, seed=5)]
    assert a == [m.message_id for m in _stream(sizes, concurrency=4, seed=5)]
    assert a != [m.message_id for m in _stream(sizes, concurrency=4, seed=6)]
    # Conversations really interleave.
    assert [m.split(":")[2] for m in a[:6]] != ["c0"] * 6


def test_interleave_rejects_bad_concurrency() -> None:
    with pytest.raises(ValueError):
        list(interleave([], concurrency=0, seed=0))
    assert list(interleave([], concurrency=2, seed=0)) == []


def test_replay_validates_arguments() -> None:

    with pytest.raises(ValueError, match="rate"):
        replay(Settings(), [], rate=0)
    with pytest.raises(ValueError, match="total"):
        replay(Settings(), [], rate=None, total=-1)


# --- replay to a real broker ----------------------------------------------------------------------


def test_replay_puts_keyed_messages_on_the_input_topic(settings: Settings) -> None:
    from tests.kafka_helpers import read_all

    convs = synthetic_conversations(5, seed=2)
    per = to_messages(convs, run_id="replay-test", start=datetime(2024, 5, 1, tzinfo=UTC))
    stream = list(interleave(per, concurrency=3, seed=4))
    n = len(stream)

    report = replay(settings, iter(stream), rate=None, total=n, progress=False)

    assert report.sent == n and report.topic == settings.kafka.input_topic
    assert report.seconds > 0 and report.rate > 0
    records = read_all(settings, settings.kafka.input_topic, expected=n, timeout_s=30)
    assert len(records) == n
    by_id: dict[str, ChatMessage] = {}
    per_partition_turns: dict[str, list[tuple[int, int]]] = defaultdict(list)
    partitions_of: dict[str, set[int]] = defaultdict(set)
    for rec in records:
        msg = ChatMessage.from_bytes(rec.value)
        assert rec.key == msg.conversation_id.encode("utf-8")
        by_id[msg.message_id] = msg
        partitions_of[msg.conversation_id].add(rec.partition)
        per_partition_turns[msg.conversation_id].append((rec.offset, msg.turn))
    assert by_id == {m.message_id: m for m in stream}
    # Keyed by conversation: one partition each, so each conversation's turns come back in order.
    assert all(len(p) == 1 for p in partitions_of.values())
    for turns in per_partition_turns.values():
        assert [t for _, t in sorted(turns)] == list(range(len(turns)))


def test_replay_rate_limit_and_total_cap(settings: Settings) -> None:
    from tests.kafka_helpers import read_all

    (msgs,) = to_messages(synthetic_conversations(1), run_id="rate")
    endless = (msgs[i % len(msgs)] for i in range(10**9))  # capped by total
    report = replay(settings, endless, rate=50.0, total=20, progress=True)  # exercises the bar
    assert report.sent == 20
    # 20 messages at 50/s are due over 0.38 s; allow generous slack on busy machines.
    assert 0.35 <= report.seconds < 5.0
    assert len(read_all(settings, settings.kafka.input_topic, expected=20, timeout_s=30)) == 20


def test_replay_surfaces_send_errors(settings: Settings) -> None:
    from kafka.errors import MessageSizeTooLargeError

    (msgs,) = to_messages(synthetic_conversations(1), run_id="err")
    huge = msgs[0].model_copy(update={"text": "x" * 3_000_000})  # over the producer's max_request_size
    with pytest.raises(MessageSizeTooLargeError):
        replay(settings, [msgs[1], huge], rate=None, progress=False)


def test_failed_futures_become_a_replay_error() -> None:
    # Broker-side failures arrive on kafka-python's I/O thread through the futures' errbacks.
    from producer_sim.replay import ReplayError, _Failures

    failures = _Failures()
    failures.raise_if_any()  # nothing yet
    first = RuntimeError("NotEnoughReplicas")
    failures(first)
    failures(RuntimeError("second"))
    with pytest.raises(ReplayError, match="2 record") as info:
        failures.raise_if_any()
    assert info.value.__cause__ is first
