"""Bytes per entry of each in-process cache of the stream and its readers, measured with ``tracemalloc``.

The capacity plan (docs/capacity.md, "Process memory") sizes a process from these figures. Each cache is
filled through its own code path with ``--entries`` distinct entries (MELD-like texts from ``producer_sim``, uuid
event ids, conversation keys as the stream writes them), and the Python heap's growth is divided by the entries
the cache holds at the end. Every cache is bounded; each figure comes with its bound and the memory at that bound:

- the conversation store's decode cache (``conversation.decode_cache_turns``): a stored member's bytes, its
  decoded ``StoredTurn`` and the prompt ``Turn`` built from it (texts included);
- the alert engine's per-tenant settings (one ``AlertSettings`` per tenant of ``alerts.tenants``; a tenant read
  from a message that is not configured adds nothing, checked here too);
- the tenant routes (``model.tenants``): a tenant on a shared route (a dict entry) and a route of its own (a
  labeler and a prompt builder; its adapter's weights are the backend's, not counted);
- the readers' deduplicator (``export.dedupe_ids``): one ``event_id``;
- the producer's partitioner cache (``CachingPartitioner.MAX_KEYS``, a constant of consumer/delivery.py): one
  conversation key and its hash.

Each cache is filled to its bound (the settings' defaults) unless ``--entries`` caps it: a dict's bytes per entry
depend on how full its table is, so the figure at the bound is the one to plan with. Runs on the CPU alone,
without Redis or a broker (the Redis client is never connected); ~1 GiB of memory at the default bounds::

    python -m bench.process_memory --json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

from core.settings import Settings


def _heap_growth(fill: Callable[[], object]) -> tuple[int, object]:
    """Bytes the Python heap holds after ``fill()`` beyond what it held before (what ``fill`` returned is kept)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = fill()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def _per_entry(grown: int, entries: int, bound: int) -> dict[str, object]:
    per = grown / entries
    return {"entries": entries, "bytes_per_entry": round(per, 1), "bound": bound,
            "mib_at_bound": round(per * bound / 2**20, 1)}


def decode_cache(settings: Settings, entries: int) -> dict[str, object]:
    """The conversation store's decode cache, filled as the stream fills it: members as Redis returns them."""
    import redis

    from bench.consumer_throughput import make_messages
    from consumer.conversation_store import ConversationStore, StoredTurn, member_rest

    entries = min(entries, settings.conversation.decode_cache_turns)
    msgs = make_messages(entries, max(1, entries // 24), seed=1)
    store = ConversationStore(redis.Redis(), prefix="mem", size=settings.window.span,
                              retain=settings.conversation.retain_turns, ttl_s=60, decode_cache_turns=entries)

    def fill() -> None:
        for m in msgs:
            t = StoredTurn(m.turn, m.speaker, m.text, m.message_id)
            member = ('{"t":%d,"k":%d,' % (m.turn, m.turn % 3) + member_rest(t)).encode()  # the script's format
            store._decode(member).as_prompt_turn()  # the prompt turn is cached on the stored turn

    grown, _ = _heap_growth(fill)
    info = store._decode.cache_info()
    out = _per_entry(grown, info.currsize, settings.conversation.decode_cache_turns)
    out["avg_text_chars"] = round(sum(len(m.text) for m in msgs) / len(msgs), 1)
    return out


def alert_tenant_settings(settings: Settings, tenants: int) -> dict[str, object]:
    """The alert engine's settings of configured tenants, and the growth from unconfigured ones (none)."""
    import redis

    from consumer.alerts import AlertEngine

    names = [f"tenant-{i}" for i in range(tenants)]
    alerts = settings.alerts.model_copy(update={"tenants": {n: {"streak_length": 4} for n in names}})
    engine = AlertEngine(redis.Redis(), alerts, prefix="mem", ttl_s=60)

    def look_up(tenant_names: list[str]) -> None:  # what evaluate does for each event's tenant
        for name in tenant_names:
            engine.settings_for(name)

    grown, _ = _heap_growth(lambda: look_up(names))
    out: dict[str, object] = {"entries": len(engine._by_tenant), "bytes_per_entry": round(grown / len(names), 1),
                              "bound": "alerts.tenants (configured tenants)"}
    strangers = [f"stranger-{i}" for i in range(tenants)]
    out["bytes_for_as_many_unconfigured_tenants"], _ = _heap_growth(lambda: look_up(strangers))
    return out


def tenant_routes(settings: Settings, tenants: int) -> dict[str, object]:
    """``Routes`` of ``tenants`` configured tenants on one shared route, then each on a route of its own."""
    from scoring.adapters import AdapterChoice
    from scoring.backends.null import NullBackend
    from scoring.routes import Routes

    def choose(_settings):  # never called here: routes are built, adapters not chosen
        return AdapterChoice(None)

    def build(adapter_of: Callable[[int], str]) -> int:
        model = {"tenants": {f"tenant-{i}": {"adapter": adapter_of(i), "label_set": "unified"} for i in range(tenants)}}
        configured = settings.with_overrides(model=model)
        empty = settings.with_overrides(model={"tenants": {}})
        base, _ = _heap_growth(lambda: Routes(empty, NullBackend(), choose=choose))
        grown, routes = _heap_growth(lambda: Routes(configured, NullBackend(), choose=choose))
        assert len(routes._by_tenant) == tenants  # type: ignore[attr-defined]
        return grown - base

    shared, own = build(lambda _i: "shared"), build(lambda i: f"adapter-{i}")
    return {"tenants": tenants, "bytes_per_tenant_on_a_shared_route": round(shared / tenants, 1),
            "bytes_per_tenant_with_its_own_route": round(own / tenants, 1),
            "bound": "model.tenants (configured tenants)"}


def deduper(settings: Settings, entries: int) -> dict[str, object]:
    """The readers' and the exporter's ``Deduper``: uuid event ids, as the output topic carries them."""
    from core.readers import Deduper

    entries = min(entries, settings.export.dedupe_ids)
    ids = [str(uuid.uuid4()) for _ in range(entries)]
    d = Deduper(entries)

    def fill() -> None:
        for i in ids:
            d.first(i)

    grown, _ = _heap_growth(fill)
    # The ids were allocated before the measure; the deduper keeps them, so they count: one str each.
    grown += sum(sys.getsizeof(i) for i in ids)
    return _per_entry(grown, len(d._seen), settings.export.dedupe_ids)


def partitioner(entries: int) -> dict[str, object]:
    """``CachingPartitioner``'s key -> hash map, keys as the stream produces them (a conversation id's bytes)."""
    from consumer.delivery import CachingPartitioner

    class _Cluster:
        def topics(self) -> set[str]:
            return {"t"}

        def partitions_for_topic(self, _topic: str) -> set[int]:
            return set(range(8))

    p, cluster = CachingPartitioner(), _Cluster()
    entries = min(entries, p.MAX_KEYS)

    def fill() -> None:
        for i in range(entries):
            key = f"conv-{uuid.uuid4().hex[:12]}".encode()
            p.partition("t", None, key, None, None, cluster)

    grown, _ = _heap_growth(fill)
    return _per_entry(grown, len(p._hashes), CachingPartitioner.MAX_KEYS)


def _cpu() -> str:
    """The CPU's model name and whether it has AVX-512 BF16 (Linux; the figures hardly depend on it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    cores = info.count("\nprocessor") + info.startswith("processor")
    return f"{name}, {cores} vCPUs" + (", AVX-512 BF16" if "avx512_bf16" in info else "")


def measure(entries: int, tenants: int) -> dict[str, object]:
    settings = Settings()
    return {
        "python": platform.python_version(),
        "cpu": _cpu(),
        "decode_cache": decode_cache(settings, entries),
        "alert_tenant_settings": alert_tenant_settings(settings, tenants),
        "tenant_routes": tenant_routes(settings, tenants),
        "deduper": deduper(settings, entries),
        "partitioner": partitioner(entries),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=sys.maxsize, help="at most this many entries per cache (default: "
                   "each cache's bound)")
    p.add_argument("--tenants", type=int, default=200, help="configured tenants (alert settings, routes)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from core.logs import configure

    configure("WARNING")
    result = measure(a.entries, a.tenants)
    print(json.dumps(result) if a.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
