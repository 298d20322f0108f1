"""Per-tenant routes: which labeler (adapter and label set) labels a message, all on one backend.

``model.tenants`` gives a tenant its own adapter and label set; every other message (another tenant's,
or one without a tenant) takes the default route, ``model.adapter`` / ``model.label_set``. Tenants with
the same (adapter, label set) share one labeler. A micro-batch mixing routes is still scored in ONE
backend call: each request names its adapter, and both backends serve several LoRA adapters in a call
(vLLM in one engine step, transformers in one forward per adapter). A route whose adapter is unset
follows the registry's active adapter for its label set. Which adapter a route gets is the caller's
``choose`` (the model store's ``choose_adapter`` in the product): the scoring path does not know the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from core.labels import get_label_set
from core.settings import ModelSettings, Settings
from scoring.adapters import AdapterChooser
from scoring.backends.base import Backend
from scoring.labeler import Failed, Labeler, Labelled, label_together
from scoring.prompts import PromptBuilder, Turn

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Route:
    """One labeler and the settings it was built from (``settings.model`` is the route's own view)."""

    settings: Settings
    labeler: Labeler

    @property
    def follows_registry(self) -> bool:
        return self.settings.model.adapter is None and self.settings.model.backend != "null"


class Routes:
    """The default route and one route per distinct (adapter, label set) of ``model.tenants``."""

    def __init__(self, settings: Settings, backend: Backend, *, choose: AdapterChooser,
                 adapter: str | None = None) -> None:
        """``choose``: a route's adapter from its settings; ``adapter``: the default route's adapter name until
        adapters are chosen (none are loaded here)."""
        self._choose = choose
        self.default = _route(settings, settings.model, backend, adapter)
        routes = {_key(settings.model): self.default}
        self._by_tenant: dict[str, Labeler] = {}
        for tenant in settings.model.tenants:
            model = settings.model.for_tenant(tenant)
            route = routes.get(_key(model))
            if route is None:
                route = routes[_key(model)] = _route(settings, model, backend, None)
            self._by_tenant[tenant] = route.labeler
        self.routes: tuple[Route, ...] = tuple(routes.values())

    def labeler(self, tenant: str | None) -> Labeler:
        """The labeler of a tenant's messages."""
        return self._by_tenant.get(tenant, self.default.labeler) if tenant is not None else self.default.labeler

    def label(self, windows: Sequence[Sequence[Turn]], tenants: Sequence[str | None]) -> list[Labelled | Failed]:
        """Label each window by its tenant's route, every route in one backend call."""
        if len(self.routes) == 1:  # the common deployment: exactly the single labeler's path
            return self.default.labeler.label(windows)
        groups: dict[Labeler, list[int]] = {}
        for i, tenant in enumerate(tenants):
            groups.setdefault(self.labeler(tenant), []).append(i)
        results: list[Labelled | Failed | None] = [None] * len(windows)
        labelled = label_together([(labeler, [windows[i] for i in idx]) for labeler, idx in groups.items()])
        for idx, got in zip(groups.values(), labelled):
            for i, result in zip(idx, got):
                results[i] = result
        return [r for r in results if r is not None]

    def choose_adapters(self) -> None:
        """Load every route's adapter: its pinned one, 'none', or the registry's active one for its label set."""
        for route in self.routes:
            _use(route, self._choose, "adapter chosen")

    def follow_registry(self) -> bool:
        """After a promotion: switch each route that follows the registry to its label set's active adapter.

        True when any route switched."""
        switched = False
        for route in self.routes:
            if route.follows_registry:
                switched |= _use(route, self._choose, "adapter promoted; switching", only_if_changed=True)
        return switched

    @property
    def follow_any(self) -> bool:
        return any(r.follows_registry for r in self.routes)


def _key(model: ModelSettings) -> tuple[str | None, str]:
    return model.adapter, model.label_set


def _route(settings: Settings, model: ModelSettings, backend: Backend, adapter: str | None) -> Route:
    builder = PromptBuilder.configured(settings, get_label_set(model.label_set), backend.count_tokens, model=model)
    return Route(settings.model_copy(update={"model": model}), Labeler(backend, builder, adapter=adapter))


def _use(route: Route, choose: AdapterChooser, message: str, *, only_if_changed: bool = False) -> bool:
    choice = choose(route.settings)
    labeler = route.labeler
    if only_if_changed and choice.key == labeler.adapter_key:
        return False
    label_set = route.settings.model.label_set
    if choice.label_set is not None and choice.label_set != label_set:
        # Served anyway (the prompt lists the route's labels), but it was trained to answer with others.
        log.warning("adapter trained for another label set", adapter=choice.name, trained_for=choice.label_set,
                    label_set=label_set)
    log.info(message, label_set=label_set, old=labeler.adapter_key, new=choice.key)
    labeler.use(choice)
    return True
