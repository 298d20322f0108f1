"""transformers (+ peft) backend: batched label scoring in one forward pass per batch, CPU or GPU.

Only the last position's logits are computed, which is most of the saving over a full-logits forward on a
49k-token vocabulary. Llama-family models run a batch as one packed sequence of its prompts' new tokens
(:mod:`scoring.backends.packed`, ``model.packed_forward``); other models take padded forward passes: prompts
left-padded with explicit position ids, so a padded row scores exactly as it would alone.

With a prefix cache (``prefix_cache_mb`` > 0, :mod:`scoring.backends.prefix_cache`), each row computes
only the tokens after the longest prefix it shares with an earlier prompt (in a stream: its conversation's
previous turn). A batch then holds rows with pasts of different lengths: the cached keys and values are
left-padded to the longest past, the new tokens to the longest new part, and the attention mask hides both
paddings; the explicit position ids keep every token at its place in its own prompt.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import structlog
import torch

from scoring.backends.base import ScoreRequest, TokenCounter
from scoring.backends.choices import ChoicePlan
from scoring.backends.packed import PackedRow, packed_forward
from scoring.backends.packed import supports as supports_packed
from scoring.backends.prefix_cache import MISS, Hit, PrefixCache, prefix_hashes

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
        prefix_cache_mb: int = 0,
        merge_adapter: bool = False,
        packed: bool = True,
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
            from scoring.hardware import auto_dtype

            dtype = auto_dtype(device)
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self._peft = None  # a PeftModel wrapping self.model once the first adapter is added
        self._adapters: dict[str, Path] = {}
        self._plans: dict[tuple[str, ...], ChoicePlan] = {}
        self.tokens = TokenCounter()
        self.prefix_cache = None
        #: The most positions (cached past + new tokens, padding included) one forward may hold for a cached
        #: prefix to be reused exactly: unbounded, or a sliding-window layer's reach (`reusable_span`).
        self.cache_span = reusable_span(self.model.config)
        if prefix_cache_mb > 0 and self.cache_span > 0:
            self.prefix_cache = PrefixCache(prefix_cache_mb * 2**20)
            if self.cache_span != math.inf:
                log.info("prefix cache reused within the sliding window", model=self.model_id, span=self.cache_span)
        elif prefix_cache_mb > 0:
            log.warning("prefix cache off: a layer of the model caches something other than keys and values "
                        "(recurrent layers)", model=self.model_id)
        #: Fold the adapter in use into the weights (peft ``merge_adapter``): no LoRA matmuls per token, and a
        #: merge/unmerge whenever a batch needs another adapter (or none). For a consumer serving one adapter.
        self.merge_adapter = merge_adapter
        self._merged: str | None = None
        #: Run each wave of rows as one sequence of their new tokens (:mod:`scoring.backends.packed`), where the
        #: model's layers allow it; else padded forward passes of rows of similar lengths.
        self.packed = packed and supports_packed(self.model)

    # -- Backend interface ---------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def add_adapter(self, name: str, path: Path) -> None:
        if self._adapters.get(name) == Path(path):
            return
        if self.prefix_cache is not None:
            self.prefix_cache.clear(name)  # keys and values computed through the adapter this name held
        if self._merged == name:
            self._unmerge()
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
        """Log-softmax of the next-token logits after each row of token ids.

        Rows run as one packed sequence of their new tokens (:mod:`scoring.backends.packed`, in chunks of at most
        ``max_packed_tokens``), or, for models the packed forward does not cover, in padded forward passes of
        similar lengths (:func:`forward_groups`): one long row (a prefix-cache miss) would otherwise pad every
        short one to its length. With the prefix cache, rows that share a longer prefix
        with another row of the call than with the cache (two turns of one conversation in one micro-batch, a
        choice's second read after its prompt) wait for a later wave, which then reuses the first one's KV."""
        namespace = adapter or ""
        out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        if self.prefix_cache is None:
            waves = [(list(range(len(rows))), [MISS] * len(rows))]
            hashes: list[tuple[int, ...]] = [()] * len(rows)
        else:
            hashes = [prefix_hashes(namespace, r) for r in rows]
            # A wave is one more forward pass: worth waiting for when it saves the padded path more than a
            # short line; the packed path's passes cost little more than the tokens they hold.
            waves = self._waves(rows, hashes, namespace, margin=4 if self.packed else 16)
        forward, passes = ((self._forward_packed, lambda n: token_chunks(n, self.max_packed_tokens)) if self.packed
                           else (self._forward, forward_groups))
        for wave, hits in waves:  # a generator: each wave's lookups see the previous wave's entries
            for group in passes([len(rows[i]) - h.tokens for i, h in zip(wave, hits)]):
                idx = [wave[g] for g in group]
                logprobs = forward([rows[i] for i in idx], [hits[g] for g in group], [hashes[i] for i in idx],
                                   namespace, adapter)
                for i, lp in zip(idx, logprobs):
                    out[i] = lp
        return torch.stack(out)

    def _waves(self, rows: Sequence[Sequence[int]], hashes: Sequence[tuple[int, ...]], namespace: str,
               margin: int = 16) -> Iterator[tuple[list[int], list[Hit]]]:
        """Rows to compute now with their cache hits; a row sharing ``margin`` tokens more with a row of this
        wave than with the cache waits for the next wave (looked up again once this one is stored)."""
        assert self.prefix_cache is not None
        pending = list(range(len(rows)))
        while pending:
            wave: list[int] = []
            hits: list[Hit] = []
            later: list[int] = []
            for i in pending:
                hit = self.prefix_cache.lookup(namespace, rows[i], hashes[i])
                if any(_shared_prefix(hashes[i], hashes[j]) > hit.tokens + margin for j in wave):
                    later.append(i)
                else:
                    wave.append(i)
                    hits.append(hit)
            yield wave, hits
            pending = later

    #: The most new tokens one packed forward holds (its activations: ~10 x tokens x hidden size floats at once).
    max_packed_tokens = 8192

    def _forward_packed(self, rows, hits: Sequence[Hit], hashes, namespace: str, adapter: str | None) -> torch.Tensor:
        """One packed forward over ``rows`` (:func:`scoring.backends.packed.packed_forward`), each computing only
        its tokens after its cached prefix; every row's keys and values then go into the prefix cache."""
        packed = [PackedRow(r[h.tokens:], h.tokens, h.entry.kv if h.entry is not None else None)
                  for r, h in zip(rows, hits)]
        self.tokens.add(computed=sum(len(p.new) for p in packed))
        with torch.inference_mode(), self._adapter(adapter):
            logprobs, kv = packed_forward(self.model, packed)
        if self.prefix_cache is not None:
            for r, h, hs, row_kv in zip(rows, hits, hashes, kv):
                self.prefix_cache.put(namespace, r, row_kv, continues=h, hashes=hs)
        return logprobs

    def _forward(self, rows, hits: Sequence[Hit], hashes, namespace: str, adapter: str | None) -> torch.Tensor:
        """One padded forward pass over ``rows``, each computing only its tokens after its cached prefix."""
        past = max(h.tokens for h in hits)
        width = max(len(r) - h.tokens for r, h in zip(rows, hits))
        if past and past + width > self.cache_span:
            # A sliding-window layer would not reach back over the whole padded past: compute these rows whole.
            hits, past, width = [MISS] * len(rows), 0, max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), past + width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, h) in enumerate(zip(rows, hits)):
            new = len(r) - h.tokens
            input_ids[i, width - new:] = torch.tensor(r[h.tokens:], dtype=torch.long)
            positions[i, width - new:] = torch.arange(h.tokens, len(r))
            mask[i, past - h.tokens: past] = 1
            mask[i, past + width - new:] = 1
        self.tokens.add(computed=input_ids.numel())
        with torch.inference_mode(), self._adapter(adapter):
            model = self._peft if self._peft is not None else self.model
            out = model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=self._padded_past(hits, past) if past else None,
                use_cache=self.prefix_cache is not None,
                logits_to_keep=1,
            )
            if self.prefix_cache is not None and past + width <= self.cache_span:  # (else sliding layers cut it)
                self._keep(rows, hits, hashes, out.past_key_values, past, width, namespace)
        return out.logits[:, -1, :].float().log_softmax(-1).cpu()

    def _padded_past(self, hits: Sequence[Hit], past: int):
        """The hits' cached keys and values as one cache, each row's past right-aligned at ``past`` positions."""
        from transformers import DynamicCache

        some = next(h for h in hits if h.tokens)
        layers = []
        for layer, (k0, _) in enumerate(some.entry.kv):
            keys = k0.new_zeros((len(hits), k0.shape[0], past, k0.shape[2]))
            values = torch.zeros_like(keys)
            for i, h in enumerate(hits):
                if h.tokens:
                    k, v = h.entry.kv[layer]
                    keys[i, :, past - h.tokens:] = k[:, : h.tokens]
                    values[i, :, past - h.tokens:] = v[:, : h.tokens]
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _keep(self, rows, hits, hashes, cache, past: int, width: int, namespace: str) -> None:
        """Store each row's whole KV (its reused past and its new tokens, paddings cut out) in the prefix cache."""
        assert self.prefix_cache is not None
        for i, (r, h) in enumerate(zip(rows, hits)):
            new = len(r) - h.tokens
            kv = []
            for layer in cache.layers:
                k, v = layer.keys[i], layer.values[i]
                kv.append((torch.cat([k[:, past - h.tokens: past], k[:, past + width - new:]], dim=1),
                           torch.cat([v[:, past - h.tokens: past], v[:, past + width - new:]], dim=1)))
            self.prefix_cache.put(namespace, r, kv, continues=h, hashes=hashes[i])

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        if self._peft is None:
            if adapter is not None:
                raise KeyError(f"adapter {adapter!r} was never added")
            yield
            return
        if adapter is not None and adapter not in self._adapters:
            raise KeyError(f"adapter {adapter!r} was never added")
        if self._merged is not None and self._merged != adapter:
            self._unmerge()
        if adapter is None:
            with self._peft.disable_adapter():
                yield
            return
        if self._merged != adapter:  # (peft unmerges on set_adapter)
            self._peft.set_adapter(adapter)
            if self.merge_adapter:
                self._peft.merge_adapter([adapter])
                self._merged = adapter
        yield

    def _unmerge(self) -> None:
        """Take the merged adapter's delta back out of the weights (fp32: within rounding of the originals)."""
        assert self._peft is not None
        self._peft.unmerge_adapter()
        self._merged = None


def reusable_span(config) -> float:
    """How many positions a forward over a cached prefix may span for the reuse to be exact.

    The prefix cache slices, pads and concatenates whole keys and values. Plain attention layers keep them all
    (unbounded span). A sliding-window layer (Gemma 3, Mistral) keeps the last ``sliding_window - 1`` positions
    and attends no further back than its window, counted in cache positions, padding included: within that
    span it caches and attends as a plain layer, so rows are reused while past + new tokens fit in it (prompts
    shorter than the window, as ours are for Gemma 3's 512) and computed whole beyond. Any other layer (a
    recurrent state, a chunked-attention layer whose chunks padding would shift) is not reused: 0, no cache."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    span = math.inf
    for kind, kwargs in zip(*get_layer_types_and_kwargs(config.get_text_config(decoder=True))):
        if kind == "sliding_attention":
            span = min(span, kwargs["sliding_window"] - 1)
        elif kind != "full_attention":
            return 0
    return span


def forward_groups(lengths: Sequence[int], overhead: int = 16) -> list[list[int]]:
    """Split rows of ``lengths`` tokens into forward passes minimising padded tokens + ``overhead`` per pass.

    Rows are sorted by length and cut into contiguous runs (an exact dynamic programme, O(n²) for n rows).
    ``overhead`` is a pass's fixed cost in tokens: its per-layer kernel launches, and smaller matrix products
    running further below the machine's peak."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def token_chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive runs of rows of ``lengths`` tokens, each at most ``budget`` tokens (a longer row alone)."""
    chunks: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(lengths):
        if chunks[-1] and total + n > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += n
    return chunks if chunks[-1] else []


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two rows share, from their prefix hashes (binary search: equal hashes at n
    mean equal first n tokens, up to a collision, which would only misplace a row in the waves)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo
