"""Launcher of `w4a8::combine` (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch

from ..kernels.moe_combine import combine_kernel
from ._common import cdiv, device_guard, fast_launch, next_pow2, use_hw_fp8

TILE_ELEMS = 2048
MAX_BLOCK_H = 1024


def combine(y: torch.Tensor, flat_to_sorted: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """bf16 [T*k, H], int32 [T, k], fp32 [T, k] -> bf16 [T, H]. Inputs are checked by the op."""
    T, k = flat_to_sorted.shape
    R, H = y.shape
    out = torch.empty((T, H), dtype=torch.bfloat16, device=y.device)
    if T == 0 or H == 0:
        return out
    block_h = min(next_pow2(H), MAX_BLOCK_H)
    block_t = max(1, TILE_ELEMS // block_h)
    flat_to_sorted, topk_weights = flat_to_sorted.contiguous(), topk_weights.contiguous()
    with device_guard(y):
        fast_launch(
            combine_kernel, (cdiv(T, block_t), cdiv(H, block_h)),
            y, flat_to_sorted, topk_weights, out, T, H, R, TOP_K=k, BLOCK_T=block_t,
            BLOCK_H=block_h, HW=use_hw_fp8(y), num_warps=8)
    return out
