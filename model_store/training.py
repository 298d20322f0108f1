"""LoRA (or full-parameter) training with the InstructERC recipe, on CPU or GPU.

Stages (each optional): 1. speaker identification; 2. the main task with emotion-impact prediction
as an auxiliary task: ``loss = mean(main) + aux_weight * mean(impact)`` (aux_weight 0.1, as the
paper). The loss is taken on the answer tokens only, and only the last positions' logits are
computed (``logits_to_keep``), which makes a CPU step ~40 % cheaper than full logits.

The batch schedule is drawn up front from the seed, so a run resumed from its checkpoint sees
exactly the batches it would have seen. Checkpoints (adapter, optimizer, scheduler, step, and the torch
RNG state, which draws the LoRA dropout masks) are written every ``checkpoint_every`` steps into
``<out>/checkpoint``: a resumed run ends with the adapter an uninterrupted one would have.

Several datasets train together under one label set (the unified one, normally): each source's
conversations keep their dataset, so gold labels map through that dataset's table, and their ids
are prefixed with it. ``mix`` says how ``fraction`` samples them: ``total`` pools every utterance
and samples the pool, ``ratio`` samples each dataset by the same fraction and combines them (the
paper's two strategies; ``total`` lets the larger dataset's share drift with the draw).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import structlog
import torch

from core.labels import get_label_set
from model_store.data import file_hash
from model_store.examples import Example, Target, impact_example, main_example, sample, speaker_example, targets
from scoring.prompts import Prompt, PromptBuilder, WindowShape

log = structlog.get_logger(__name__)

#: ``models train --lora-modules``: the projections LoRA adapts (Llama and Gemma name them alike).
LORA_MODULES = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (recorded in the adapter's metadata)."""

    name: str
    dataset: str
    train_file: str
    label_set: str
    base: str = "smollm2-135m"
    window: int = 12
    # The window's hop (scoring.prompts.WindowShape): training draws the windows serving will see.
    hop: int = 12
    max_tokens: int = 256
    speaker_steps: int = 15
    steps: int = 90
    batch_size: int = 8
    impact_per_batch: int = 2
    aux_weight: float = 0.1
    demonstrations: bool = True
    demo_position: str = "after_history"
    layout: str = "instructerc"  # the prompt layout (scoring.prompts); recorded in erc_meta.json, served with it
    # "same_label": each example's demonstration is its nearest neighbour of the same label (the paper);
    # the demonstration's label then always equals the answer, and a small model learns to copy it.
    # "nearest": the nearest neighbour of any label, as at inference.
    demo_pairing: str = "same_label"
    lr: float = 1e-3
    warmup: float = 0.1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    fraction: float = 1.0
    limit: int | None = None
    # Label balancing of the main task's draws: each example is drawn with weight freq(label)^-balance,
    # 0 = the data's own distribution, 1 = every label equally often. MELD is 47 % neutral; a small
    # model trained on the natural distribution learns to answer "neutral".
    balance: float = 0.0
    # Class-weighted loss instead: each main example's loss is scaled by freq(label)^-class_weight (scales
    # averaging 1 over the training examples), so rare labels weigh more without being drawn more often.
    class_weight: float = 0.0
    # "draws": each batch draws its examples at random (with replacement, ``balance`` applies), impact examples
    # drawn apart; "blocks": an epoch walks the conversation blocks in a shuffled order, ``batch_size`` main
    # examples a batch, ``impact_per_batch`` of them with their impact example: consecutive turns share their
    # history, and packing computes it once (~2.5x fewer tokens per example on MELD).
    batching: Literal["draws", "blocks"] = "draws"
    # Prefix-tree packing of each batch (model_store/packing.py); False: left-padded rows (the reference).
    packing: bool = True
    # Training utterances held out of training and used afterwards to fit the label-prior correction
    # (see scoring/calibration.py); 0 = no calibration.
    calibration: int = 0
    # The seed of that draw (default: seed + 2). Runs of other seeds that hold out the same utterances can be
    # averaged into one adapter and calibrated on them (model_store/averaging.py).
    holdout_seed: int | None = None
    # Further (dataset, train file) pairs trained with the first one; see the module docstring.
    more_sources: tuple[tuple[str, str], ...] = ()
    mix: Literal["total", "ratio"] = "total"
    # All parameters instead of a LoRA adapter: the output is a whole model directory, served as a base.
    full: bool = False
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    # Autocast dtype of forward and backward (weights and optimizer stay fp32). "auto": bfloat16 where the
    # machine runs it natively (scoring/hardware.py; ~2.3x faster per step on an AVX-512 BF16 CPU), else fp32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    checkpoint_every: int = 10
    # Every N main-stage steps (and at the end) the adapter so far is calibrated and scored on ``eval_file``
    # (the dataset's dev split by default) through the serving path; the best one is what the run publishes.
    eval_every: int = 0
    eval_file: str | None = None
    eval_limit: int | None = None
    index_per_label: int = 400
    extra: dict = field(default_factory=dict)

    @property
    def sources(self) -> tuple[tuple[str, str], ...]:
        """Every (dataset, train file) of the run, the first one first."""
        return ((self.dataset, self.train_file), *self.more_sources)

    @property
    def kind(self) -> str:
        return "full" if self.full else "lora"

    @property
    def held_out_draw_seed(self) -> int:
        """The seed that draws the held-out calibration utterances (``holdout_seed``, default ``seed + 2``)."""
        return held_out_seed({"seed": self.seed, "holdout_seed": self.holdout_seed})


def sources_hash(cfg: TrainConfig) -> str:
    """The training data's identity: the one file's hash, or a hash over every source's."""
    if not cfg.more_sources:
        return file_hash(cfg.train_file)
    joined = ",".join(f"{d}:{file_hash(f)}" for d, f in cfg.sources)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def load_sources(cfg: TrainConfig) -> list:
    """The training conversations of every source. With several sources each conversation id is
    prefixed with its dataset (``meld/12``), so ids (and the speakers in them) never meet across datasets."""
    from dataclasses import replace

    from model_store.data import load_conversations

    if not cfg.more_sources:
        return load_conversations(cfg.dataset, cfg.train_file, split="train")
    out = []
    for dataset, path in cfg.sources:
        out += [replace(c, conversation_id=f"{dataset}/{c.conversation_id}")
                for c in load_conversations(dataset, path, split="train")]
    return out


def held_out_seed(config: dict) -> int:
    """The seed of the held-out calibration draw of a run's config (``asdict(TrainConfig)``, or an adapter's
    ``erc_meta.json`` ``config``, older ones without ``holdout_seed`` included)."""
    chosen = config.get("holdout_seed")
    return config.get("seed", 0) + 2 if chosen is None else chosen


def split_targets(cfg: TrainConfig, conversations, label_set) -> tuple[list[Target], list[Target]]:
    """(training targets, held-out calibration targets): ``cfg.calibration`` utterances are set aside
    (drawn from ``cfg.held_out_draw_seed``) before the fraction/limit sampling of the rest, which follows
    ``cfg.mix``."""
    pool = targets(conversations, label_set)
    held: set[int] = set()
    if cfg.calibration > 0:
        held = set(random.Random(cfg.held_out_draw_seed).sample(range(len(pool)),
                                                                min(cfg.calibration, len(pool) // 2)))
    rest = [t for i, t in enumerate(pool) if i not in held]
    if cfg.mix == "ratio":
        by_dataset: dict[str, list[Target]] = {}
        for t in rest:
            by_dataset.setdefault(t.conversation.dataset, []).append(t)
        chosen = [t for part in by_dataset.values() for t in sample(part, fraction=cfg.fraction, seed=cfg.seed)]
        chosen = sample(chosen, limit=cfg.limit, seed=cfg.seed)
    else:
        chosen = sample(rest, fraction=cfg.fraction, limit=cfg.limit, seed=cfg.seed)
    return chosen, [pool[i] for i in sorted(held)]


def build_examples(cfg: TrainConfig, conversations, builder: PromptBuilder, index) -> dict[str, list[Example]]:
    """Training examples per task, with same-label demonstrations when an index is given."""
    chosen, _ = split_targets(cfg, conversations, builder.label_set)
    demos: list = [None] * len(chosen)
    if index is not None and chosen:
        from model_store.retrieval import embed

        same = [t.label for t in chosen] if cfg.demo_pairing == "same_label" else None
        demos = index.search(embed([t.text for t in chosen]), same_label=same, exclude_text=[t.text for t in chosen])
    out: dict[str, list[Example]] = {"main": [], "impact": [], "speaker": []}
    for t, demo in zip(chosen, demos):
        out["main"].append(main_example(t, builder, demo))
        for ex in (impact_example(t, builder), speaker_example(t, builder)):
            if ex is not None:
                out[ex.task].append(ex)
    return out


def schedule(cfg: TrainConfig, examples: dict[str, list[Example]]) -> list[list[tuple[str, int]]]:
    """All batches of the run, as (task, example index) lists, drawn from the seed."""
    if cfg.balance > 0 and cfg.batching == "blocks":
        raise ValueError("balance draws examples by label, which whole-block batches cannot; use class_weight")
    rng = random.Random(cfg.seed + 1)
    batches: list[list[tuple[str, int]]] = []

    main_weights = None
    if cfg.balance > 0 and examples["main"]:
        freq = Counter(ex.answer for ex in examples["main"])
        main_weights = [freq[ex.answer] ** -cfg.balance for ex in examples["main"]]

    def draw(task: str, k: int) -> list[tuple[str, int]]:
        pool = examples[task]
        if not pool:
            return []
        if task == "main" and main_weights is not None:
            return [(task, i) for i in rng.choices(range(len(pool)), weights=main_weights, k=k)]
        return [(task, rng.randrange(len(pool))) for _ in range(k)]

    for _ in range(cfg.speaker_steps if examples["speaker"] else 0):
        batches.append(draw("speaker", cfg.batch_size))
    if cfg.batching == "blocks":
        return batches + _block_batches(cfg, examples, rng)
    n_impact = cfg.impact_per_batch if cfg.aux_weight > 0 and examples["impact"] else 0
    for _ in range(cfg.steps):
        batches.append(draw("main", cfg.batch_size - n_impact) + draw("impact", n_impact))
    return batches


def _block_batches(cfg: TrainConfig, examples: dict[str, list[Example]],
                   rng: random.Random) -> list[list[tuple[str, int]]]:
    """``cfg.steps`` batches of ``batch_size`` main examples, walking the blocks in a new order each epoch; with the
    impact task on, ``impact_per_batch`` of them (drawn) bring their impact example (same utterance, same history:
    it packs with them for ~40 tokens)."""
    blocks: dict[object, list[int]] = {}
    for i, ex in enumerate(examples["main"]):
        blocks.setdefault(ex.block, []).append(i)
    impact_of = {ex.key: j for j, ex in enumerate(examples["impact"])} if cfg.aux_weight > 0 else {}
    order = list(blocks)
    out: list[list[tuple[str, int]]] = []
    while order and len(out) < cfg.steps:
        rng.shuffle(order)
        stream = [i for b in order for i in blocks[b]]
        for k in range(0, len(stream), cfg.batch_size):
            mains = stream[k: k + cfg.batch_size]
            keys = [examples["main"][i].key for i in mains if examples["main"][i].key in impact_of]
            keys = rng.sample(keys, min(cfg.impact_per_batch, len(keys)))
            out.append([("main", i) for i in mains] + [("impact", impact_of[key]) for key in keys])
            if len(out) == cfg.steps:
                break
    return out


def class_scales(cfg: TrainConfig, examples: dict[str, list[Example]]) -> list[float] | None:
    """The class-weighted loss's scale of each main example (None: unweighted): freq^-class_weight, mean 1."""
    if cfg.class_weight <= 0 or not examples["main"]:
        return None
    freq = Counter(ex.answer for ex in examples["main"])
    raw = [freq[ex.answer] ** -cfg.class_weight for ex in examples["main"]]
    mean = sum(raw) / len(raw)
    return [r / mean for r in raw]


class Trainer:
    def __init__(self, cfg: TrainConfig, base_dir: Path, out_dir: Path) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from scoring.hardware import auto_dtype, cpu_kind

        self.cfg = cfg
        self.out_dir = out_dir
        self.autocast_dtype = auto_dtype(cfg.device) if cfg.dtype == "auto" else cfg.dtype
        self.cpu = cpu_kind(cfg.device)
        # [first step, autocast dtype] and [first step, machine class] per stretch of the run: ``--dtype auto``
        # resolves per machine, so a run carried from an AVX2-only CPU to a bf16 one changes dtype where it
        # resumes (and a float32 run changes speed and rounding), and its metadata says so.
        self.dtype_steps: list[list] = [[0, self.autocast_dtype]]
        self.cpu_steps: list[list] = [[0, self.cpu]]
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ckpt = out_dir / "checkpoint"
        if cfg.full:
            # Every parameter trains; a checkpoint is a whole model directory.
            resume = (ckpt / "config.json").exists()
            self.model = AutoModelForCausalLM.from_pretrained(ckpt if resume else base_dir, dtype=torch.float32)
            self.model.requires_grad_(True)
            self.model.to(self.device)
            return
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if (ckpt / "adapter_config.json").exists():
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(base, str(ckpt), is_trainable=True)
        else:
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
            self.model = get_peft_model(base, lora)
        self.model.to(self.device)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def rows(self, batch: Sequence[Example]) -> tuple[list[list[int]], list[int]]:
        """Each example's tokens (prompt, then answer) and its prompt's length."""
        prompts = self.tokenizer([ex.prompt.text for ex in batch])["input_ids"]
        answers = self.tokenizer([Prompt.answer(ex.answer) for ex in batch], add_special_tokens=False)["input_ids"]
        return [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts]

    def example_losses(self, batch: Sequence[Example]) -> torch.Tensor:
        """Each example's mean cross-entropy over its answer tokens, computed packed (``cfg.packing``: one token trie
        per conversation block, each prefix once) or as left-padded rows. Both compute the same function."""
        rows, prompt_len = self.rows(batch)
        if self.cfg.packing:
            return self._packed_losses(batch, rows, prompt_len)
        return self._padded_losses(rows, prompt_len)

    def _padded_losses(self, rows: list[list[int]], prompt_len: list[int]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        keep = max(len(r) - p for r, p in zip(rows, prompt_len)) + 1
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full((len(rows), keep - 1), -100, dtype=torch.long)
        for i, (r, p) in enumerate(zip(rows, prompt_len)):
            input_ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
            labels[i, keep - 1 - (len(r) - p):] = torch.tensor(r[p:])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), logits_to_keep=keep, use_cache=False).logits
        # logits[:, j] predicts token at position width-keep+j+1; labels cover the last keep-1 tokens.
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.to(self.device).reshape(-1),
            ignore_index=-100, reduction="none",
        ).view(len(rows), keep - 1)
        return token_loss.sum(1) / (labels != -100).sum(1).clamp(min=1).to(self.device)

    def _packed_losses(self, batch: Sequence[Example], rows: list[list[int]], prompt_len: list[int]) -> torch.Tensor:
        from model_store.packing import pack

        packed = pack(rows, [ex.block for ex in batch], pad_id=self.tokenizer.pad_token_id)
        # Only the nodes that predict an answer token get logits: (group, node) -> index into the kept nodes.
        wanted = sorted({n for r, p, path in zip(rows, prompt_len, packed.paths) for n in path[p - 1: len(r) - 1]})
        column = {n: i for i, n in enumerate(wanted)}
        mask = packed.mask_for(getattr(self.model.config, "_attn_implementation", None))
        logits = self.model(input_ids=packed.input_ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=packed.position_ids.to(self.device),
                            logits_to_keep=torch.tensor(wanted, device=self.device), use_cache=False).logits
        g_idx, c_idx, targets, owner = [], [], [], []
        for i, (r, p, g, path) in enumerate(zip(rows, prompt_len, packed.group_of, packed.paths)):
            for k in range(p - 1, len(r) - 1):
                g_idx.append(g)
                c_idx.append(column[path[k]])
                targets.append(r[k + 1])
                owner.append(i)
        token_loss = torch.nn.functional.cross_entropy(
            logits[torch.tensor(g_idx), torch.tensor(c_idx)].float(), torch.tensor(targets, device=self.device),
            reduction="none")
        owner_t = torch.tensor(owner, device=self.device)
        sums = torch.zeros(len(rows), device=self.device).index_add(0, owner_t, token_loss)
        counts = torch.zeros(len(rows), device=self.device).index_add(0, owner_t, torch.ones_like(token_loss))
        return sums / counts

    def batch_loss(self, batch: Sequence[Example], weights: Sequence[float],
                   scales: Sequence[float] | None = None) -> torch.Tensor:
        """Weighted sum over tasks of each task's mean answer-token cross-entropy (main 1.0 + aux_weight x impact;
        the speaker stage alone 1.0); ``scales`` multiply single examples' losses (the class-weighted loss)."""
        per_example = self.example_losses(batch)
        if scales is not None:
            per_example = per_example * torch.tensor(scales, device=self.device, dtype=per_example.dtype)
        w = torch.tensor(weights, device=self.device)
        total = torch.zeros((), device=self.device)
        for value in sorted(set(weights)):
            sel = w == value
            total = total + value * per_example[sel].mean()
        return total

    def train(self, examples: dict[str, list[Example]], progress: bool = True,
              on_step: Callable[[int, float], None] | None = None) -> dict:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from transformers import get_linear_schedule_with_warmup

        cfg = self.cfg
        batches = schedule(cfg, examples)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup * len(batches)), len(batches))
        start_step, elapsed0, losses = 0, 0.0, []
        state_file = self.out_dir / "checkpoint" / "trainer_state.pt"
        if state_file.exists():
            state = torch.load(state_file, weights_only=False)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_step, elapsed0, losses = state["step"], state["elapsed"], state["losses"]
            self.dtype_steps = state.get("dtype_steps", [[0, None]])  # None: written before this was recorded
            self.cpu_steps = state.get("cpu_steps", [[0, None]])
            if self.dtype_steps[-1][1] != self.autocast_dtype:
                log.warning("resuming in another autocast dtype than the checkpoint's steps",
                            before=self.dtype_steps[-1][1], now=self.autocast_dtype, step=start_step)
                self.dtype_steps.append([start_step, self.autocast_dtype])
            if self.cpu_steps[-1][1] != self.cpu:
                log.info("resuming on another machine class", before=self.cpu_steps[-1][1], now=self.cpu,
                         step=start_step)
                self.cpu_steps.append([start_step, self.cpu])
            if "rng" in state:
                torch.set_rng_state(state["rng"]["torch"])
                if "cuda" in state["rng"] and self.device.type == "cuda":
                    torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
            else:  # written before the RNG state was checkpointed: still a valid resume, not an exact one
                log.warning("checkpoint has no RNG state: the remaining steps draw other dropout masks than "
                            "an uninterrupted run would")
            log.info("resuming from checkpoint", step=start_step)
        weight = {"main": 1.0, "speaker": 1.0, "impact": cfg.aux_weight}
        main_scales = class_scales(cfg, examples)
        self.model.train()
        t0 = time.monotonic()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                      disable=not progress) as bar:
            task = bar.add_task(f"training {cfg.name}", total=len(batches), completed=start_step, loss=float("nan"))
            for step in range(start_step, len(batches)):
                batch = [examples[t][i] for t, i in batches[step]]
                with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                    enabled=self.autocast_dtype == "bfloat16"):
                    scales = ([main_scales[i] if t == "main" else 1.0 for t, i in batches[step]]
                              if main_scales is not None else None)
                    loss = self.batch_loss(batch, [weight[t] for t, _ in batches[step]], scales)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(task, advance=1, loss=float(np.mean(losses[-10:])))
                if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < len(batches):
                    self._checkpoint(opt, sched, step + 1, elapsed0 + time.monotonic() - t0, losses)
                if on_step is not None:
                    on_step(step + 1, losses[-1])
        self.model.eval()
        return {"steps": len(batches), "seconds": round(elapsed0 + time.monotonic() - t0, 1),
                "dtype": self.autocast_dtype, "dtype_steps": self.dtype_steps, "cpu_steps": self.cpu_steps,
                "resumed_from": start_step,
                "loss_first": losses[0] if losses else None, "loss_last10": float(np.mean(losses[-10:])) if losses else None}

    def _checkpoint(self, opt, sched, step: int, elapsed: float, losses: list[float]) -> None:
        ckpt = self.out_dir / "checkpoint"
        tmp = self.out_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "elapsed": elapsed, "losses": losses, "rng": rng, "dtype_steps": self.dtype_steps,
                    "cpu_steps": self.cpu_steps},
                   tmp / "trainer_state.pt")
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        log.info("checkpoint", step=step)

    def save(self, meta: dict) -> None:
        self.model.save_pretrained(self.out_dir)
        if self.cfg.full:  # a whole model: loadable as a base (``--base <dir>``) with its tokenizer
            self.tokenizer.save_pretrained(self.out_dir)
        (self.out_dir / "erc_meta.json").write_text(json.dumps(meta, indent=2, default=str))
        shutil.rmtree(self.out_dir / "checkpoint", ignore_errors=True)


def training_index(cfg: TrainConfig, conversations, store_dir: Path):
    """The whole training set as a retrieval index, cached in the store per (file, label set, seed):
    embedding a 10k training set costs minutes on 2 cores."""
    from model_store.retrieval import DemoIndex

    label_set = get_label_set(cfg.label_set)
    cache = store_dir / "retrieval-cache" / f"{sources_hash(cfg)}-{label_set.name}-{cfg.seed}"
    if (cache / "items.json").exists():
        return DemoIndex.load(cache)
    index = DemoIndex.build(conversations, label_set, per_label=10**9, seed=cfg.seed)
    index.save(cache)
    return index


# What a resumed run may change: its speed, where the data files lie (a new machine), how often it checkpoints.
RESUME_MAY_CHANGE = frozenset({"threads", "device", "checkpoint_every", "train_file", "eval_file"})


def changed_options(before: dict, now: dict, *, ignore: frozenset[str] = frozenset()) -> dict[str, tuple]:
    """The options whose values differ between two option sets, as ``{key: (before, now)}``, leaving out
    ``ignore``: whether a checkpoint or a result was made under these options. Both are compared, and returned,
    as JSON (a tuple and the list it was saved as are equal), so a message shows them as train_config.json and
    the command line spell them."""
    before, now = json.loads(json.dumps(before)), json.loads(json.dumps(now))
    return {k: (before.get(k), now.get(k)) for k in sorted((before.keys() | now.keys()) - ignore)
            if before.get(k) != now.get(k)}


def check_resumable(out_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint that a run with other options wrote: its weights, optimizer state and
    drawn batches belong to that run, and continuing them under these options would publish an adapter that
    neither command describes (the same ``--name`` with a new ``--epochs``, say)."""
    saved = out_dir / "train_config.json"
    if not (out_dir / "checkpoint").is_dir() or not saved.exists():
        return

    def by_name(config: dict) -> dict:  # more datasets by name, not by path (a new machine)
        return {**config, "more_sources": [dataset for dataset, _ in config.get("more_sources", ())]}

    changed = changed_options(by_name(json.loads(saved.read_text())), by_name(asdict(cfg)), ignore=RESUME_MAY_CHANGE)
    if changed:
        diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"{out_dir / 'checkpoint'} is a run with other options ({diff}): rerun with its options "
                         f"to resume it, or remove {out_dir} to start over")


def train(cfg: TrainConfig, *, store_dir: Path, out_dir: Path | None = None, progress: bool = True,
          command: str | None = None, on_step: Callable[[int, float], None] | None = None) -> Path:
    """Run one training job end to end and write the adapter (or, ``full``, the model) with its metadata;
    returns its directory.

    Without ``out_dir`` a LoRA adapter trains in ``<store>/adapters/<name>/.training/`` (where its checkpoints
    are, so the same command resumes it) and is published as a new immutable version of ``name``
    (``model_store.registry.publish``); versions trained before are never touched.

    ``on_step(steps_done, loss)`` is called after every optimizer step, once that step's checkpoint (if it
    has one) is written: a progress hook, or the way to end a session early (raise from it, or let the
    process be killed there); the same call then resumes from ``<out>/checkpoint``."""
    from model_store.base_models import resolve_base

    if cfg.full and cfg.calibration:
        raise ValueError("calibration is stored with a LoRA adapter; train --full without --calibration")
    from model_store.registry import publish

    versioned = out_dir is None and not cfg.full
    out_dir = out_dir or store_dir / "adapters" / cfg.name / (".training" if versioned else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(out_dir, cfg)
    (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    label_set = get_label_set(cfg.label_set)
    conversations = load_sources(cfg)
    trainer = Trainer(cfg, resolve_base(cfg.base, store_dir), out_dir)
    builder = PromptBuilder(label_set, max_tokens=cfg.max_tokens, count_tokens=trainer.count_tokens,
                            demo_position=cfg.demo_position,  # type: ignore[arg-type]
                            window=WindowShape(cfg.window, cfg.hop), layout=cfg.layout)  # type: ignore[arg-type]
    index = None
    if cfg.demonstrations:
        # Pairing in training searches the whole training set; the (smaller, balanced) index shipped
        # with the adapter is the base searched at inference.
        index = training_index(cfg, conversations, store_dir)
        index.balanced(cfg.index_per_label, seed=cfg.seed).save(out_dir / "demos")
    examples = build_examples(cfg, conversations, builder, index)
    log.info("examples", **{k: len(v) for k, v in examples.items()})
    _, held = split_targets(cfg, conversations, label_set)
    selection, step_hook = None, on_step
    if cfg.eval_every > 0:
        from model_store.post_training import DevSelection

        selection = DevSelection(cfg, store_dir, out_dir, held)
        total = len(schedule(cfg, examples))
        state_file = out_dir / "checkpoint" / "trainer_state.pt"
        if state_file.exists():  # killed while scoring the checkpoint's step: score it before going on
            done = torch.load(state_file, weights_only=False)["step"]
            if done % cfg.eval_every == 0 and not selection.scored(done):
                cand = selection.candidates / f"step-{done:06d}"
                shutil.rmtree(cand, ignore_errors=True)
                shutil.copytree(out_dir / "checkpoint", cand, ignore=shutil.ignore_patterns("trainer_state.pt"))
                selection.evaluate_dir(cand, done)

        def step_hook(step: int, loss: float) -> None:
            if step % cfg.eval_every == 0 and step < total:
                selection.evaluate(trainer.model, step)
            if on_step is not None:
                on_step(step, loss)

    result = trainer.train(examples, progress=progress, on_step=step_hook)
    meta = {
        "name": cfg.name, "kind": cfg.kind, "base": cfg.base, "label_set": cfg.label_set,
        "dataset": "+".join(d for d, _ in cfg.sources), "datasets": [d for d, _ in cfg.sources], "mix": cfg.mix,
        "examples": {k: len(v) for k, v in examples.items()},
        "window": cfg.window, "hop": cfg.hop, "max_tokens": cfg.max_tokens, "demonstrations": cfg.demonstrations,
        "demo_position": cfg.demo_position, "layout": cfg.layout, "data_hash": sources_hash(cfg),
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "train": result, "config": asdict(cfg),
        "command": command,
    }
    trainer.save(meta)
    if selection is not None:
        if not selection.scored(result["steps"]):
            selection.evaluate(trainer.model, result["steps"])
        best = selection.publish_best()
        assert best is not None
        meta["selected"] = {"step": best["step"], "of": result["steps"], "by": "mean dev weighted F1",
                            "limit": cfg.eval_limit, "dev_evaluations": selection.records}
        if best.get("calibration"):
            meta["calibration"] = best["calibration"]
        if cfg.eval_limit is None:
            meta["evals"] = {f"{d}:dev": score for d, score in best["dev"].items()}
        (out_dir / "erc_meta.json").write_text(json.dumps(meta, indent=2, default=str))
        (out_dir / "evals.jsonl").unlink(missing_ok=True)
    if held:
        from model_store.post_training import calibrate, serving_dtype

        # the correction consumers apply is fitted in their dtype; a selected candidate's (fitted in the
        # training's, for the dev scores that chose it) stays in meta["selected"]["dev_evaluations"]
        dtype = serving_dtype()
        if meta.get("calibration", {}).get("dtype") != dtype:
            calibration = calibrate(cfg, store_dir, out_dir, held, dtype)
            meta["calibration"] = calibration.as_dict()
            meta.pop("evals", None)  # the selected candidate's dev scores, under its own correction
            (out_dir / "erc_meta.json").write_text(json.dumps(meta, indent=2, default=str))
            log.info("calibrated", power=calibration.power, weighted_f1_before=calibration.weighted_f1_before,
                     weighted_f1_after=calibration.weighted_f1_after, n=calibration.n, dtype=dtype)
    if versioned:
        out_dir = publish(out_dir, store_dir, cfg.name)
    log.info("adapter written", path=str(out_dir), **result)
    return out_dir


def with_epochs(cfg: TrainConfig, epochs: float) -> TrainConfig:
    """``cfg`` with its main stage sized to ``epochs`` passes over the utterances it samples (a batch of "draws"
    holds ``batch_size - impact_per_batch`` main examples when the impact task is on, one of "blocks"
    ``batch_size``)."""
    import math
    from dataclasses import replace

    chosen, _ = split_targets(cfg, load_sources(cfg), get_label_set(cfg.label_set))
    per_batch = cfg.batch_size
    if cfg.batching == "draws" and cfg.aux_weight > 0:
        per_batch -= cfg.impact_per_batch
    return replace(cfg, steps=max(1, math.ceil(epochs * len(chosen) / max(1, per_batch))))
