"""``erc-stream bench``: the inference paths side by side, on the same model, adapter and messages.

Paths (each in its own process, so its peak RSS is its own):

- ``naive``: the paper's loop — one prompt at a time, greedy generation, the label read off the text
  (:mod:`scoring.backends.naive`);
- ``hf``: transformers + peft, micro-batches scored in one forward pass over the label tokens, each prompt
  computing only its tokens after the prefix it shares with an earlier one (``model.prefix_cache_mb``);
  ``hf-no-prefix-cache`` and ``hf-merged`` (the adapter folded into the weights) on request;
- ``vllm``: vLLM with prefix caching (consecutive turns of a conversation share their prompt prefix);
  ``vllm-no-prefix-cache``, on request, is the same engine without it.

Every path labels the same messages — the first MELD dev dialogues (synthetic conversations where no data
directory exists), interleaved across ``open_conversations`` conversations (8 unless told) as a stream delivers
them — through the same prompt builder, labeler and adapter (the registry's active one, with its label-prior
correction; the naive loop uses the raw parsed label). Two runs per path:

- **saturation**: every message is waiting at t = 0; micro-batches of ``batch.micro_batch_size`` in arrival order;
  utterances/s = messages / wall time;
- **fixed rate**: the first ``FIXED_RATE_MESSAGES`` messages arrive at ``rate`` per second (by default 80 % of the naive loop's saturation
  throughput, so every path can keep up); a micro-batch closes at ``batch.micro_batch_size`` messages or
  ``batch.max_wait_ms`` after its first. Latency is arrival → label in this process: the stream's own
  Kafka + Redis overhead is measured separately with the null backend (``consumer_overhead``), and is
  far smaller.

Work is reported as prompt tokens and tokens really computed per utterance (padding, generated tokens
included; prefix-cache hits excluded), and against the machine: the FLOPs each utterance needs for the tokens
it does not share with its conversation's previous prompt, times utterances/s, over a measured fp32 matmul peak.

Weighted F1 is reported twice for the scoring paths: as served (``weighted_f1``, with the adapter's label-prior
correction) and ``weighted_f1_uncorrected``, the top label of the path's raw distribution, the naive loop's own
rule (one more untimed pass): its difference to the naive loop is what the path's arithmetic changed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from core.settings import Settings

PATHS: tuple[str, ...] = ("naive", "hf", "vllm")
#: Messages of the fixed-rate run (the first ones of the stream); it lasts FIXED_RATE_MESSAGES / rate seconds.
FIXED_RATE_MESSAGES = 32
#: Paths measured on request only (``--paths``): the same engines with one setting changed. ``vllm-merged``
#: (handled in ``run_path``) serves the adapter merged into the base weights (model_store/merging.py).
VARIANTS: dict[str, tuple[str, dict]] = {
    "vllm-no-prefix-cache": ("vllm", {"vllm": {"enable_prefix_caching": False}}),
    "vllm-fp32": ("vllm", {"vllm": {"dtype": "float32"}}),
    # One dtype each (the default, ``auto``, is bf16 on bf16 CPUs and fp32 elsewhere): every ratio at one dtype.
    "hf-bf16": ("hf", {"model": {"dtype": "bfloat16"}}),
    "naive-bf16": ("naive", {"model": {"dtype": "bfloat16"}}),
    "hf-fp32": ("hf", {"model": {"dtype": "float32"}}),
    "naive-fp32": ("naive", {"model": {"dtype": "float32"}}),
    "hf-no-prefix-cache": ("hf", {"model": {"prefix_cache_mb": 0}}),
    # padded forward passes of rows of similar lengths instead of one packed sequence of new tokens
    "hf-padded": ("hf", {"model": {"packed_forward": False}}),
    "hf-bf16-padded": ("hf", {"model": {"dtype": "bfloat16", "packed_forward": False}}),
    "hf-merged": ("hf", {"model": {"merge_adapter": True}}),
    # bf16 with the adapter folded into the weights (no LoRA matmuls), then also in micro-batches of 64: fewer,
    # larger forward passes, where bf16's fast matmuls leave the per-pass overhead as the cost.
    "hf-bf16-merged": ("hf", {"model": {"dtype": "bfloat16", "merge_adapter": True}}),
    "hf-bf16-merged-b64": ("hf", {"model": {"dtype": "bfloat16", "merge_adapter": True},
                                  "batch": {"micro_batch_size": 64}}),
}


@dataclass(frozen=True)
class Item:
    """One message of the benchmark stream: its window (target last) and gold label."""

    conversation_id: str
    turns: tuple  # tuple[Turn, ...]
    gold: str


def stream_items(settings: Settings, messages: int, open_conversations: int = 8) -> tuple[list[Item], str]:
    """The first ``messages`` labelled utterances of MELD dev (or synthetic) conversations, in stream order:
    ``open_conversations`` conversations at a time, one turn each in turn, as producer_sim replays them."""
    from core.labels import get_label_set
    from model_store.data import default_file, load_conversations
    from model_store.examples import Target

    label_set = get_label_set(settings.model.label_set)
    path = default_file(settings.data.dir, "meld", "dev")
    if path.exists():
        conversations, source = load_conversations("meld", path, split="dev"), f"MELD dev ({path})"
    else:
        from producer_sim.synthetic import synthetic_conversations

        conversations, source = synthetic_conversations(200), "synthetic conversations (no data directory)"
    queues = []
    for conv in conversations:
        items = []
        for i, u in enumerate(conv.utterances):
            gold = label_set.map_gold(u.label, conv.dataset) if u.label else None
            if gold is not None:  # the turns the stream's store would give the prompt builder
                items.append(Item(conv.conversation_id, tuple(Target(conv, i, gold).window(settings.window.span)), gold))
        if items:
            queues.append(items)
    out: list[Item] = []
    open_: list[list[Item]] = []
    while len(out) < messages and (queues or open_):
        while len(open_) < open_conversations and queues:
            open_.append(queues.pop(0))
        for q in list(open_):
            out.append(q.pop(0))
            if not q:
                open_.remove(q)
            if len(out) == messages:
                break
    return out, source


# -- one path, in its own process ------------------------------------------------------------------


class _PeakRSS(threading.Thread):
    """Samples the resident memory of this process and its children (vLLM's engine runs in one)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._done.wait(0.1)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    v = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(v, q)), 1) for q in (50, 95, 99)}


def _label_batches(labeler, items: Sequence[Item], arrivals: Sequence[float], max_size: int, max_wait_s: float):
    """Micro-batch ``items`` as they arrive (seconds after start); returns (labels, latencies in ms, wall s)."""
    labels: list[str] = [""] * len(items)
    latency = [0.0] * len(items)
    t0 = time.monotonic()
    i = 0
    while i < len(items):
        now = time.monotonic() - t0
        if arrivals[i] > now:
            time.sleep(arrivals[i] - now)
        first = arrivals[i]
        # Wait for the batch to fill, up to max_wait after its first message (or take what is there).
        deadline = first + max_wait_s
        j = i
        while True:
            now = time.monotonic() - t0
            while j < len(items) and j - i < max_size and arrivals[j] <= now:
                j += 1
            if j - i >= max_size or j == len(items) or now >= deadline:
                break
            time.sleep(max(0.0, min(deadline, arrivals[j]) - now))
        results = labeler.label([list(it.turns) for it in items[i:j]])
        done = time.monotonic() - t0
        for k, r in zip(range(i, j), results):
            labels[k] = getattr(r, "label", "")
            latency[k] = 1000 * (done - arrivals[k])
        i = j
    return labels, latency, time.monotonic() - t0


def run_path(path: str, settings: Settings, messages: int, rate: float | None, open_conversations: int = 8) -> dict:
    """Measure one path; ``rate`` None = 80 % of this path's own saturation throughput."""
    from core.labels import get_label_set
    from model_store.base_models import resolve_base
    from model_store.evaluation import metrics
    from model_store.loading import choose_adapter, load_backend
    from scoring.labeler import Labeler
    from scoring.prompts import PromptBuilder

    rss = _PeakRSS()
    rss.start()
    items, _ = stream_items(settings, messages, open_conversations)
    started = time.monotonic()
    naive = VARIANTS.get(path, (path, {}))[0] == "naive"
    if naive:
        from scoring.backends.naive import NaiveBackend

        model = settings.with_overrides(**VARIANTS.get(path, (path, {}))[1]).model
        backend = NaiveBackend(resolve_base(model.base, settings.store.dir), model_id=model.base,
                               device=model.device, dtype=model.dtype, threads=model.threads)
        max_size = 1
    elif path == "vllm-merged":  # the adapter folded into the base weights: one model, no LoRA matmuls
        from model_store.merging import merged_model_dir

        adapter = choose_adapter(settings)
        base = resolve_base(settings.model.base, settings.store.dir)
        model_dir = merged_model_dir(base, adapter.ref.path, settings.store.dir) if adapter.ref else base
        backend = load_backend(settings.with_overrides(model={"backend": "vllm", "base": str(model_dir)}))
        max_size = settings.batch.micro_batch_size
    else:
        engine, overrides = VARIANTS.get(path, (path, {}))
        settings = settings.with_overrides(**{**overrides, "model": {**overrides.get("model", {}), "backend": engine}})
        backend = load_backend(settings)
        max_size = settings.batch.micro_batch_size
    load_s = time.monotonic() - started
    label_set = get_label_set(settings.model.label_set)
    builder = PromptBuilder.configured(settings, label_set, backend.count_tokens)
    labeler = Labeler(backend, builder)
    choice = choose_adapter(settings)
    if path == "vllm-merged":  # the same adapter's demonstrations and prior correction, its weights merged
        labeler.use(replace(choice, ref=None))  # scored without LoRA; reported under the adapter's name
    else:
        labeler.use(choice)
    if naive:
        labeler.calibration = None  # the paper's loop reads the label off the generated text
    labeler.label([[items[0].turns[-1]]])  # warm-up: one short prompt, outside the measured runs

    def reset() -> None:  # each run starts from an empty prefix cache (the warm-up's prompt is in it)
        if getattr(backend, "prefix_cache", None) is not None:
            backend.prefix_cache.clear()
        if hasattr(getattr(backend, "llm", None), "reset_prefix_cache"):
            backend.llm.reset_prefix_cache()

    def measured(arrivals: Sequence[float]) -> tuple[list[str], list[float], float, dict]:
        reset()
        before = (backend.tokens.prompts, backend.tokens.prompt_tokens, backend.tokens.computed)
        labels, latency, wall = _label_batches(labeler, items[:len(arrivals)], arrivals, max_size,
                                               settings.batch.max_wait_ms / 1000)
        n = backend.tokens.prompts - before[0]
        tokens = {"prompt_tokens_per_utterance": round((backend.tokens.prompt_tokens - before[1]) / max(n, 1), 1),
                  "computed_tokens_per_utterance": round((backend.tokens.computed - before[2]) / max(n, 1), 1)}
        return labels, latency, wall, tokens

    labels, sat_latency, sat_wall, tokens = measured([0.0] * len(items))
    throughput = len(items) / sat_wall
    rate = rate or round(0.8 * throughput, 3)
    # The fixed-rate run takes messages / rate seconds whatever the path: its first FIXED_RATE_MESSAGES suffice.
    _, fixed_latency, _, _ = measured([i / rate for i in range(min(len(items), FIXED_RATE_MESSAGES))])
    golds = [it.gold for it in items]
    m = metrics(golds, labels, label_set.labels)
    # The naive loop's decision rule (the top label of the model's own distribution) separates what a path's
    # arithmetic changes from what the adapter's prior correction changes: one more pass, not timed.
    uncorrected = m
    if labeler.calibration is not None:
        labeler.calibration = None
        reset()
        raw, _, _ = _label_batches(labeler, items, [0.0] * len(items), max_size, 0.0)
        uncorrected = metrics(golds, raw, label_set.labels)
    backend.close()
    return {
        "path": path, "messages": len(items), "adapter": choice.name, "load_seconds": round(load_s, 1),
        "utterances_per_s": round(throughput, 3), "saturation_seconds": round(sat_wall, 1),
        "latency_ms_saturation": _percentiles(sat_latency), "fixed_rate_per_s": rate,
        "latency_ms_fixed_rate": _percentiles(fixed_latency), "fixed_rate_messages": len(fixed_latency), **tokens,
        "weighted_f1": m["weighted_f1"], "accuracy": m["accuracy"],
        "weighted_f1_uncorrected": uncorrected["weighted_f1"],
        "unparsed": getattr(backend, "unparsed", None), "peak_rss_mb": round(rss.stop() / 2**20),
        "max_batch": max_size, "torch_threads": _torch_threads(), "dtype": getattr(backend, "dtype", "float32"),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# -- the machine ---------------------------------------------------------------------------------


def matmul_peak_gflops(threads: int | None = None, size: int = 1536, repeats: int = 12,
                       dtype: str = "float32") -> float:
    """Best matrix-product throughput of this machine in ``dtype`` through torch (the roofline's compute limit).

    Several warm-up products first: a CPU that just left idle (or a shared VM) runs the first ones slowly,
    and an underestimated peak would make every path look closer to the limit than it is."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size, dtype=getattr(torch, dtype)), torch.randn(size, size, dtype=getattr(torch, dtype))
    for _ in range(4):
        torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return round(2 * size**3 / best / 1e9, 1)


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def needed_flops_per_utterance(settings: Settings, items: Sequence[Item],
                               layout: str | None = None) -> tuple[float, float]:
    """(new tokens, FLOPs) per utterance in ``layout`` (default: ``model.layout``): a prompt's tokens after the
    longest prefix it shares with an earlier prompt (its conversation's previous one, or the prompt before it,
    which holds the head every prompt shares: what the hf and vLLM prefix caches reuse), times the model's
    per-token cost (weights and attention), plus one row of output logits."""
    from transformers import AutoConfig, AutoTokenizer

    from core.labels import get_label_set
    from model_store.base_models import resolve_base
    from scoring.prompts import PromptBuilder

    base = resolve_base(settings.model.base, settings.store.dir)
    cfg = AutoConfig.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    builder = PromptBuilder.configured(settings, get_label_set(settings.model.label_set),
                                       lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    builder = builder.with_layout(layout or builder.layout)  # type: ignore[arg-type]
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_token = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    last: dict[str, list[int]] = {}
    previous: list[int] = []
    new_tokens = flops = 0.0
    for it in items:
        ids = tok(builder.emotion(list(it.turns)).text)["input_ids"]
        shared = max(_shared(ids, last.get(it.conversation_id, [])), _shared(ids, previous))
        new = len(ids) - shared
        new_tokens += new
        # attention: each new token attends to every earlier position (QK^T and AV: 4 * h FLOPs each, per layer)
        flops += per_token * new + 4 * layers * h * sum(range(shared + 1, len(ids) + 1)) + 2 * h * cfg.vocab_size
        last[it.conversation_id] = previous = ids
    return new_tokens / len(items), flops / len(items)


def own_line(name: str, text: str, max_turn_chars: int) -> str:
    """A turn's own line as every layout shows it (``Speaker_k: "…"``): the least a prompt must compute for it."""
    from scoring.prompts import render_text

    return f'{name}: "{render_text(text, max_turn_chars)}"'


def layout_tokens(settings: Settings, items: Sequence[Item]) -> dict[str, dict[str, float]]:
    """Per prompt layout: the new tokens an utterance needs (:func:`needed_flops_per_utterance`) against its own
    line (``Speaker_k: "…"``, the least any layout must read), and their ratio."""
    from transformers import AutoTokenizer

    from model_store.base_models import resolve_base
    from scoring.prompts import LAYOUTS, anonymise

    tok = AutoTokenizer.from_pretrained(resolve_base(settings.model.base, settings.store.dir))
    own = 0
    for it in items:
        turns = list(it.turns)
        line = own_line(anonymise(turns)[turns[-1].speaker], turns[-1].text, settings.window.max_turn_chars)
        own += len(tok(line, add_special_tokens=False)["input_ids"])
    own_per = own / len(items)
    out = {}
    for layout in LAYOUTS:
        new, _ = needed_flops_per_utterance(settings, items, layout)
        out[layout] = {"needed_new_tokens_per_utterance": round(new, 1),
                       "own_line_tokens_per_utterance": round(own_per, 1), "needed_vs_own_line": round(new / own_per, 2)}
    return out


# -- orchestration -------------------------------------------------------------------------------


def _run_in_process(path: str, settings: Settings, messages: int, rate: float | None, open_conversations: int,
                    log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.scoring_paths", path, str(messages), str(rate or 0), str(out),
               str(open_conversations)]
        env = {**os.environ, **settings_env(settings)}
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.exists():
            log(f"[red]{path} failed[/red]: {proc.stderr[-2000:]}")
            return {"path": path, "error": proc.stderr[-2000:]}
        return json.loads(out.read_text())


def settings_env(settings: Settings) -> dict[str, str]:
    """The few settings a path process must share with its parent, as ERC_* variables."""
    return {"ERC_STORE__DIR": str(settings.store.dir), "ERC_DATA__DIR": str(settings.data.dir),
            "ERC_MODEL__BASE": settings.model.base, "ERC_MODEL__LABEL_SET": settings.model.label_set,
            "ERC_BATCH__MICRO_BATCH_SIZE": str(settings.batch.micro_batch_size),
            "ERC_BATCH__MAX_WAIT_MS": str(settings.batch.max_wait_ms),
            **({"ERC_MODEL__ADAPTER": settings.model.adapter} if settings.model.adapter else {}),
            **({"ERC_MODEL__THREADS": str(settings.model.threads)} if settings.model.threads else {})}


def run_bench(settings: Settings, *, paths: Sequence[str] = PATHS, messages: int = 64, rate: float | None = None,
              consumer_overhead: bool = True, open_conversations: int = 8, log=print) -> dict:
    """All paths, the machine's limit and the ratios to the naive loop, as one JSON-able dict."""
    started = time.monotonic()
    items, source = stream_items(settings, messages, open_conversations)
    from model_store.loading import choose_adapter
    from scoring.hardware import fast_bf16

    # What the paths serve: the adapter's own layout (Labeler.use), the configured one without an adapter.
    choice = choose_adapter(settings)
    layout = (choice.layout or "instructerc") if choice.ref is not None else settings.model.layout
    new_tokens, flops = needed_flops_per_utterance(settings, items, layout)

    # The limit of a path is the peak in its own dtype; bf16 only where the CPU runs it natively.
    peaks = {"float32": matmul_peak_gflops(settings.model.threads)}
    if fast_bf16(settings.model.device):
        peaks["bfloat16"] = matmul_peak_gflops(settings.model.threads, dtype="bfloat16")
    peak = peaks["float32"]
    log(f"{len(items)} messages from {source}; {new_tokens:.0f} new tokens and {flops / 1e9:.1f} GFLOP needed per "
        f"utterance ({layout} layout, adapter {choice.name or 'none'}); matmul peak {peaks} GFLOP/s")
    results: dict[str, dict] = {}
    for path in paths:
        log(f"path {path}…")
        r = _run_in_process(path, settings, len(items), rate, open_conversations, log)
        if path == "naive" and rate is None and "fixed_rate_per_s" in r:
            rate = r["fixed_rate_per_s"]  # every other path runs at the naive loop's sustainable rate
        if "utterances_per_s" in r:
            limit = peaks.get(r.get("dtype", "float32"), peak)
            r["fraction_of_peak"] = round(r["utterances_per_s"] * flops / (limit * 1e9), 4)
        results[path] = r
        log(f"  {json.dumps({k: r.get(k) for k in ('utterances_per_s', 'weighted_f1', 'computed_tokens_per_utterance')})}")
    base = results.get("naive", {})
    for r in results.values():
        if base.get("utterances_per_s") and "utterances_per_s" in r:
            r["speedup_vs_naive"] = round(r["utterances_per_s"] / base["utterances_per_s"], 2)
            r["computed_tokens_vs_naive"] = round(r["computed_tokens_per_utterance"]
                                                  / base["computed_tokens_per_utterance"], 3)
            r["weighted_f1_vs_naive"] = round(r["weighted_f1"] - base["weighted_f1"], 2)
            r["weighted_f1_uncorrected_vs_naive"] = round(r["weighted_f1_uncorrected"] - base["weighted_f1"], 2)
    naive_by_dtype = {r.get("dtype"): r for p, r in results.items()
                      if VARIANTS.get(p, (p, {}))[0] == "naive" and r.get("utterances_per_s")}
    for r in results.values():  # the same ratio at one dtype: each path against the naive loop in its dtype
        same = naive_by_dtype.get(r.get("dtype"))
        if same is not None and "utterances_per_s" in r:
            r["speedup_vs_naive_same_dtype"] = round(r["utterances_per_s"] / same["utterances_per_s"], 2)
    scored = [r for r in results.values() if "utterances_per_s" in r]
    best = max(scored, key=lambda r: r["utterances_per_s"]) if scored else None
    report = {
        "machine": machine(), "messages": len(items), "open_conversations": open_conversations, "source": source,
        "model": settings.model.base,
        "matmul_peak_gflops": peak, "matmul_peak_gflops_by_dtype": peaks,
        "layout": layout, "needed_new_tokens_per_utterance": round(new_tokens, 1),
        "needed_gflop_per_utterance": round(flops / 1e9, 3), "layouts": layout_tokens(settings, items),
        "paths": results,
        "best_path": best["path"] if best else None,
    }
    if consumer_overhead:
        report["consumer_overhead"] = _consumer_overhead(settings, log)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _consumer_overhead(settings: Settings, log) -> dict:
    """Messages/s of one consumer process with the null backend, through a throwaway tansu broker and Redis
    (:mod:`bench.consumer_throughput`; its section in docs/benchmarks.md explains the figures)."""
    from bench.consumer_throughput import measure

    log("consumer overhead (null backend, real broker and Redis)…")
    return measure(None, messages=10_000, conversations=250, stages=False)


def machine() -> dict:
    import platform

    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from scoring.hardware import fast_bf16

    return {"cpus": os.cpu_count(), "cpu": model or platform.processor(), "python": platform.python_version(),
            "native_bf16": fast_bf16()}


if __name__ == "__main__":  # a path's process: python -m bench.scoring_paths PATH MESSAGES RATE OUT OPEN
    from core.logs import configure

    configure("WARNING")
    _path, _messages, _rate, _out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
    _open = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    _out.write_text(json.dumps(run_path(_path, Settings(), _messages, _rate or None, _open)))
