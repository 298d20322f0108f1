"""The packed forward of the transformers backend: a micro-batch's rows as one sequence of their new tokens.

A padded batch (``HFBackend._forward``) computes every row to the longest new part of its pass: in a stream,
where each row is one turn's line after its conversation's cached past, the padding is a quarter of the work,
and splitting rows into passes of similar lengths trades it for more passes, each paying the per-layer cost of
some thirty small operations. Here the rows' new tokens are concatenated into one sequence, as vLLM's
variable-length batches are: every matrix product of a layer (the projections and the MLP, where the FLOPs
are) runs once over exactly the tokens the micro-batch needs, with no padding, and only attention is done row
by row, each row's queries against its own cached keys and values and its new ones (causal, lower-right
aligned). The keys and values each row ends with are returned whole for the prefix cache.

It drives the model's own modules (embedding, norms, projections, MLP, rotary embedding, head), so a peft
LoRA adapter, merged or not, applies as in the model's forward. Decoder layers of the Llama shape only
(pre-norm attention and MLP, rotary positions, full attention in every layer): :func:`supports`; other models
take the padded path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

#: Model types whose decoder layers have the Llama shape (and full attention in every layer).
PACKED_MODEL_TYPES = frozenset({"llama"})

#: Per layer, (keys, values), each [kv_heads, tokens, head_dim] (the prefix cache's format).
LayerKV = tuple[torch.Tensor, torch.Tensor]


def supports(model) -> bool:
    """True where :func:`packed_forward` computes what the model's own forward does."""
    config = model.config
    return (config.model_type in PACKED_MODEL_TYPES and getattr(config, "sliding_window", None) is None
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


@dataclass(frozen=True)
class PackedRow:
    """One row: the tokens to compute, at positions ``past`` onwards, after ``past`` tokens whose per-layer keys
    and values ``past_kv`` holds (at least ``past`` positions of each; None when ``past`` is 0)."""

    new: Sequence[int]
    past: int = 0
    past_kv: Sequence[LayerKV] | None = None


def packed_forward(model, rows: Sequence[PackedRow]) -> tuple[torch.Tensor, list[list[LayerKV]]]:
    """Next-token log-probabilities after each row ([rows, vocab], float32, on the CPU) and each row's keys and
    values over all its positions, past and new (per layer, [kv_heads, past + new, head_dim])."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    config = model.config
    device = inner.embed_tokens.weight.device
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = [len(r.new) for r in rows]
    ends = torch.tensor(lengths).cumsum(0)
    starts = (ends - torch.tensor(lengths)).tolist()
    ids = torch.tensor([t for r in rows for t in r.new], dtype=torch.long, device=device)[None]
    positions = torch.cat([torch.arange(r.past, r.past + n) for r, n in zip(rows, lengths)])[None].to(device)
    masks = [_causal_mask(n, r.past, device) for r, n in zip(rows, lengths)]
    hidden = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(hidden, positions)
    kv_out: list[list[LayerKV]] = [[] for _ in rows]
    tokens = ids.shape[1]
    for li, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(1, tokens, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, tokens, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, tokens, kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k[0], v[0]
        outs = []
        for r, (row, s, n, mask) in enumerate(zip(rows, starts, lengths, masks)):
            kr, vr = k[:, s:s + n], v[:, s:s + n]
            if row.past:
                pk, pv = row.past_kv[li]  # type: ignore[index]
                kr, vr = torch.cat([pk[:, :row.past], kr], 1), torch.cat([pv[:, :row.past], vr], 1)
            else:
                kr, vr = kr.contiguous(), vr.contiguous()
            kv_out[r].append((kr, vr))
            o = F.scaled_dot_product_attention(q[:, :, s:s + n], kr[None], vr[None], attn_mask=mask,
                                               enable_gqa=kv_heads != heads)
            outs.append(o[0].transpose(0, 1).reshape(n, heads * head_dim))
        hidden = hidden + attn.o_proj(torch.cat(outs)[None])
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    last = inner.norm(hidden[0, ends - 1])
    return model.lm_head(last).float().log_softmax(-1).cpu(), kv_out


def _causal_mask(new: int, past: int, device) -> torch.Tensor | None:
    """Query i (at position past + i) sees keys 0 … past + i; None where that is every key (one new token)."""
    if new == 1:
        return None
    keys = torch.arange(past + new, device=device)
    return keys[None, :] <= (past + torch.arange(new, device=device))[:, None]

