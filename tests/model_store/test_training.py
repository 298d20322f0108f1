"""Real training runs on the embedded model: a two-step one stopped after its first step and resumed, and one
killed (SIGKILL) mid-run and resumed."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.labels import get_label_set
from core.settings import Settings
from model_store.examples import Example, impact_example, main_example, speaker_example, targets
from model_store.training import TrainConfig, build_examples, schedule, train
from producer_sim.synthetic import synthetic_conversations
from scoring.hardware import cpu_kind
from scoring.prompts import Prompt, PromptBuilder, WindowShape


def _write_jsonl(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for conv in synthetic_conversations(n):
            f.write(json.dumps({"conversation_id": conv.conversation_id, "turns": [
                {"speaker": u.speaker, "text": u.text, "label": u.label} for u in conv.utterances]}) + "\n")
    return path


class _Stop(Exception):
    """Raised from ``on_step`` to end a training run between two steps, its checkpoint on disk."""


def test_examples_for_the_three_tasks() -> None:
    convs = synthetic_conversations(2)
    builder = PromptBuilder(get_label_set("meld"), max_tokens=10_000)
    ts = targets(convs, builder.label_set)
    assert len(ts) == sum(len(c.utterances) for c in convs)
    t = ts[2]
    main = main_example(t, builder, None)
    assert main.answer == t.label and main.answer in main.prompt.choices and t.text in main.prompt.text
    impact = impact_example(t, builder)
    assert impact is not None and impact.answer == t.label and t.text not in impact.prompt.text
    assert impact_example(ts[0], builder) is None  # no history before the first turn
    sp = speaker_example(t, builder)
    assert sp is not None and sp.answer in sp.prompt.choices and sp.answer.startswith("Speaker_")


def test_examples_draw_the_windows_the_stream_serves() -> None:
    """A long conversation's examples: speakers numbered by the conversation, windows on the hop grid."""
    from model_store.data import Conversation, Utterance
    from scoring.prompts import WindowShape

    def speaker(i: int) -> str:
        return "Supervisor" if i == 29 else "Agent" if i % 2 == 0 else "Customer"

    conv = Conversation("jsonl", "long", tuple(Utterance(speaker(i), f"line {i}", "neutral") for i in range(40)))
    shape = WindowShape(8, 4)
    builder = PromptBuilder(get_label_set("meld"), max_tokens=10_000, window=shape)
    ts = targets([conv], builder.label_set)
    for t in ts:
        turns = t.window(shape.span)
        assert [x.position for x in turns] == list(range(max(0, t.index - shape.span + 1), t.index + 1))
        assert [x.speaker_id for x in turns] == [2 if x.speaker == "Supervisor" else x.position % 2 for x in turns]
        assert main_example(t, builder, None).prompt.turns_used == t.index - shape.first(t.index) + 1
    late = main_example(ts[35], builder, None).prompt.text  # window 28..35: the agent spoke first, then the customer
    assert '### Speaker_0: "line 28"\nSpeaker_2: "line 29"\nSpeaker_0: "line 30"' in late
    assert 'Speaker_1: "line 35" ###' in late
    sp = speaker_example(ts[35], builder)
    assert sp is not None and sp.prompt.choices == ("Speaker_0", "Speaker_1", "Speaker_2") and sp.answer == "Speaker_1"


def test_schedule_is_deterministic_and_mixes_impact_into_main_batches() -> None:
    cfg = TrainConfig(name="x", dataset="jsonl", train_file="-", label_set="meld", speaker_steps=2, steps=3,
                      batch_size=4, impact_per_batch=1)
    builder = PromptBuilder(get_label_set("meld"), max_tokens=10_000)
    examples = build_examples(cfg, synthetic_conversations(3), builder, None)
    a, b = schedule(cfg, examples), schedule(cfg, examples)
    assert a == b and len(a) == 5
    assert all(task == "speaker" for task, _ in a[0] + a[1])
    assert [task for task, _ in a[2]] == ["main"] * 3 + ["impact"]


def test_two_step_training_writes_an_adapter_with_metadata_and_resumes(tmp_path: Path) -> None:
    """1 speaker step + 1 main step, stopped once the first step's checkpoint is on disk, then the same call
    again: the second run starts at the checkpoint's step, does only the step left, and writes the adapter.
    (In process, by an exception; the SIGKILL case, and that the result equals an uninterrupted run, are
    ``test_a_run_killed_mid_way_...`` below.)"""
    import torch

    data = _write_jsonl(tmp_path / "train.jsonl", 4)
    cfg = TrainConfig(name="tiny", dataset="jsonl", train_file=str(data), label_set="meld", speaker_steps=1,
                      steps=1, batch_size=2, impact_per_batch=1, max_tokens=160, checkpoint_every=1,
                      index_per_label=3, threads=1)
    out = tmp_path / "adapters" / "tiny"
    first: list[tuple[int, float]] = []

    def stop_after_one(step: int, loss: float) -> None:
        first.append((step, loss))
        if step == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, store_dir=Settings().store.dir, out_dir=out, progress=False, command="test", on_step=stop_after_one)
    assert [s for s, _ in first] == [1] and not (out / "erc_meta.json").exists()
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and state["losses"] == [first[0][1]]

    resumed: list[int] = []
    path = train(cfg, store_dir=Settings().store.dir, out_dir=out, progress=False, command="test",
                 on_step=lambda step, loss: resumed.append(step))
    assert resumed == [2]  # from the checkpoint's step to the end: step 1 is not redone
    assert (path / "adapter_model.safetensors").stat().st_size > 10_000
    meta = json.loads((path / "erc_meta.json").read_text())
    assert meta["label_set"] == "meld" and meta["window"] == 12 and meta["demonstrations"] is True
    assert meta["train"]["resumed_from"] == 1 and meta["train"]["steps"] == 2 == resumed[-1]
    assert meta["train"]["loss_first"] == first[0][1] > 0  # the checkpoint's losses carried over
    assert len(meta["data_hash"]) == 16
    assert (path / "demos" / "items.json").exists()
    assert not (path / "checkpoint").exists()  # removed once the adapter is final


def test_training_again_under_a_name_adds_a_version_and_leaves_the_old_one(tmp_path: Path) -> None:
    from model_store.base_models import ensure_embedded
    from model_store.registry import Registry, versions

    data = _write_jsonl(tmp_path / "train.jsonl", 3)
    store = tmp_path / "store"
    base = str(ensure_embedded(Settings().store.dir))  # a local HF directory: no conversion into this store
    cfg = TrainConfig(name="again", dataset="jsonl", train_file=str(data), label_set="meld", base=base,
                      speaker_steps=0, steps=1, batch_size=2, impact_per_batch=0, aux_weight=0.0, max_tokens=128,
                      demonstrations=False, threads=1)
    first = train(cfg, store_dir=store, progress=False, command="test")
    weights = (first / "adapter_model.safetensors").read_bytes()
    second = train(TrainConfig(**{**cfg.__dict__, "seed": 1}), store_dir=store, progress=False, command="test")
    assert first != second and first.parent == second.parent == store / "adapters" / "again"
    assert (first / "adapter_model.safetensors").read_bytes() == weights  # never touched
    assert [ref.path for ref in versions("again", store)] == [first, second]
    assert Registry(store).info("again").path == second  # a bare name is its newest version
    assert not (store / "adapters" / "again" / ".training").exists()


# Runs one training in a process of its own and SIGKILLs that process from ``on_step`` once ``stop`` steps
# are done (their checkpoint is on disk by then): a session that dies between two steps, nothing flushed.
_KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
from core.settings import Settings
from model_store.training import TrainConfig, train

kwargs, out, stop = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def on_step(step, loss):
    if step == stop:
        os.kill(os.getpid(), signal.SIGKILL)

train(TrainConfig(**kwargs), store_dir=Settings().store.dir, out_dir=out, progress=False, command="test",
      on_step=on_step)
"""


def test_a_run_killed_mid_way_resumes_to_the_same_adapter_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """1 speaker step + 4 main steps, with LoRA dropout on: run A straight through; run B killed after
    step 3 (kill -9 in a subprocess), then resumed by the same call. B must end with A's adapter: the
    checkpoint carries the weights, AdamW's moments, the scheduler, the step and the torch RNG (dropout
    masks); the batches are drawn up front from the seed. Same code, same thread count, so the result is
    expected bit for bit; the tolerance only allows for float reassociation (rtol 1e-5, atol 1e-6)."""
    import torch
    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "train.jsonl", 4)
    kwargs = dict(name="resume", dataset="jsonl", train_file=str(data), label_set="meld", speaker_steps=1,
                  steps=4, batch_size=2, impact_per_batch=1, max_tokens=160, checkpoint_every=1,
                  index_per_label=3, threads=1)
    cfg = TrainConfig(**kwargs)
    assert cfg.lora_dropout > 0  # the dropout masks are what the RNG state has to carry
    store = Settings().store.dir

    steps_a: list[tuple[int, float]] = []
    a = train(cfg, store_dir=store, out_dir=tmp_path / "a", progress=False, command="test",
              on_step=lambda step, loss: steps_a.append((step, loss)))
    assert [s for s, _ in steps_a] == [1, 2, 3, 4, 5]

    b = tmp_path / "b"
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(kwargs), str(b), "3"],
                            cwd=Path(__file__).resolve().parents[2], env=os.environ, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (b / "erc_meta.json").exists()
    state = torch.load(b / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3
    torch.testing.assert_close(state["losses"], [loss for _, loss in steps_a[:3]], rtol=1e-5, atol=1e-6)

    # The checkpoint is refused to a run with other options (more steps: another schedule), and kept.
    with pytest.raises(ValueError, match=r"other options \(steps: 4 -> 6\)"):
        train(TrainConfig(**{**kwargs, "steps": 6}), store_dir=store, out_dir=b, progress=False, command="test")
    with pytest.raises(ValueError, match=r"\(target_modules: \['q_proj', 'k_proj', 'v_proj', 'o_proj'\] -> "
                                         r"\['q_proj', 'v_proj'\]\)"):  # spelled as saved, a tuple as its list
        train(TrainConfig(**{**kwargs, "target_modules": ("q_proj", "v_proj")}), store_dir=store, out_dir=b,
              progress=False, command="test")
    assert (b / "checkpoint" / "trainer_state.pt").exists()

    steps_b: list[tuple[int, float]] = []
    train(cfg, store_dir=store, out_dir=b, progress=False, command="test",
          on_step=lambda step, loss: steps_b.append((step, loss)))
    assert [s for s, _ in steps_b] == [4, 5]  # steps 1-3 were not redone
    meta_a = json.loads((a / "erc_meta.json").read_text())
    meta_b = json.loads((b / "erc_meta.json").read_text())
    assert meta_a["train"]["resumed_from"] == 0 and meta_b["train"]["resumed_from"] == 3
    assert meta_b["train"]["steps"] == 5 and not (b / "checkpoint").exists()
    assert meta_b["train"]["dtype_steps"] == meta_a["train"]["dtype_steps"] == [[0, meta_a["train"]["dtype"]]]
    assert meta_b["train"]["cpu_steps"] == meta_a["train"]["cpu_steps"] == [[0, cpu_kind()]]
    torch.testing.assert_close([loss for _, loss in steps_b], [loss for _, loss in steps_a[3:]],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(meta_b["train"]["loss_last10"], meta_a["train"]["loss_last10"], rtol=1e-5, atol=1e-6)

    weights_a, weights_b = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 0
    diff = max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a)
    print(f"max |A - B| over the adapter's tensors: {diff:.3g}")
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_block_batches_walk_every_main_example_once_an_epoch_with_its_impact_example() -> None:
    cfg = TrainConfig(name="x", dataset="jsonl", train_file="-", label_set="meld", speaker_steps=1, steps=100,
                      batch_size=5, batching="blocks", hop=4, window=4)
    builder = PromptBuilder(get_label_set("meld"), max_tokens=10_000, window=WindowShape(4, 4))
    examples = build_examples(cfg, synthetic_conversations(3), builder, None)
    n = len(examples["main"])
    per_epoch = -(-n // 5)
    cfg = TrainConfig(**{**cfg.__dict__, "steps": 2 * per_epoch})
    batches = schedule(cfg, examples)
    assert batches == schedule(cfg, examples) and len(batches) == 1 + 2 * per_epoch
    first_epoch = [i for b in batches[1: 1 + per_epoch] for t, i in b if t == "main"]
    assert sorted(first_epoch) == list(range(n))  # each main example once
    for b in batches[1:]:
        mains = {examples["main"][i].key for t, i in b if t == "main"}
        impacts = [examples["impact"][i].key for t, i in b if t == "impact"]
        assert set(impacts) <= mains and len(impacts) == len(set(impacts))  # only the batch's own utterances
    # a block's examples are walked together: batches hold few blocks
    blocks = {examples["main"][i].block for t, i in batches[1] if t == "main"}
    assert len(blocks) <= 2
    with pytest.raises(ValueError, match="class_weight"):
        schedule(TrainConfig(**{**cfg.__dict__, "balance": 0.5}), examples)


def test_class_weights_scale_rare_labels_up_and_average_one() -> None:
    from model_store.training import class_scales

    def ex(label: str) -> Example:
        return Example(Prompt("p", ("a", "b"), 1), label, "main")

    examples = {"main": [ex("a")] * 3 + [ex("b")], "impact": [], "speaker": []}
    cfg = TrainConfig(name="x", dataset="jsonl", train_file="-", label_set="meld", class_weight=1.0)
    scales = class_scales(cfg, examples)
    assert scales is not None and sum(scales) == pytest.approx(4) and scales[3] == pytest.approx(3 * scales[0])
    assert class_scales(TrainConfig(**{**cfg.__dict__, "class_weight": 0.0}), examples) is None


def test_blocks_with_dev_evaluation_publish_the_best_candidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A packed, block-batched run scored on a dev file every 2 steps: each score is recorded, the published
    adapter is the best candidate's weights, the others are gone. Its label-prior correction is fitted again
    in the dtype consumers serve in where that is not the training's (the candidates' stay in their records)."""
    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "train.jsonl", 3)
    dev = _write_jsonl(tmp_path / "dev.jsonl", 1)
    cfg = TrainConfig(name="sel", dataset="jsonl", train_file=str(data), label_set="meld", speaker_steps=0,
                      steps=4, batch_size=4, batching="blocks", max_tokens=160, demonstrations=False,
                      calibration=8, eval_every=2, eval_file=str(dev), eval_limit=6, threads=1, class_weight=0.5,
                      dtype="float32")
    out = tmp_path / "sel"
    monkeypatch.setenv("ERC_MODEL__DTYPE", "bfloat16")  # consumers serve in bf16, the run trains in float32
    train(cfg, store_dir=Settings().store.dir, out_dir=out, progress=False, command="test")
    meta = json.loads((out / "erc_meta.json").read_text())
    evals = meta["selected"]["dev_evaluations"]
    assert [e["step"] for e in evals] == [2, 4] and all(e["dev"]["jsonl"]["n"] == 6 for e in evals)
    best = max(evals, key=lambda e: (e["score"], e["step"]))
    assert meta["selected"]["step"] == best["step"] and best["calibration"]["dtype"] == "float32"
    assert meta["calibration"]["dtype"] == "bfloat16" and meta["calibration"]["n"] == best["calibration"]["n"] == 8
    assert meta["calibration"]["prior"] != best["calibration"]["prior"]
    assert not (out / "candidates").exists() and not (out / "evals.jsonl").exists()
    assert load_file(out / "adapter_model.safetensors")  # the published weights load


def test_a_run_resumed_where_auto_resolves_to_another_dtype_records_where_it_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--dtype auto`` is bfloat16 on a CPU with native bf16 and float32 elsewhere, and sessions here get either:
    a run carried from one to the other mixes the two, and its metadata must say from which step, and on which
    machine class each stretch ran."""
    import scoring.hardware
    from scoring.hardware import auto_dtype

    data = _write_jsonl(tmp_path / "train.jsonl", 3)
    cfg = TrainConfig(name="mixed", dataset="jsonl", train_file=str(data), label_set="meld", speaker_steps=0,
                      steps=2, batch_size=2, impact_per_batch=0, aux_weight=0.0, max_tokens=128,
                      demonstrations=False, checkpoint_every=1, threads=1)
    first = auto_dtype(cfg.device)
    other = "float32" if first == "bfloat16" else "bfloat16"

    def stop_after_one(step: int, loss: float) -> None:
        if step == 1:
            raise _Stop

    out = tmp_path / "out"
    with pytest.raises(_Stop):
        train(cfg, store_dir=Settings().store.dir, out_dir=out, progress=False, command="test", on_step=stop_after_one)
    monkeypatch.setattr(scoring.hardware, "auto_dtype", lambda device: other)  # the next session's CPU
    monkeypatch.setattr(scoring.hardware, "cpu_kind", lambda device: "next-cpu")
    train(cfg, store_dir=Settings().store.dir, out_dir=out, progress=False, command="test")
    meta = json.loads((out / "erc_meta.json").read_text())["train"]
    assert meta["resumed_from"] == 1 and meta["dtype"] == other
    assert meta["dtype_steps"] == [[0, first], [1, other]]
    assert meta["cpu_steps"] == [[0, cpu_kind()], [1, "next-cpu"]]
