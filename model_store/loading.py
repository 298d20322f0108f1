"""Build the configured backend and choose its adapter: the one place serving and evaluation load models."""

from __future__ import annotations

from pathlib import Path

from core.settings import ModelSettings, Settings
from model_store.base_models import resolve_base
from model_store.registry import Registry, resolve_adapter
from scoring.adapters import AdapterChoice
from scoring.backends.base import Backend

#: ``--adapter none`` (or ``ERC_MODEL__ADAPTER=none``) serves the base model zero-shot.
NO_ADAPTER = "none"


def choose_adapter(settings: Settings, adapter: str | None = None) -> AdapterChoice:
    """``adapter`` (or ``settings.model.adapter``): a name/path, ``none``, or unset = the registry's active one."""
    import json

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
    from scoring.calibration import Calibration

    return AdapterChoice(ref, demos, Calibration.from_dict(meta.get("calibration")), meta.get("label_set"),
                         meta.get("layout", "instructerc"))


def load_backend(settings: Settings, model: ModelSettings | None = None) -> Backend:
    """The base model behind ``settings.model.backend`` (adapters are added by the caller)."""
    model = model or settings.model
    if model.backend == "null":
        from scoring.backends.null import NullBackend

        return NullBackend()
    base_dir = resolve_base(model.base, settings.store.dir)
    if model.backend == "vllm":
        from scoring.backends.vllm import VLLMBackend

        return VLLMBackend(base_dir, model_id=Path(model.base).name, settings=settings.vllm)
    from scoring.backends.hf import HFBackend

    return HFBackend(
        base_dir, model_id=Path(model.base).name, device=model.device, dtype=model.dtype, threads=model.threads,
        prefix_cache_mb=model.prefix_cache_mb, merge_adapter=model.merge_adapter,
        packed=model.packed_forward,
    )
