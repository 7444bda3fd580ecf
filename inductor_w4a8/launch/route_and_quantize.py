"""`select_and_sort_experts` followed by `quantize_scatter_fp8`, as W4A8MoE's direct eager path
runs them (CUDA, or CPU under TRITON_INTERPRET=1): for one token (decode) a single launch of
kernels/route_and_quantize.py, otherwise the two launchers. Outputs are bit for bit the two ops'.
No op of its own: torch.compile traces the two ops, whose kernels it launches."""
from __future__ import annotations

import torch

from .. import formats
from ..kernels.route_and_quantize import route_and_quantize_one_token_kernel
from ._common import device_guard, fast_launch, next_pow2, use_hw_fp8
from .fp8_quant import empty_fp8_rows
from .quantize_scatter import quantize_scatter_fp8
from .routing import router_settings, router_warps, select_and_sort_experts

# The one-token kernel keeps the hidden row in registers: up to this many columns
# (next_pow2(K) / (32 * warps) <= 64 values a thread at the warps below).
ONE_TOKEN_MAX_K = 16384


def route_and_quantize_scatter(router_logits: torch.Tensor, correction_bias: torch.Tensor | None,
                               hidden_states: torch.Tensor, top_k: int, scoring: str,
                               renormalize: bool, n_group: int, topk_group: int,
                               routed_scaling_factor: float):
    """-> (weights, ids, sorted_rows, flat_to_sorted, expert_offsets, a, a_scale): the outputs of
    select_and_sort_experts(router_logits, ...) and of quantize_scatter_fp8(hidden_states,
    flat_to_sorted). Inputs are checked by W4A8MoE.__call__ (or the ops) before this is called."""
    T, E = router_logits.shape
    K = hidden_states.shape[1]
    if T != 1 or K > ONE_TOKEN_MAX_K:
        routed = select_and_sort_experts(router_logits, correction_bias, top_k, scoring, renormalize,
                                         n_group, topk_group, routed_scaling_factor)
        return (*routed, *quantize_scatter_fp8(hidden_states, routed[3]))
    dev = router_logits.device
    weights = torch.empty((1, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((1, top_k), dtype=torch.int32, device=dev)
    sorted_rows = torch.empty((top_k,), dtype=torch.int32, device=dev)
    flat_to_sorted = torch.empty((1, top_k), dtype=torch.int32, device=dev)
    offsets = torch.empty((E + 1,), dtype=torch.int64, device=dev)
    a, a_scale = empty_fp8_rows(top_k, K, dev)
    logits = router_logits.contiguous()
    hidden_states = hidden_states.contiguous()
    bias = correction_bias.contiguous() if correction_bias is not None else logits
    runtime, constexprs = router_settings(E, top_k, scoring, renormalize, n_group, topk_group,
                                          routed_scaling_factor, correction_bias is not None)
    block_x = max(next_pow2(K), 128)
    warps = max(router_warps(E, n_group, topk_group), min(16, max(4, block_x // 2048)))
    with device_guard(hidden_states):
        fast_launch(route_and_quantize_one_token_kernel, (1,),
                    logits, bias, hidden_states, weights, ids, sorted_rows, flat_to_sorted,
                    offsets, a.view(torch.uint8), a_scale, E, *runtime, K, **constexprs,
                    BLOCK_E1=next_pow2(E + 1), MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_X=block_x,
                    HW=use_hw_fp8(hidden_states), num_warps=warps)
    return weights, ids, sorted_rows, flat_to_sorted, offsets, a, a_scale
