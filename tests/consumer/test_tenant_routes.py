"""One consumer, one backend, several tenants: each tenant's messages are labelled by its own adapter and
label set, in the same batches (real broker, real Redis, the real embedded model and two real adapters)."""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

import pytest

from consumer.app import StreamApp
from core.labels import get_label_set
from core.records import ChatMessage, EmotionEvent
from core.settings import Settings
from model_store.loading import choose_adapter
from model_store.registry import Registry
from producer_sim.replay import interleave, to_messages
from producer_sim.synthetic import templates
from scoring.backends.base import ScoreRequest
from scoring.backends.null import NullBackend
from scoring.prompts import PromptBuilder, Turn
from scoring.routes import Routes
from tests.app_threads import run_until
from tests.kafka_helpers import produce_raw, read_all

TURNS = 4
ROUTES = {"acme": {"adapter": "unified-lora", "label_set": "unified"},
          "globex": {"adapter": "meld-lora", "label_set": "meld"}}


def _messages() -> list[ChatMessage]:
    """Two conversations of acme, one of globex, one without a tenant (the default route), interleaved."""
    convs = {c.conversation_id: c for c in templates()}
    run = f"tenants-{uuid.uuid4().hex[:8]}"
    per_conv = [msgs[:TURNS] for tenant, slug in (("acme", "late-delivery"), ("acme", "double-charge"),
                                                  ("globex", "password-reset"), (None, "product-launch-thread"))
                for msgs in to_messages([convs[slug]], run_id=run, tenant=tenant)]
    return list(interleave(per_conv, concurrency=len(per_conv), seed=1))


@pytest.mark.slow
def test_one_consumer_serves_each_tenant_its_own_adapter_and_labels(
    settings: Settings, own_hf_backend, lora_adapter: Path, unified_lora_adapter: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(lora_adapter, store / "adapters" / "meld-lora")
    shutil.copytree(unified_lora_adapter, store / "adapters" / "unified-lora")
    settings = settings.with_overrides(store={"dir": store}, batch={"micro_batch_size": 16, "max_wait_ms": 200},
                                       model={"adapter": "none", "label_set": "meld", "tenants": ROUTES})
    backend = own_hf_backend
    calls: list[set[str | None]] = []  # the adapters of each backend call
    score = backend.score
    backend.score = lambda requests: calls.append({r.adapter for r in requests}) or score(requests)

    app = StreamApp(settings, backend)
    app.routes.choose_adapters()
    messages = _messages()
    produce_raw(settings, settings.kafka.input_topic, [(m.conversation_id.encode(), m.to_bytes()) for m in messages])
    run_until(app, lambda: app.stats.events >= len(messages), timeout_s=180)
    backend.score = score

    events = {e.message_id: e for e in (EmotionEvent.from_bytes(r.value) for r in
                                        read_all(settings, settings.kafka.output_topic, len(messages)))}
    assert set(events) == {m.message_id for m in messages}
    expected_route = {"acme": ("unified", "unified-lora"), "globex": ("meld", "meld-lora"), None: ("meld", None)}
    by_message = {m.message_id: m for m in messages}
    for m in messages:
        e = events[m.message_id]
        label_set, adapter = expected_route[m.tenant]
        labels = get_label_set(label_set).labels
        assert (e.tenant, e.label_set, e.adapter) == (m.tenant, label_set, adapter)
        assert e.label in labels and set(e.probabilities) == set(labels)
        assert math.isclose(sum(e.probabilities.values()), 1.0, abs_tol=1e-4)
        assert e.gold_label == get_label_set(label_set).map_gold(m.gold_label)
        assert e.event_id == EmotionEvent.make_id(tenant=m.tenant, conversation_id=m.conversation_id,
                                                  message_id=m.message_id, model=backend.model_id,
                                                  adapter=f"{adapter}@{e.adapter_version}" if adapter else None)
    assert "mad" in {events[m.message_id].gold_label for m in messages if m.tenant == "acme"}  # MELD's anger
    assert "angry" in {events[m.message_id].gold_label for m in messages if m.tenant == "globex"}
    # Batches mixed the routes, each in one backend call, and every tenant's scores are its own adapter's:
    # the same prompt scored alone through the route's adapter gives the event's probabilities.
    assert any(len(adapters) > 1 for adapters in calls), calls
    for e in events.values():
        m = by_message[e.message_id]
        turns = [Turn(o.speaker, o.text) for o in messages
                 if o.conversation_id == m.conversation_id and o.turn <= m.turn][-e.window:]
        prompt = PromptBuilder(get_label_set(e.label_set), max_tokens=settings.model.max_prompt_tokens,
                               count_tokens=backend.count_tokens).emotion(turns)
        key = f"{e.adapter}@{e.adapter_version}" if e.adapter else None
        [alone] = backend.score([ScoreRequest(prompt.text, prompt.choices, key)])
        assert max(abs(p - e.probabilities[c]) for c, p in zip(prompt.choices, alone)) < 1e-4, e.message_id
    assert {(s.labels["adapter"], s.labels["label_set"]) for s in _adapter_info(app)} == {
        ("unified-lora", "unified"), ("meld-lora", "meld"), ("none", "meld")}


def _adapter_info(app: StreamApp):
    return [s for metric in app.metrics.registry.collect() if metric.name == "erc_adapter_info"
            for s in metric.samples if s.value == 1]


def test_tenants_sharing_a_route_share_its_labeler_and_others_take_the_default() -> None:
    settings = Settings().with_overrides(model={"backend": "null", "tenants": {
        "a": {"label_set": "unified"}, "b": {"label_set": "unified"}, "c": {"label_set": "meld"}}})
    routes = Routes(settings, NullBackend(), choose=choose_adapter)
    assert len(routes.routes) == 2  # c's route is the default one (adapter unset, meld)
    assert routes.labeler("a") is routes.labeler("b") is not routes.default.labeler
    assert routes.labeler("c") is routes.labeler("zzz") is routes.labeler(None) is routes.default.labeler
    assert routes.labeler("a").label_set.name == "unified"
    windows = [[Turn("A", "hi")], [Turn("B", "oh no")], [Turn("A", "fine")]]
    results = routes.label(windows, ["a", None, "b"])
    assert [set(r.probabilities) for r in results] == [
        set(get_label_set(n).labels) for n in ("unified", "meld", "unified")]


@pytest.mark.slow
def test_a_route_without_an_adapter_follows_its_label_sets_promotions(
    own_hf_backend, lora_adapter: Path, unified_lora_adapter: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(lora_adapter, store / "adapters" / "meld-lora")
    shutil.copytree(unified_lora_adapter, store / "adapters" / "unified-lora")
    settings = Settings().with_overrides(store={"dir": store}, model={
        "tenants": {"acme": {"label_set": "unified"}, "globex": {"adapter": "meld-lora", "label_set": "meld"}}})
    routes = Routes(settings, own_hf_backend, choose=choose_adapter)
    routes.choose_adapters()
    default = choose_adapter(settings).name  # the registry's (here: the shipped) meld adapter
    unified = choose_adapter(settings.with_overrides(model={"label_set": "unified"})).name  # the shipped one
    assert [routes.labeler(t).adapter for t in ("acme", "globex", None)] == [unified, "meld-lora", default]

    Registry(store).promote("unified-lora")  # unified, from its metadata
    assert routes.follow_registry()
    assert [routes.labeler(t).adapter for t in ("acme", "globex", None)] == ["unified-lora", "meld-lora", default]
    assert not routes.follow_registry()  # nothing new
    Registry(store).promote("meld-lora")  # the default route follows meld; globex is pinned anyway
    assert routes.follow_registry()
    assert [routes.labeler(t).adapter for t in ("acme", "globex", None)] == ["unified-lora", "meld-lora", "meld-lora"]
