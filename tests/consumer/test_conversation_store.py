"""ConversationStore on a real Redis: ordered windows, idempotent appends, trimming, TTL, atomicity."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace

import pytest
import redis

from consumer.conversation_store import ConversationStore, StoredTurn
from scoring.prompts import Turn, WindowShape


@pytest.fixture
def client(any_redis: redis.Redis) -> redis.Redis:
    """Standalone Redis, then Redis Cluster (every key a script touches shares one hash tag)."""
    return any_redis


@pytest.fixture
def prefix() -> str:
    return f"erc-test-{uuid.uuid4().hex[:8]}"


def _store(client: redis.Redis, prefix: str, *, size: int = 3, retain: int = 5, ttl_s: int = 600) -> ConversationStore:
    return ConversationStore(client, prefix=prefix, size=size, retain=retain, ttl_s=ttl_s)


def _turn(n: int, text: str | None = None, speaker: str | None = None) -> StoredTurn:
    return StoredTurn(n, speaker or ("A" if n % 2 == 0 else "B"), text if text is not None else f"text {n}", f"m-{n}")


def _append(store: ConversationStore, conv: str, t: StoredTurn):
    [update] = store.append_many([(conv, t)])
    return update


def test_retain_below_size_is_refused(client: redis.Redis, prefix: str) -> None:
    with pytest.raises(ValueError, match="retain"):
        _store(client, prefix, size=4, retain=3)


def test_key_uses_a_cluster_hash_tag(client: redis.Redis, prefix: str) -> None:
    assert _store(client, prefix).key("c-1") == f"{prefix}:win:{{c-1}}"


def test_empty_append_many_is_a_no_op(client: redis.Redis, prefix: str) -> None:
    assert _store(client, prefix).append_many([]) == []


def test_appending_in_order_returns_the_last_size_turns_oldest_first(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=5)
    for n in range(8):
        update = _append(store, "c", _turn(n))
        assert update.added is True
        expected = list(range(max(0, n - 2), n + 1))
        assert [t.turn for t in update.window] == expected
        assert update.window[-1] == replace(_turn(n), speaker_id=n % 2)  # the target is last, stored exactly
        assert [t.message_id for t in update.window] == [f"m-{i}" for i in expected]


def test_window_turns_convert_to_prompt_turns(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix)
    update = _append(store, "c", StoredTurn(0, "Zoë", 'say "hi"\n— ok ✓', "m-0"))
    assert update.window[0].as_prompt_turn() == Turn("Zoë", 'say "hi"\n— ok ✓', speaker_id=0, position=0)


def test_a_duplicate_turn_is_not_appended_twice_and_the_first_version_wins(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=10)
    first = [_append(store, "c", _turn(n)) for n in range(4)]
    again = _append(store, "c", _turn(2))  # an exact redelivery
    assert again.added is False
    assert again.window == first[2].window
    conflicting = _append(store, "c", StoredTurn(2, "Mallory", "a different text", "m-other"))
    assert conflicting.added is False
    assert conflicting.window == first[2].window
    assert conflicting.window[-1].text == "text 2" and conflicting.window[-1].message_id == "m-2"
    assert [t.turn for t in store.get("c")] == [0, 1, 2, 3]


def test_retain_trims_the_oldest_turns(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=5)
    for n in range(12):
        _append(store, "c", _turn(n))
        assert len(store.get("c")) == min(n + 1, 5)
    assert [t.turn for t in store.get("c")] == [7, 8, 9, 10, 11]
    assert client.zcard(store.key("c")) == 5


def test_a_replayed_old_turn_never_sees_future_turns(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=8)
    for n in range(6):
        _append(store, "c", _turn(n))
    replay = _append(store, "c", _turn(3))
    assert replay.added is False
    assert [t.turn for t in replay.window] == [1, 2, 3]
    first = _append(store, "c", _turn(0))
    assert [t.turn for t in first.window] == [0]


def test_a_replayed_turn_older_than_retain_sees_no_future_and_does_not_grow_the_set(
    client: redis.Redis, prefix: str
) -> None:
    store = _store(client, prefix, size=3, retain=4)
    for n in range(10):
        _append(store, "c", _turn(n))
    replay = _append(store, "c", _turn(2))  # trimmed long ago
    assert [t.turn for t in replay.window] == [2]
    assert [t.turn for t in store.get("c")] == [6, 7, 8, 9]


def test_an_out_of_order_turn_sees_only_its_past(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=4, retain=8)
    for n in (0, 1, 4, 5):
        _append(store, "c", _turn(n))
    late = _append(store, "c", _turn(2))  # arrives after turns 4 and 5
    assert late.added is True
    assert [t.turn for t in late.window] == [0, 1, 2]
    assert [t.turn for t in store.get("c")] == [0, 1, 2, 4, 5]


def test_conversations_are_separate(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=5)
    _append(store, "a", _turn(0, "from a"))
    update = _append(store, "b", _turn(1, "from b"))
    assert [t.text for t in update.window] == ["from b"]
    assert [t.text for t in store.get("a")] == ["from a"]


def test_ttl_is_set_and_refreshed(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, ttl_s=100)
    _append(store, "c", _turn(0))
    ttl = client.ttl(store.key("c"))
    assert 95 <= ttl <= 100
    client.expire(store.key("c"), 10)
    _append(store, "c", _turn(0))  # even a duplicate refreshes the conversation's TTL
    assert 95 <= client.ttl(store.key("c")) <= 100


def test_concurrent_appends_to_one_conversation_are_atomic(redis_url: str, prefix: str) -> None:
    """Two writers racing on the same turns: each turn stored exactly once, windows always ordered."""
    n_turns, size = 300, 6
    results: dict[str, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer(name: str) -> None:
        c = redis.Redis.from_url(redis_url, socket_timeout=10)
        try:
            store = _store(c, prefix, size=size, retain=1_000)
            barrier.wait()
            out = []
            for n in range(n_turns):  # one round trip per turn, to interleave as much as possible
                out.append(_append(store, "shared", StoredTurn(n, name, f"{name} {n}", f"{name}-{n}")))
            results[name] = out
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    c = redis.Redis.from_url(redis_url)
    try:
        stored = _store(c, prefix, size=size, retain=1_000).get("shared")
    finally:
        c.close()
    assert [t.turn for t in stored] == list(range(n_turns))
    # Exactly one writer added each turn, and the stored version is that writer's.
    for n in range(n_turns):
        adders = [name for name in ("w1", "w2") if results[name][n].added]
        assert len(adders) == 1, (n, adders)
        assert stored[n].speaker == adders[0]
    for name in ("w1", "w2"):
        for n, update in enumerate(results[name]):
            turns = [t.turn for t in update.window]
            assert turns == list(range(max(0, n - size + 1), n + 1)), (name, n, turns)
            assert update.window[-1] == stored[n]


def test_concurrent_appends_of_disjoint_turns(redis_url: str, prefix: str) -> None:
    """Even turns from one thread, odd from another: all stored once, in turn order."""
    n_turns = 400

    def writer(parity: int) -> None:
        c = redis.Redis.from_url(redis_url, socket_timeout=10)
        try:
            store = _store(c, prefix, size=4, retain=1_000)
            for start in range(parity, n_turns, 40):
                store.append_many([("shared", _turn(n)) for n in range(start, min(start + 40, n_turns), 2)])
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    c = redis.Redis.from_url(redis_url)
    try:
        stored = _store(c, prefix, size=4, retain=1_000).get("shared")
    finally:
        c.close()
    assert [replace(t, speaker_id=None) for t in stored] == [_turn(n) for n in range(n_turns)]
    # each speaker got one number, the first writer's speaker 0 (whichever thread ran first)
    assert len({(t.speaker, t.speaker_id) for t in stored}) == 2 and {t.speaker_id for t in stored} == {0, 1}


def test_append_many_of_200_items_keeps_input_order(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=4, retain=10)
    items = [(f"conv-{i % 7}", _turn(i // 7, f"conv-{i % 7} turn {i // 7}")) for i in range(200)]
    items.append(items[195])  # a redelivery inside the same batch (still retained)
    updates = store.append_many(items)
    assert len(updates) == len(items)
    for (conv, t), update in zip(items[:200], updates):
        assert update.added is True
        assert update.window[-1] == replace(t, speaker_id=t.turn % 2)  # A spoke first in each conversation
        assert all(w.text.startswith(f"{conv} ") for w in update.window)
        assert [w.turn for w in update.window] == list(range(max(0, t.turn - 3), t.turn + 1))
    assert updates[-1].added is False and updates[-1].window == updates[195].window
    for k in range(7):
        turns = [t.turn for t in store.get(f"conv-{k}")]
        n = len(range(k, 200, 7))
        assert turns == list(range(max(0, n - 10), n))


# -- duplicate message ids and degraded windows ---------------------------------------------------


def test_a_message_id_already_stored_at_another_turn_is_reported_and_not_stored(client, prefix) -> None:
    store = _store(client, prefix)
    conv = "dup"
    assert _append(store, conv, StoredTurn(0, "A", "first", "same-id")).added
    u = _append(store, conv, StoredTurn(1, "B", "second", "same-id"))
    assert u.duplicate_of_turn == 0 and not u.added and u.window == ()
    assert [t.turn for t in store.get(conv)] == [0]
    # The same message at its own turn again is a redelivery, not a duplicate.
    again = _append(store, conv, StoredTurn(0, "A", "first", "same-id"))
    assert again.duplicate_of_turn is None and not again.added
    # Ids that only share a suffix are not duplicates.
    assert _append(store, conv, StoredTurn(1, "B", "x", "the-same-id")).added


def test_message_ids_with_quotes_and_non_ascii_are_matched_exactly(client, prefix) -> None:
    store = _store(client, prefix)
    tricky = 'id "quoted" é 😀 \\ /'
    assert _append(store, "q", StoredTurn(0, "A", "t", tricky)).added
    assert _append(store, "q", StoredTurn(1, "A", "t", tricky)).duplicate_of_turn == 0
    assert _append(store, "q", StoredTurn(2, "A", "t", tricky + "x")).added


@pytest.mark.parametrize(
    ("stored", "turn", "size", "degraded"),
    [
        ([0], 0, 3, False),
        ([0, 1, 2], 2, 3, False),
        ([1, 2, 3], 3, 3, False),  # a full window need not start at 0
        ([2, 3], 3, 3, True),  # turn 1 is missing: Redis lost it
        ([0, 2], 2, 3, True),  # a gap in the input
        ([5], 5, 3, True),  # a conversation resumed after Redis was emptied
        ([3, 4, 5], 5, 3, False),  # ... and whole again once `size` turns arrived
    ],
)
def test_degraded_windows(client, prefix, stored, turn, size, degraded) -> None:
    store = _store(client, prefix, size=size, retain=8)
    u = None
    for t in stored:
        u = _append(store, "deg", _turn(t))
    assert u is not None and u.degraded(turn, WindowShape(size, 1)) == degraded


def test_messages_without_turns_are_numbered_by_arrival_and_keep_their_turn_when_redelivered(
    client: redis.Redis, prefix: str
) -> None:
    store = _store(client, prefix, size=3, retain=5)
    untimed = [StoredTurn(None, "A", f"text {i}", f"u-{i}") for i in range(4)]
    updates = store.append_many([("c", t) for t in untimed])
    assert [u.turn for u in updates] == [0, 1, 2, 3] and all(u.added for u in updates)
    assert [t.message_id for t in updates[3].window] == ["u-1", "u-2", "u-3"]
    # The same message again (a redelivery, in another batch): the same turn, nothing stored twice.
    [again] = store.append_many([("c", untimed[1])])
    assert (again.turn, again.added, again.duplicate_of_turn) == (1, False, None)
    assert [t.message_id for t in again.window] == ["u-0", "u-1"]
    # A message with an explicit turn among them, then one without: after the newest stored turn.
    assert _append(store, "c", StoredTurn(7, "B", "late", "x-7")).turn == 7
    assert _append(store, "c", StoredTurn(None, "A", "next", "u-9")).turn == 8
    # An explicit turn for an id stored at another turn is still a duplicate id.
    dup = _append(store, "c", StoredTurn(5, "A", "text 2", "u-2"))
    assert dup.duplicate_of_turn == 2 and not dup.added
    assert [t.turn for t in store.get("c")] == [1, 2, 3, 7, 8]  # the newest retain=5


def test_a_reply_sees_its_chain_of_ancestors_never_a_sibling_branch(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=50)

    def post(mid: str, parent: str | None) -> object:
        return _append(store, "thread", StoredTurn(None, f"u-{mid}", f"comment {mid}", mid, parent))

    post("root", None)
    post("a", "root")
    post("b", "root")  # a sibling branch of "a"
    post("b1", "b")
    a1 = post("a1", "a")
    assert [t.message_id for t in a1.window] == ["root", "a", "a1"] and not a1.thread_incomplete
    deep = post("a2", "a1")  # size 3: the nearest ancestors only
    assert [t.message_id for t in deep.window] == ["a", "a1", "a2"] and not deep.thread_incomplete
    assert [t.reply_to for t in deep.window] == ["root", "a", "a1"]
    orphan = post("x", "never-seen")  # expired or never sent: labelled from what is known, marked
    assert [t.message_id for t in orphan.window] == ["x"] and orphan.thread_incomplete
    shape = WindowShape(3, 1)
    assert orphan.degraded(orphan.turn, shape, reply=True) and not deep.degraded(deep.turn, shape, reply=True)
    assert (a1.depth, deep.depth, orphan.depth) == (2, 3, None)  # depth in the thread: root 0
    assert [t.position for t in deep.prompt_turns()] == [1, 2, 3]
    assert [t.position for t in orphan.prompt_turns()] == [None]
    # A redelivered reply: the same turn and window again.
    again = post("a1", "a")
    assert (again.turn, again.added) == (a1.turn, False) and again.window == a1.window


# -- speaker numbers and hop windows -------------------------------------------------------------


def test_speakers_are_numbered_once_per_conversation_and_survive_trimming(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=4)
    names = ["Agent", "Customer", "Agent", "Supervisor"] + ["Customer", "Agent"] * 10
    updates = [_append(store, "call", StoredTurn(n, name, f"t{n}", f"m-{n}")) for n, name in enumerate(names)]
    expected = {"Agent": 0, "Customer": 1, "Supervisor": 2}
    for u in updates:
        assert all(t.speaker_id == expected[t.speaker] for t in u.window)
        assert all(t.speaker_id == expected[t.speaker] for t in u.prompt_turns())
    assert [t.turn for t in store.get("call")] == [20, 21, 22, 23]  # the supervisor's turn is long trimmed...
    assert _append(store, "call", StoredTurn(24, "Supervisor", "back", "m-24")).window[-1].speaker_id == 2  # ...not its number
    # another conversation numbers its own speakers; a redelivery keeps the stored number
    assert _append(store, "other", StoredTurn(0, "Customer", "hi", "o-0")).window[-1].speaker_id == 0
    ttl = client.ttl(store.speakers_key("call"))
    assert 0 < ttl <= 600


def test_a_hop_window_is_degraded_only_when_its_own_turns_are_missing(client: redis.Redis, prefix: str) -> None:
    shape = WindowShape(4, 3)  # span 6
    store = _store(client, prefix, size=shape.span, retain=10)
    u = None
    for n in [*range(0, 9), *range(10, 13)]:  # turn 9 never arrives
        u = _append(store, "hop", _turn(n))
        first = shape.first(n)
        assert [t.turn for t in u.window] == [t for t in [*range(10), *range(10, 13)] if t <= n and t != 9][-6:]
        assert u.degraded(n, shape) == (first <= 9 < n)
    assert u is not None and shape.first(12) == 9 and u.degraded(12, shape)


# -- the speaker hash stays bounded ---------------------------------------------------------------


def _thread(store: ConversationStore, conv: str, speakers: list[str]) -> list:
    return [_append(store, conv, StoredTurn(n, who, f"t{n}", f"m-{n}")) for n, who in enumerate(speakers)]


def test_a_thread_of_many_commenters_keeps_its_speaker_hash_bounded_and_its_windows_labels(
        client: redis.Redis, prefix: str) -> None:
    """A thread where nearly every comment is a new commenter (the host every third): the speaker hash stays under
    the bound, and every window is labelled exactly as a store that never forgets would label it."""
    speakers = ["Host" if n % 3 == 0 else f"commenter-{n}" for n in range(600)]
    bounded = ConversationStore(client, prefix=prefix, size=3, retain=5, ttl_s=600, max_speakers=16)
    unbounded = ConversationStore(client, prefix=f"{prefix}-all", size=3, retain=5, ttl_s=600, max_speakers=10_000)
    sizes = []
    for n, who in enumerate(speakers):
        [got] = bounded.append_many([("thread", StoredTurn(n, who, f"t{n}", f"m-{n}"))])
        [ref] = unbounded.append_many([("thread", StoredTurn(n, who, f"t{n}", f"m-{n}"))])
        assert got.window == ref.window  # same turns, same Speaker_k: prompts and cached prefixes unchanged
        assert [t.as_prompt_turn() for t in got.window] == [t.as_prompt_turn() for t in ref.window]
        sizes.append(client.hlen(bounded.speakers_key("thread")))
    assert max(sizes) <= 16 + 1  # the bound, plus the field holding the next number
    assert client.hlen(unbounded.speakers_key("thread")) == 401 + 1  # the host and 400 commenters, never trimmed
    assert {t.speaker_id for t in bounded.get("thread") if t.speaker == "Host"} == {0}  # present all along
    retained = {t.speaker for t in bounded.get("thread")}
    numbers = client.hgetall(bounded.speakers_key("thread"))
    assert retained <= {k.decode() for k in numbers}  # the retained turns' speakers are never forgotten
    assert 0 < client.ttl(bounded.speakers_key("thread")) <= 600


def test_a_forgotten_speaker_who_returns_gets_a_new_number_never_one_a_retained_turn_carries(
        client: redis.Redis, prefix: str) -> None:
    store = ConversationStore(client, prefix=prefix, size=3, retain=4, ttl_s=600, max_speakers=6)
    updates = _thread(store, "t", ["Ann", *[f"c{n}" for n in range(1, 12)]])  # Ann (0) leaves the retained turns
    assert updates[0].window[-1].speaker_id == 0
    assert not client.hexists(store.speakers_key("t"), "Ann")  # forgotten once the hash outgrew 6
    back = _append(store, "t", StoredTurn(12, "Ann", "I'm back", "m-12"))
    window_ids = [t.speaker_id for t in back.window]
    assert back.window[-1].speaker_id == 12 and len(set(window_ids)) == len(window_ids)  # next in line, no clash
    # the retained speakers kept the numbers they were given on first appearance
    assert {t.speaker: t.speaker_id for t in store.get("t")} == {"c9": 9, "c10": 10, "c11": 11, "Ann": 12}


def test_speaker_numbers_are_rebuilt_from_the_turns_when_the_hash_alone_was_evicted(
        client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=5)
    _thread(store, "c", ["Ann", "Bob", "Cy", "Bob"])
    client.delete(store.speakers_key("c"))  # what maxmemory's eviction may do to one key of the three
    again = _append(store, "c", StoredTurn(4, "Ann", "still here", "m-4"))
    new = _append(store, "c", StoredTurn(5, "Dee", "hello", "m-5"))
    assert again.window[-1].speaker_id == 0 and new.window[-1].speaker_id == 3  # Ann keeps 0, Dee after Cy (2)
    assert {t.speaker: t.speaker_id for t in store.get("c")} == {"Ann": 0, "Bob": 1, "Cy": 2, "Dee": 3}


def test_a_speaker_hash_written_before_the_counter_numbers_on_from_its_size(client: redis.Redis, prefix: str) -> None:
    store = _store(client, prefix, size=3, retain=5)
    client.hset(store.speakers_key("old"), mapping={"Ann": 0, "Bob": 1})  # an older version's hash: no counter
    assert _append(store, "old", StoredTurn(7, "Bob", "hi", "m-7")).window[-1].speaker_id == 1
    assert _append(store, "old", StoredTurn(8, "Cy", "hey", "m-8")).window[-1].speaker_id == 2


def test_the_decode_cache_holds_at_most_its_bound_and_the_settings_reach_the_store(client, prefix) -> None:
    from core.settings import Settings

    store = ConversationStore(client, prefix=prefix, size=3, retain=5, ttl_s=600, decode_cache_turns=4)
    for n in range(10):
        _append(store, "c", _turn(n))
    assert store._decode.cache_info().currsize == 4 and store._decode.cache_info().maxsize == 4
    settings = Settings().with_overrides(redis={"key_prefix": prefix}, conversation={
        "max_speakers": 7, "decode_cache_turns": 9, "retain_turns": 30, "ttl_s": 60})
    configured = ConversationStore.configured(client, settings)
    assert (configured.prefix, configured.size, configured.retain, configured.ttl_s) == (prefix, 23, 30, 60)
    assert configured.max_speakers == 30 and configured._decode.cache_info().maxsize == 9  # never under retain
