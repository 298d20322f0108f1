"""Build the configured backend and find adapters: the one place serving and evaluation load models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erc_stream.settings import ModelSettings, Settings
from model_store.backends.base import Backend
from model_store.base_models import resolve_base

#: Adapters committed with the project (LoRA weights only).
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"


@dataclass(frozen=True)
class AdapterRef:
    name: str
    path: Path


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


def load_backend(settings: Settings, model: ModelSettings | None = None) -> Backend:
    """The backend named by ``settings.model.backend``, with its adapter loaded when one is set."""
    model = model or settings.model
    if model.backend == "null":
        from model_store.backends.null import NullBackend

        return NullBackend()
    from model_store.backends.hf import HFBackend

    base_dir = resolve_base(model.base, settings.store.dir)
    backend = HFBackend(
        base_dir, model_id=Path(model.base).name, device=model.device, dtype=model.dtype, threads=model.threads
    )
    if model.adapter:
        ref = resolve_adapter(model.adapter, settings.store.dir)
        backend.add_adapter(ref.name, ref.path)
    return backend
