"""Launcher of `w4a8::quantize_scatter_fp8` (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch

from .. import formats
from ..kernels.quantize_scatter import quantize_scatter_fp8_kernel
from ._common import device_guard, fast_launch, use_hw_fp8
from .fp8_quant import empty_fp8_rows, fp8_row_tile


def quantize_scatter_fp8(x: torch.Tensor, flat_to_sorted: torch.Tensor):
    """bf16 [T, K], int32 [T, top_k] -> (fp8 [T * top_k, K], fp32 [T * top_k, 1]): row
    flat_to_sorted[t, j] is token t quantized per token. Grid = T, no host sync (capturable).
    Inputs are checked by the op (ops.py) before this is called."""
    T, K = x.shape
    top_k = flat_to_sorted.shape[1]
    R = T * top_k
    a, a_scale = empty_fp8_rows(R, K, x.device)
    if R == 0:
        return a, a_scale
    block_k, warps, one_tile = fp8_row_tile(K)
    with device_guard(x):
        fast_launch(quantize_scatter_fp8_kernel, (T,), x, flat_to_sorted, a.view(torch.uint8), a_scale,
                    K, R, top_k, MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_K=block_k,
                    HW=use_hw_fp8(x), ONE_TILE=one_tile, num_warps=warps)
    return a, a_scale
