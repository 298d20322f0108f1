"""How much of a turn's prompt is shared with the previous turn's prompt of the same conversation?

That shared prefix is what prefix caching (vLLM, or a per-conversation KV cache) can reuse. It
compares the two demonstration positions of the prompt builder on a dataset's dev split, with real
retrieved demonstrations and the embedded model's tokenizer.

    .venv/bin/python bench/prefix_sharing.py --dataset meld --dialogues 40
"""

from __future__ import annotations

import argparse
import json

from core.labels import get_label_set
from core.settings import Settings
from model_store.base_models import resolve_base
from model_store.data import default_file, load_conversations
from model_store.examples import targets
from model_store.retrieval import DemoIndex
from scoring.prompts import PromptBuilder, WindowShape


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="meld")
    ap.add_argument("--dialogues", type=int, default=40)
    ap.add_argument("--window", type=int, default=12)
    args = ap.parse_args()
    s = Settings()
    label_set = get_label_set(args.dataset)
    tok = AutoTokenizer.from_pretrained(resolve_base(s.model.base, s.store.dir))
    convs = load_conversations(args.dataset, default_file(s.data.dir, args.dataset, "dev"))[: args.dialogues]
    train = load_conversations(args.dataset, default_file(s.data.dir, args.dataset, "train"))
    index = DemoIndex.build(train, label_set, per_label=400)
    items = targets(convs, label_set)
    demos = index.lookup([t.text for t in items])
    out = {}
    for position in ("after_history", "after_instruction"):
        b = PromptBuilder(label_set, max_tokens=s.model.max_prompt_tokens, demo_position=position,
                          count_tokens=lambda x: len(tok(x, add_special_tokens=False)["input_ids"]),
                          window=WindowShape(args.window, s.window.hop))
        total = shared = 0
        prev: dict[str, list[int]] = {}
        for t, d in zip(items, demos):
            ids = tok(b.emotion(t.window(b.window.span), d).text)["input_ids"]
            key = t.conversation.conversation_id
            if key in prev:
                shared += shared_prefix(prev[key], ids)
                total += len(ids)
            prev[key] = ids
        out[position] = {"prompt_tokens": total, "shared_with_previous_turn": shared,
                         "shared_fraction": round(shared / max(total, 1), 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
