"""Launcher of `w4a8::gather_rows_fp8` (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch

from ..kernels.moe_gather import gather_rows_kernel
from ._common import cdiv, device_guard, fast_launch, next_pow2

TILE_WORDS = 4096
MAX_BLOCK_K = 1024
MIN_BLOCK_K = 128


def gather_rows_fp8(xq: torch.Tensor, x_scale: torch.Tensor, sorted_rows: torch.Tensor, top_k: int):
    """fp8 [T, K], fp32 [T, 1], int32 [R] -> (fp8 [R, K], fp32 [R, 1]): row r is token
    sorted_rows[r] // top_k. Inputs are checked by the op (ops.py) before this is called."""
    T, K = xq.shape
    R = sorted_rows.shape[0]
    a = torch.empty((R, K), dtype=xq.dtype, device=xq.device)
    a_scale = torch.empty((R, 1), dtype=torch.float32, device=xq.device)
    if R == 0 or T == 0:
        return a, a_scale
    x_scale, sorted_rows = x_scale.contiguous(), sorted_rows.contiguous()
    word = torch.int32 if K % 4 == 0 and K > 0 else torch.uint8  # 4-byte words when rows allow
    src, dst = xq.view(torch.uint8).view(word), a.view(torch.uint8).view(word)
    words = src.shape[1]
    block_k = min(next_pow2(words), MAX_BLOCK_K)  # words = 0 (K = 0): the scales alone
    while block_k > MIN_BLOCK_K and words % block_k:  # whole tiles when K allows (K = 5120: 256)
        block_k //= 2
    block_r = max(1, TILE_WORDS // block_k)
    grid = (cdiv(R, block_r), max(cdiv(words, block_k), 1))
    with device_guard(xq):
        fast_launch(gather_rows_kernel, grid, src, x_scale, sorted_rows, dst, a_scale, R, T, words, top_k,
                                 BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return a, a_scale
