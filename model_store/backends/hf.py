"""transformers (+ peft) backend: batched label scoring in one forward pass per batch, CPU or GPU.

Only the last position's logits are computed (``logits_to_keep=1``), which is most of the saving
over a full-logits forward on a 49k-token vocabulary. Prompts are left-padded with explicit
position ids, so a padded row scores exactly as it would alone.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import structlog
import torch

from model_store.backends.base import ScoreRequest, TokenCounter
from model_store.backends.choices import ChoicePlan

log = structlog.get_logger(__name__)


class HFBackend:
    """Label scoring with a transformers causal LM, optionally through peft LoRA adapters."""

    def __init__(
        self,
        model_dir: Path,
        *,
        model_id: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_id = model_id or Path(model_dir).name
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if dtype == "auto":
            from model_store.hardware import auto_dtype

            dtype = auto_dtype(device)
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self._peft = None  # a PeftModel wrapping self.model once the first adapter is added
        self._adapters: dict[str, Path] = {}
        self._plans: dict[tuple[str, ...], ChoicePlan] = {}
        self.tokens = TokenCounter()

    # -- Backend interface ---------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def add_adapter(self, name: str, path: Path) -> None:
        if self._adapters.get(name) == Path(path):
            return
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self._peft.eval()
        else:
            if name in self._adapters:
                self._peft.delete_adapter(name)
            self._peft.load_adapter(str(path), adapter_name=name)
        self._adapters[name] = Path(path)
        log.info("adapter loaded", adapter=name, path=str(path))

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        results: list[list[float] | None] = [None] * len(requests)
        groups: dict[str | None, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.adapter].append(i)
        for adapter, idx in groups.items():
            for i, probs in zip(idx, self._score_group([requests[i] for i in idx], adapter)):
                results[i] = probs
        return [r for r in results if r is not None]

    def close(self) -> None:
        self._peft = None
        self.model = None

    # -- internals -----------------------------------------------------------------------

    def plan(self, choices: tuple[str, ...]) -> ChoicePlan:
        plan = self._plans.get(choices)
        if plan is None:
            plan = self._plans[choices] = ChoicePlan.build(
                choices, lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]
            )
        return plan

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(prompts))["input_ids"]

    def _score_group(self, requests: Sequence[ScoreRequest], adapter: str | None) -> list[list[float]]:
        prompt_ids = self.encode_prompts([r.prompt for r in requests])
        self.tokens.add(prompts=len(requests), prompt_tokens=sum(map(len, prompt_ids)))
        plans = [self.plan(r.choices) for r in requests]
        # One row per (request, branch prefix); the empty prefix is the prompt itself.
        rows: list[list[int]] = []
        where: dict[tuple[int, tuple[int, ...]], int] = {}
        for i, (ids, plan) in enumerate(zip(prompt_ids, plans)):
            for prefix in plan.branches:
                where[(i, prefix)] = len(rows)
                rows.append(ids + list(prefix))
        logprobs = self.last_logprobs(rows, adapter) if rows else None

        def reader(i: int, plan: ChoicePlan):
            return lambda prefix: logprobs[where[(i, prefix)], list(plan.siblings[prefix])]

        return [plan.probabilities(reader(i, plan)) for i, plan in enumerate(plans)]

    def last_logprobs(self, rows: Sequence[Sequence[int]], adapter: str | None) -> torch.Tensor:
        """Log-softmax of the next-token logits after each (left-padded) row of token ids."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.tokens.add(computed=input_ids.numel())
        with torch.inference_mode(), self._adapter(adapter):
            model = self._peft if self._peft is not None else self.model
            logits = model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                logits_to_keep=1,
            ).logits[:, -1, :]
        return logits.float().log_softmax(-1).cpu()

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        if self._peft is None:
            if adapter is not None:
                raise KeyError(f"adapter {adapter!r} was never added")
            yield
        elif adapter is None:
            with self._peft.disable_adapter():
                yield
        else:
            if adapter not in self._adapters:
                raise KeyError(f"adapter {adapter!r} was never added")
            self._peft.set_adapter(adapter)
            yield
