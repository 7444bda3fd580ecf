"""Launcher of `w4a8::select_experts` (CUDA, or CPU under TRITON_INTERPRET=1): one fused kernel,
one program per token, no host sync."""
from __future__ import annotations

import torch

from ..kernels.routing import routing_kernel
from ._common import device_guard, fast_launch, next_pow2


def select_experts(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                   scoring: str, renormalize: bool, n_group: int, topk_group: int,
                   routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (fp32 [T, top_k] weights, int32 [T, top_k] ids), as `reference.select_experts`
    up to the rounding of exp. n_group = 0: no grouped top-k. Inputs are checked by the op."""
    T, E = router_logits.shape
    weights = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return weights, ids
    grouped = bool(n_group) and topk_group < n_group   # keeping every group is no grouping
    groups = n_group if grouped else 1
    group_len = E // groups
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    bias = correction_bias.contiguous() if correction_bias is not None else router_logits
    with device_guard(router_logits):
        fast_launch(routing_kernel, (T,),
            router_logits, bias, weights, ids, router_logits.stride(0), E, groups, group_len,
            topk_group if grouped else 1, float(routed_scaling_factor), TOP_K=top_k,
            BLOCK_G=next_pow2(groups), BLOCK_GL=next_pow2(group_len), BLOCK_K=next_pow2(top_k),
            SOFTMAX=scoring == "softmax", HAS_BIAS=correction_bias is not None, GROUPED=grouped,
            RENORMALIZE=bool(renormalize), num_warps=_warps(next_pow2(groups) * next_pow2(group_len)))
    return weights, ids


def _warps(tile: int) -> int:
    # the top-k loop is a chain of small reductions over the tile: one warp (shuffles only, no
    # shared memory round trips) up to 256 experts, more only for wide routers
    return max(1, min(8, tile // 256))
