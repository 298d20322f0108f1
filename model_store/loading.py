"""Build the configured backend and choose its adapter: the one place serving and evaluation load models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from erc_stream.settings import ModelSettings, Settings
from model_store.backends.base import Backend
from model_store.base_models import resolve_base

if TYPE_CHECKING:
    from model_store.calibration import Calibration
    from model_store.retrieval import DemoIndex

#: Adapters committed with the project (LoRA weights only).
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"
#: ``--adapter none`` (or ``ERC_MODEL__ADAPTER=none``) serves the base model zero-shot.
NO_ADAPTER = "none"


@dataclass(frozen=True)
class AdapterRef:
    name: str
    path: Path


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter a labeler uses (None = zero-shot), the demonstration index and the label-prior
    correction trained with it."""

    ref: AdapterRef | None
    demos: "DemoIndex | None" = None
    calibration: "Calibration | None" = None
    label_set: str | None = None  # the label set it was trained for (its erc_meta.json), when known

    @property
    def name(self) -> str | None:
        return self.ref.name if self.ref else None


def resolve_adapter(adapter: str, store_dir: Path) -> AdapterRef:
    """An adapter given as a directory, a name in the store, or a name shipped with the project."""
    candidate = Path(adapter).expanduser()
    if (candidate / "adapter_config.json").exists():
        return AdapterRef(candidate.name, candidate)
    for root in (store_dir / "adapters", SHIPPED_ADAPTERS):
        if (root / adapter / "adapter_config.json").exists():
            return AdapterRef(adapter, root / adapter)
    raise FileNotFoundError(
        f"adapter {adapter!r} is neither an adapter directory nor in {store_dir / 'adapters'} or {SHIPPED_ADAPTERS}"
    )


def choose_adapter(settings: Settings, adapter: str | None = None) -> AdapterChoice:
    """``adapter`` (or ``settings.model.adapter``): a name/path, ``none``, or unset = the registry's active one."""
    import json

    from model_store.registry import Registry

    wanted = adapter if adapter is not None else settings.model.adapter
    if settings.model.backend == "null" or wanted == NO_ADAPTER:
        return AdapterChoice(None)
    ref = (resolve_adapter(wanted, settings.store.dir) if wanted
           else Registry(settings.store.dir).active(settings.model.label_set))
    if ref is None:
        return AdapterChoice(None)
    demos = None
    meta_file = ref.path / "erc_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if meta.get("demonstrations") and (ref.path / "demos" / "items.json").exists():
        from model_store.retrieval import DemoIndex

        demos = DemoIndex.load(ref.path / "demos")
    from model_store.calibration import Calibration

    return AdapterChoice(ref, demos, Calibration.from_dict(meta.get("calibration")), meta.get("label_set"))


def load_backend(settings: Settings, model: ModelSettings | None = None) -> Backend:
    """The base model behind ``settings.model.backend`` (adapters are added by the caller)."""
    model = model or settings.model
    if model.backend == "null":
        from model_store.backends.null import NullBackend

        return NullBackend()
    base_dir = resolve_base(model.base, settings.store.dir)
    if model.backend == "vllm":
        from model_store.backends.vllm import VLLMBackend

        return VLLMBackend(base_dir, model_id=Path(model.base).name, settings=settings.vllm)
    from model_store.backends.hf import HFBackend

    return HFBackend(
        base_dir, model_id=Path(model.base).name, device=model.device, dtype=model.dtype, threads=model.threads,
        prefix_cache_mb=model.prefix_cache_mb, merge_adapter=model.merge_adapter,
    )
