"""Launcher: per-token fp8 quantization of bf16 activations."""
from __future__ import annotations

import torch

from .. import formats
from ..kernels.fp8_quant import quantize_fp8_per_token_kernel
from ._common import device_guard, fast_launch, next_pow2, use_hw_fp8

# Rows of up to ONE_TILE_MAX_K columns are read once into registers (at most 32 values a thread
# at the warps below); longer rows are looped over in LOOP_BLOCK_K chunks, twice.
ONE_TILE_MAX_K = 16384
LOOP_BLOCK_K = 2048


def fp8_row_tile(K: int) -> tuple[int, int, bool]:
    """(BLOCK_K, num_warps, ONE_TILE) of the kernels that quantize one K-long row per program."""
    block_k = max(next_pow2(K), 128)
    if block_k <= ONE_TILE_MAX_K:
        return block_k, min(16, max(4, block_k // 1024)), True
    return LOOP_BLOCK_K, 8, False


def empty_fp8_rows(rows: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a per-row fp8 quantizer: fp8 [rows, K] and fp32 scales [rows, 1]."""
    return (torch.empty((rows, K), dtype=formats.FP8_DTYPE, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [T, K] contiguous -> (fp8 [T, K], fp32 [T, 1]) on the current stream; no host sync,
    grid = T (capturable)."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"quantize_fp8_per_token: x must be contiguous bf16 [T, K], got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    T, K = x.shape
    q, scale = empty_fp8_rows(T, K, x.device)
    if T == 0:
        return q, scale
    block_k, warps, one_tile = fp8_row_tile(K)
    with device_guard(x):
        fast_launch(
            quantize_fp8_per_token_kernel, (T,),
            x, q.view(torch.uint8), scale, K, MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_K=block_k,
            HW=use_hw_fp8(x), ONE_TILE=one_tile, num_warps=warps)
    return q, scale
