"""vLLM backend: one engine, LoRA adapters mixed within a batch, prefix caching, label scoring without generation.

Scoring is the same constrained greedy decoding over the choices' token trie as the transformers
backend (:mod:`scoring.backends.choices`). Each (prompt, branch prefix) becomes one vLLM request:

- the prompt is given as token ids (the prompt's ids from the same tokenizer call as the transformers
  backend, then the branch prefix), so both backends see identical tokens;
- ``max_tokens=1``, greedy, ``allowed_token_ids`` = the sibling tokens at that node and
  ``logprobs`` = their number. The engine runs with ``logprobs_mode="processed_logprobs"``: the
  returned log-probabilities are those *after* the allowed-token mask, so the top-k are exactly the
  siblings. (vLLM's default, ``raw_logprobs``, returns the unmasked distribution and its top-k, where
  a sibling may be missing.) They are renormalised over the siblings in :class:`ChoicePlan` either way;
- each request carries its own ``LoRARequest`` (or none), so a batch mixes adapters in one engine step.

Prompts keep their shared part first (the instruction, then a conversation's history), so with
prefix caching on, consecutive turns of a conversation and the rows of one prompt's deeper branches
reuse the prompt's KV cache. Only whole KV blocks are shared, so on CPU the block size is 32 tokens
(vLLM's CPU default, 128, is longer than most of our shared prefixes).

On CPU, LoRA runs through :mod:`scoring.backends.vllm_cpu_lora`, a vLLM plugin (an entry point
of this package) that replaces vLLM's per-token LoRA gathers with one matmul per adapter: ~5x faster
prefill with an adapter, and a base row next to ``max_loras`` adapters no longer picks up the last
adapter's delta.

``vllm`` is imported only when a backend is built: on CPU boxes it comes from the ``vllm-cpu`` extra,
on GPU boxes from the ``vllm`` extra. The engine runs in a spawned process, so a script that builds
one needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import structlog

from core.settings import VLLMSettings
from scoring.backends.base import ScoreRequest, TokenCounter
from scoring.backends.choices import ChoicePlan
from scoring.hardware import auto_dtype

log = structlog.get_logger(__name__)

#: The most sibling tokens one branch node may have (the engine's ``max_logprobs``).
MAX_SIBLINGS = 64
#: KV-cache block size on CPU (a multiple of 32 there): the granularity of prefix caching.
CPU_BLOCK_SIZE = 32


class VLLMBackend:
    """Label scoring on a vLLM engine (CPU through ``vllm-cpu``, or GPU), with per-request LoRA adapters."""

    def __init__(self, model_dir: Path, *, model_id: str | None = None, settings: VLLMSettings | None = None) -> None:
        settings = settings or VLLMSettings()
        self.settings = settings
        self.model_id = model_id or Path(model_dir).name
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

        # vLLM logs to stdout by default (its engine process too): keep stdout for our output (``--json``).
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        dtype = settings.dtype if settings.dtype != "auto" else auto_dtype("cpu" if self.on_cpu else "cuda")
        from vllm import LLM

        engine_args: dict[str, object] = dict(
            model=str(model_dir),
            dtype=dtype,
            enable_lora=True,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
            enable_prefix_caching=settings.enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            max_logprobs=MAX_SIBLINGS,
            seed=0,
        )
        if self.on_cpu:
            # vLLM's CPU default is 128-token KV blocks, and only whole blocks are shared: our prompts' common
            # prefix (the ~33-token instruction, then a conversation's history) would rarely fill one.
            engine_args["block_size"] = CPU_BLOCK_SIZE
        else:
            engine_args["gpu_memory_utilization"] = settings.gpu_memory_utilization
        log.info("starting vLLM engine", model=str(model_dir), dtype=dtype, cpu=self.on_cpu,
                 max_loras=settings.max_loras, prefix_caching=settings.enable_prefix_caching)
        self.llm = LLM(**engine_args)  # prompts go in as token ids and nothing is detokenised
        if self.on_cpu:
            from scoring.backends import vllm_cpu_lora

            log.info("vLLM CPU LoRA ops", grouped=vllm_cpu_lora.is_active())
        self.dtype = dtype
        self._adapters: dict[str, object] = {}  # name -> LoRARequest
        self._next_lora_id = 0
        self._plans: dict[tuple[str, ...], ChoicePlan] = {}
        self.tokens = TokenCounter()

    # -- Backend interface ---------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def add_adapter(self, name: str, path: Path) -> None:
        """Register a peft LoRA adapter under ``name`` with a stable integer id (a new id if its path changes)."""
        from vllm.lora.request import LoRARequest

        path = Path(path).resolve()
        current = self._adapters.get(name)
        if current is not None and current.lora_path == str(path):
            return
        config_file = path / "adapter_config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{path} is not a peft adapter directory (no adapter_config.json)")
        rank = json.loads(config_file.read_text()).get("r")
        if rank is not None and rank > self.settings.max_lora_rank:
            raise ValueError(f"adapter {name!r} has rank {rank} > vllm.max_lora_rank = {self.settings.max_lora_rank}")
        self._next_lora_id += 1
        request = LoRARequest(lora_name=name, lora_int_id=self._next_lora_id, lora_path=str(path))
        self.llm.llm_engine.add_lora(request)  # load now: a broken adapter fails here, not in the stream
        if current is not None:
            self.llm.llm_engine.remove_lora(current.lora_int_id)
        self._adapters[name] = request
        log.info("adapter loaded", adapter=name, path=str(path), lora_id=request.lora_int_id)

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        if not requests:
            return []
        from vllm import SamplingParams

        plans = [self.plan(r.choices) for r in requests]
        loras = [self._lora(r.adapter) for r in requests]
        prompt_ids = self.encode_prompts([r.prompt for r in requests])
        rows: list[list[int]] = []
        params: list[SamplingParams] = []
        lora_requests: list[object] = []
        where: dict[tuple[int, tuple[int, ...]], int] = {}
        for i, (ids, plan) in enumerate(zip(prompt_ids, plans)):
            for prefix in plan.branches:
                row = ids + list(prefix)
                if len(row) >= self.settings.max_model_len:
                    raise ValueError(f"prompt of {len(row)} tokens does not fit vllm.max_model_len "
                                     f"= {self.settings.max_model_len}")
                siblings = plan.siblings[prefix]
                where[(i, prefix)] = len(rows)
                rows.append(row)
                params.append(SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(siblings),
                                             allowed_token_ids=list(siblings), detokenize=False))
                lora_requests.append(loras[i])
        outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params,
                                    lora_request=lora_requests, use_tqdm=False)
        read: list[dict[int, float]] = []
        self.tokens.add(prompts=len(requests), prompt_tokens=sum(map(len, prompt_ids)))
        for row, out in zip(rows, outputs, strict=True):
            if list(out.prompt_token_ids) != row:
                raise RuntimeError("vLLM returned outputs out of order")
            self.tokens.add(computed=len(row) - (out.num_cached_tokens or 0))
            read.append({int(t): float(lp.logprob) for t, lp in out.outputs[0].logprobs[0].items()})

        def reader(i: int, plan: ChoicePlan):
            def branch(prefix: tuple[int, ...]) -> list[float]:
                got = read[where[(i, prefix)]]
                missing = [t for t in plan.siblings[prefix] if t not in got]
                if missing:
                    raise RuntimeError(f"vLLM returned no log-probability for allowed tokens {missing}")
                return [got[t] for t in plan.siblings[prefix]]

            return branch

        return [plan.probabilities(reader(i, plan)) for i, plan in enumerate(plans)]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - closing is best effort
            log.warning("vLLM engine shutdown failed", error=repr(e))
        del llm
        import gc

        gc.collect()

    # -- internals -----------------------------------------------------------------------

    def plan(self, choices: tuple[str, ...]) -> ChoicePlan:
        plan = self._plans.get(choices)
        if plan is None:
            plan = ChoicePlan.build(choices, lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"])
            if plan.max_siblings > MAX_SIBLINGS:
                raise ValueError(f"{plan.max_siblings} choices branch at one token; the vLLM backend scores "
                                 f"at most {MAX_SIBLINGS}")
            self._plans[choices] = plan
        return plan

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Exactly as the transformers backend tokenises (default special tokens), so both score the same ids."""
        return [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        try:
            return self._adapters[adapter]
        except KeyError:
            raise KeyError(f"adapter {adapter!r} was never added") from None
