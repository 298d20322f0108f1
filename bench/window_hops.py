"""How ``window.hop`` was chosen: the tokens each turn must compute, by hop and token budget, without a model.

A backend with a perfect prefix cache computes, for each turn, the prompt's tokens after the longest prefix it
shares with its conversation's previous prompt (the hf backend's cache reaches that within a token or two,
vLLM's within a block). That figure depends only on the prompts, so it is counted here with the tokenizer
alone, for every (hop, ``model.max_prompt_tokens``) pair, on the long conversations of ``erc-stream bench
--long`` (:mod:`bench.long_conversations`) and on their scenes as short conversations. Weighted F1 needs the
model: it is measured for the chosen pair (``erc-stream models eval``, ``erc-stream bench --long``).

    ERC_DATA__DIR=../shared/data python -m bench.window_hops --hops 1,4,8,12,16,24 --budgets 384,512 --json
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from bench.prefix_sharing import shared_prefix
from core.settings import Settings


def new_tokens(settings: Settings, conversations: Sequence, count_from: int = 0) -> dict[str, float]:
    """Prompt and new tokens per utterance of ``conversations`` (model_store Conversations) under ``settings``'
    window and budget, over the turns from ``count_from`` on (earlier turns still build the cache)."""
    from transformers import AutoTokenizer

    from core.labels import get_label_set
    from model_store.base_models import resolve_base
    from model_store.examples import Target
    from scoring.prompts import PromptBuilder, Turn

    tok = _tokenizer(resolve_base(settings.model.base, settings.store.dir), AutoTokenizer)
    builder = PromptBuilder.configured(settings, get_label_set(settings.model.label_set),
                                       lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    prompts = new = n = 0
    # what every prompt shares (the instruction): a conversation's first prompt finds it in the cache
    other = tok(builder.emotion([Turn("nobody", "-")]).text)["input_ids"]
    for conv in conversations:
        prev: list[int] = []
        for i in range(len(conv.utterances)):
            ids = tok(builder.emotion(Target(conv, i, "").window(builder.window.span)).text)["input_ids"]
            shared = min(max(shared_prefix(ids, prev), shared_prefix(ids, other)), len(ids) - 1)
            if i >= count_from:
                prompts += len(ids)
                new += len(ids) - shared
                n += 1
            prev = ids
    return {"utterances": n, "prompt_tokens_per_utterance": round(prompts / max(n, 1), 1),
            "new_tokens_per_utterance": round(new / max(n, 1), 1)}


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path, auto):
    key = str(path)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = auto.from_pretrained(path)
    return _TOKENIZERS[key]


def sweep(settings: Settings, hops: Sequence[int], budgets: Sequence[int], conversations: int = 7,
          turns: int = 200) -> dict[str, Any]:
    """New tokens per utterance for each (hop, budget), on the long conversations and on their scenes."""
    from bench.long_conversations import LABEL_SET, lanes

    base = settings.with_overrides(model={"label_set": LABEL_SET})
    lanes_, source = lanes(base, conversations, turns)
    episodes = [type(lane.scenes[0])(LABEL_SET, lane.episode, tuple(u for s in lane.scenes for u in s.utterances))
                for lane in lanes_]
    scenes = [s for lane in lanes_ for s in lane.scenes]
    rows = []
    for budget in budgets:
        for hop in hops:
            s = base.with_overrides(window={"hop": hop}, model={"max_prompt_tokens": budget})
            rows.append({"hop": hop, "max_prompt_tokens": budget,
                         "scenes": new_tokens(s, scenes), "long": new_tokens(s, episodes),
                         "long_after_first_window": new_tokens(s, episodes, count_from=s.window.size)})
    return {"source": source, "window_size": settings.window.size, "conversations": len(episodes),
            "turns": sum(len(e.utterances) for e in episodes), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hops", default="1,4,8,12,16,24")
    p.add_argument("--budgets", default="384,512")
    p.add_argument("--conversations", type=int, default=7)
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    result = sweep(Settings(), [int(x) for x in a.hops.split(",")], [int(x) for x in a.budgets.split(",")],
                   a.conversations, a.turns)
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['conversations']} conversations, {result['turns']} turns, from {result['source']}")
    print("budget  hop | scenes new/prompt | long new/prompt | long after the first window new/prompt")
    for r in result["rows"]:
        print(f"{r['max_prompt_tokens']:>6} {r['hop']:>4} | "
              + " | ".join(f"{r[k]['new_tokens_per_utterance']:>6} / {r[k]['prompt_tokens_per_utterance']:<6}"
                           for k in ("scenes", "long", "long_after_first_window")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
