"""Device check of the transformers backend: correctness and batched label-scoring throughput, in one call.

Meant for a lent GPU box that has torch, transformers and peft but no vLLM, no network and none of the
project's weights (only the repository tree travels). So the model is a randomly initialised
``LlamaForCausalLM`` with SmolLM2-135M's configuration (written out below), and prompts are random token
ids: no tokenizer, no store. The scoring itself is the project's: ``HFBackend`` (left padding with
explicit positions, ``logits_to_keep=1``, peft adapters) and ``ChoicePlan`` (constrained greedy decoding
over the label trie), reached through a subclass that takes prompts as token ids.

Checks, per dtype (fp32, bf16):
- a padded batch scores like each prompt alone (max |dp|), with a deeper-branching label set included;
- a random LoRA adapter (q/k/v/o, non-zero B) moves the scores, and a batch mixing it with the base
  model scores like each half alone;
then times batched label scoring at batch sizes 1, 8, 32, 128 (~256-token prompts) and prints a table.

    bash bench/gpu_check.sh                      # on the GPU box (writes $OUT/gpu_check.json if OUT is set)
    bash bench/gpu_check.sh --device cpu --quick # anywhere, a small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

#: SmolLM2-135M(-Instruct)'s config.json, as converted into the store (the architecture, not the weights).
SMOLLM2_135M_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "unk_token_id": 0,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "use_cache": True,
    "vocab_size": 49152,
}

# Label "strings" -> token ids, as a tokenizer would give them for " " + label. MELD-like: 7 labels whose
# first tokens differ; EmoryNLP-like: multi-token labels, two of them sharing a first token (a second read).
VOCAB = {
    " neutral": [7598], " surprise": [9014], " fear": [4796], " sad": [8230], " joyful": [20460],
    " disgust": [27003], " angry": [9355],
    " Joyful": [9520, 1166], " Mad": [12133], " Peaceful": [18711, 1166], " Scared": [1155, 1892],
    " Scary": [1155, 532], " Sad": [14390],
}
MELD = ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry")
EMORY = ("Joyful", "Mad", "Peaceful", "Scared", "Scary", "Sad")


def _ensure_structlog() -> None:
    """The GPU box may lack structlog (the backend only logs with it): a silent stand-in then."""
    try:
        import structlog  # noqa: F401
    except ImportError:
        class _Quiet:
            def __getattr__(self, name):
                return lambda *a, **k: None

        sys.modules["structlog"] = types.SimpleNamespace(get_logger=lambda *a, **k: _Quiet())


def build_backend(device: str, dtype: torch.dtype, seed: int = 0, layers: int | None = None):
    """An HFBackend around a random SmolLM2-135M-shaped model; prompts are strings of space-separated token ids."""
    _ensure_structlog()
    from transformers import LlamaConfig, LlamaForCausalLM

    from scoring.backends.base import TokenCounter
    from scoring.backends.choices import ChoicePlan
    from scoring.backends.hf import HFBackend
    from scoring.backends.packed import supports as supports_packed

    class TokenIdBackend(HFBackend):
        def __init__(self, model) -> None:  # no tokenizer, no files: what HFBackend.__init__ sets up otherwise
            self.model_id = "random-smollm2-135m"
            self.device = torch.device(device)
            self.tokenizer = types.SimpleNamespace(pad_token_id=SMOLLM2_135M_CONFIG["pad_token_id"])
            self.model = model
            self._peft = None
            self._adapters = {}
            self._plans = {}
            self.tokens = TokenCounter()
            self.prefix_cache = None  # random prompts share no prefixes
            self.merge_adapter, self._merged = False, None
            self.packed = supports_packed(model)  # the serving default: one packed sequence per micro-batch

        def encode_prompts(self, prompts):
            return [[int(t) for t in p.split()] for p in prompts]

        def plan(self, choices):
            plan = self._plans.get(choices)
            if plan is None:
                plan = self._plans[choices] = ChoicePlan.build(choices, VOCAB.__getitem__)
            return plan

        def count_tokens(self, text: str) -> int:
            return len(text.split())

    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in SMOLLM2_135M_CONFIG.items() if k != "architectures"})
    if layers:
        config.num_hidden_layers = layers
    model = LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()
    return TokenIdBackend(model)


def random_adapter(backend, out: Path, seed: int = 1) -> Path:
    """A peft LoRA (r=8, alpha 16, q/k/v/o) on a copy of the model's config, B ~ N(0, 0.02): saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    shadow = LlamaForCausalLM(backend.model.config)
    peft = get_peft_model(shadow, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    peft.save_pretrained(out)
    return out


def random_prompts(n: int, length: int, seed: int) -> list[str]:
    """``n`` prompts of random token ids, lengths spread over [3/4 length, length] (so batches are padded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, length * 3 // 4), length + 1, (n,), generator=g).tolist()
    return [" ".join(map(str, torch.randint(3, 49152, (L,), generator=g).tolist())) for L in lengths]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def correctness(backend, adapter_dir: Path, length: int, tol: float) -> dict:
    from scoring.backends.base import ScoreRequest

    prompts = random_prompts(6, length, seed=11)
    requests = [ScoreRequest(p, MELD if i % 2 == 0 else EMORY) for i, p in enumerate(prompts)]
    batched = backend.score(requests)
    alone = [backend.score([r])[0] for r in requests]
    pad_diff = max(abs(a - b) for x, y in zip(batched, alone) for a, b in zip(x, y))
    sums = max(abs(sum(x) - 1) for x in batched)

    backend.add_adapter("lora", adapter_dir)
    with_adapter = [ScoreRequest(r.prompt, r.choices, "lora") for r in requests]
    lora_alone = [backend.score([r])[0] for r in with_adapter]
    moved = max(abs(a - b) for x, y in zip(lora_alone, alone) for a, b in zip(x, y))
    mixed = backend.score([r for pair in zip(requests, with_adapter) for r in pair])
    want = [p for pair in zip(alone, lora_alone) for p in pair]
    mixed_diff = max(abs(a - b) for x, y in zip(mixed, want) for a, b in zip(x, y))
    ok = pad_diff < tol and sums < 1e-4 and moved > 1e-4 and mixed_diff < tol
    return {"padded_vs_alone_max_dp": pad_diff, "max_sum_error": sums, "adapter_moves_max_dp": moved,
            "mixed_adapter_batch_vs_alone_max_dp": mixed_diff, "tolerance": tol, "ok": ok}


def throughput(backend, device: str, batch: int, length: int, min_seconds: float, adapter: str | None) -> dict:
    from scoring.backends.base import ScoreRequest

    requests = [ScoreRequest(p, MELD, adapter) for p in random_prompts(batch, length, seed=batch)]
    tokens = sum(len(r.prompt.split()) for r in requests)
    backend.score(requests)  # warm-up (kernels, allocator)
    _sync(device)
    reps, started = 0, time.perf_counter()
    while True:
        backend.score(requests)
        _sync(device)
        reps += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds or reps >= 50:
            break
    per_batch = elapsed / reps
    return {"batch": batch, "adapter": adapter, "ms_per_batch": round(1000 * per_batch, 2),
            "prompts_per_s": round(batch / per_batch, 1), "tokens_per_s": round(tokens / per_batch),
            "mean_prompt_tokens": round(tokens / batch, 1), "reps": reps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true", help="small batches and prompts: a smoke run (CPU)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32,128)")
    ap.add_argument("--length", type=int, default=None, help="prompt length in tokens (default 256)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default 30, as SmolLM2-135M; 2 with --quick)")
    ap.add_argument("--min-seconds", type=float, default=None, help="time each cell for at least this long")
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default $OUT/gpu_check.json if OUT is set)")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(b) for b in (args.batches or ("1,4" if args.quick else "1,8,32,128")).split(",")]
    length = args.length or (48 if args.quick else 256)
    layers = args.layers or (2 if args.quick else SMOLLM2_135M_CONFIG["num_hidden_layers"])
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.0 if args.quick else 1.0)
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)

    env = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    import transformers

    env["transformers"] = transformers.__version__
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    print("gpu_check:", ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    result: dict = {"env": env, "quick": args.quick, "length": length, "layers": layers, "checks": {}, "timings": []}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            started = time.perf_counter()
            backend = build_backend(device, dtype, layers=layers)
            adapter_dir = random_adapter(backend, Path(tmp) / f"lora-{dtype_name}")
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            # fp32 padded vs alone agrees to ~1e-5; bf16 rounds differently per batch shape
            check = correctness(backend, adapter_dir, min(length, 64), tol=1e-3 if dtype == torch.float32 else 5e-2)
            result["checks"][dtype_name] = check
            failed |= not check["ok"]
            print(f"[{dtype_name}] checks: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in check.items()), flush=True)
            for batch in batches:
                for adapter in (None, "lora"):
                    row = throughput(backend, device, batch, length, min_seconds, adapter)
                    row["dtype"] = dtype_name
                    if device.startswith("cuda"):
                        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
                    result["timings"].append(row)
            print(f"[{dtype_name}] done in {time.perf_counter() - started:.1f}s", flush=True)
            del backend
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    print()
    print(f"batched label scoring, {device}, random SmolLM2-135M-shaped model ({layers} layers), "
          f"~{length}-token prompts, 7 labels (one read)")
    header = f"{'dtype':<9} {'adapter':<7} {'batch':>5} {'ms/batch':>10} {'prompts/s':>10} {'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    for r in result["timings"]:
        print(f"{r['dtype']:<9} {r['adapter'] or '-':<7} {r['batch']:>5} {r['ms_per_batch']:>10.1f} "
              f"{r['prompts_per_s']:>10.1f} {r['tokens_per_s']:>10}")
    result["ok"] = not failed
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"\nwritten to {out}")
    print("gpu_check:", "OK" if not failed else "FAILED (see checks above)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
