"""Launchers of `w4a8::select_experts` and `w4a8::select_and_sort_experts` (CUDA, or CPU under
TRITON_INTERPRET=1): one program per token, no host sync. For a single token (decode) the routing
kernel also sorts (one launch for both ops); otherwise the sort is `moe_sort.sort_by_expert`."""
from __future__ import annotations

import torch

from ..kernels.routing import routing_kernel
from ._common import device_guard, fast_launch, next_pow2
from .moe_sort import sort_by_expert


def select_experts(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                   scoring: str, renormalize: bool, n_group: int, topk_group: int,
                   routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (fp32 [T, top_k] weights, int32 [T, top_k] ids), as `reference.select_experts`
    up to the rounding of exp. n_group = 0: no grouped top-k. Inputs are checked by the op."""
    weights, ids = _routing_outputs(router_logits, top_k)
    if router_logits.shape[0]:
        _launch(router_logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group,
                routed_scaling_factor, weights, ids, None)
    return weights, ids


def select_and_sort_experts(router_logits: torch.Tensor, correction_bias: torch.Tensor | None,
                            top_k: int, scoring: str, renormalize: bool, n_group: int,
                            topk_group: int, routed_scaling_factor: float):
    """select_experts, then sort_by_expert of its ids over E = router_logits.shape[1] experts:
    (weights, ids, sorted_rows, flat_to_sorted, expert_offsets). One launch when T = 1."""
    T, E = router_logits.shape
    if T != 1:
        weights, ids = select_experts(router_logits, correction_bias, top_k, scoring, renormalize,
                                      n_group, topk_group, routed_scaling_factor)
        return (weights, ids, *sort_by_expert(ids, E))
    weights, ids = _routing_outputs(router_logits, top_k)
    dev = router_logits.device
    sort = (torch.empty((top_k,), dtype=torch.int32, device=dev),
            torch.empty((1, top_k), dtype=torch.int32, device=dev),
            torch.empty((E + 1,), dtype=torch.int64, device=dev))
    _launch(router_logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group,
            routed_scaling_factor, weights, ids, sort)
    return (weights, ids, *sort)


def _routing_outputs(router_logits: torch.Tensor, top_k: int):
    T = router_logits.shape[0]
    return (torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device),
            torch.empty((T, top_k), dtype=torch.int32, device=router_logits.device))


def router_settings(E: int, top_k: int, scoring: str, renormalize: bool, n_group: int,
                    topk_group: int, routed_scaling_factor: float, has_bias: bool):
    """(runtime args after E: n_group, group_len, topk_group, scaling; constexprs; num_warps) of
    `kernels.routing.route_token`."""
    grouped = bool(n_group) and topk_group < n_group   # keeping every group is no grouping
    groups = n_group if grouped else 1
    group_len = E // groups
    runtime = (groups, group_len, topk_group if grouped else 1, float(routed_scaling_factor))
    constexprs = dict(TOP_K=top_k, BLOCK_G=next_pow2(groups), BLOCK_GL=next_pow2(group_len),
                      BLOCK_K=next_pow2(top_k), SOFTMAX=scoring == "softmax", HAS_BIAS=has_bias,
                      GROUPED=grouped, RENORMALIZE=bool(renormalize))
    return runtime, constexprs, _warps(next_pow2(groups) * next_pow2(group_len))


def _launch(router_logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group,
            routed_scaling_factor, weights, ids, sort):
    """One program per token; `sort` = (sorted_rows, flat_to_sorted, offsets) to fill for T = 1."""
    T, E = router_logits.shape
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    bias = correction_bias.contiguous() if correction_bias is not None else router_logits
    sorted_rows, flat_to_sorted, offsets = sort if sort is not None else (ids, ids, ids)
    runtime, constexprs, warps = router_settings(E, top_k, scoring, renormalize, n_group,
                                                 topk_group, routed_scaling_factor,
                                                 correction_bias is not None)
    with device_guard(router_logits):
        fast_launch(routing_kernel, (T,),
            router_logits, bias, weights, ids, sorted_rows, flat_to_sorted, offsets,
            router_logits.stride(0), E, *runtime, **constexprs,
            SORT_ONE_TOKEN=sort is not None, BLOCK_E1=next_pow2(E + 1) if sort is not None else 1,
            num_warps=warps)


def _warps(tile: int) -> int:
    # the top-k loop is a chain of small reductions over the tile: one warp (shuffles only, no
    # shared memory round trips) up to 256 experts, more only for wide routers
    return max(1, min(8, tile // 256))
