"""Launcher of `w4a8::silu_mul_quantize_fp8` (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch

from .. import formats
from ..kernels.silu_mul_quant import silu_mul_quant_kernel
from ._common import cdiv, device_guard, fast_launch, next_pow2, use_hw_fp8
from .fp8_quant import empty_fp8_rows

# Rows of up to MAX_IN_REGISTERS outputs are read once and kept in registers; longer rows loop
# twice over LOOP_BLOCK_I chunks.
MAX_IN_REGISTERS = 4096
LOOP_BLOCK_I = 1024
# From this many rows on (prefill), one warp per row in WARP_CHUNK-column chunks: the GPU is
# full of rows, so lanes and barriers are what cost. Below it (decode), a row's chunk spreads
# over several warps so that each of the few rows finishes sooner.
WARP_PER_ROW_MIN_ROWS = 1024
WARP_CHUNK = 256   # 32 lanes x 8 bf16: one 16-byte load per lane


def silu_mul_tile(R: int, I: int) -> tuple[int, int, int]:
    """(BLOCK_I, NUM_CHUNKS, num_warps) of silu_mul_quant_kernel for R rows of I outputs;
    NUM_CHUNKS 0 is the two-pass loop."""
    if I > MAX_IN_REGISTERS:
        return LOOP_BLOCK_I, 0, 4
    if R >= WARP_PER_ROW_MIN_ROWS:
        return WARP_CHUNK, max(cdiv(I, WARP_CHUNK), 1), 1
    block_i = next_pow2(I)
    return block_i, 1, 4 if block_i <= 1024 else 8


def silu_mul_quantize_fp8(x: torch.Tensor, *, tile: tuple[int, int, int] | None = None):
    """bf16 [R, 2I] -> (fp8 [R, I], fp32 [R, 1]) of silu(x[:, :I]) * x[:, I:], one program a row.

    `tile` ((BLOCK_I, NUM_CHUNKS, num_warps), BLOCK_I a power of 2) overrides `silu_mul_tile`,
    for tests of each path. Inputs are checked by the op (ops.py) before this is called.
    """
    R, two_i = x.shape
    I = two_i // 2
    block_i, num_chunks, warps = tile or silu_mul_tile(R, I)
    if tile is not None and (block_i & (block_i - 1) or (num_chunks and num_chunks * block_i < I)):
        raise ValueError(f"silu_mul_quantize_fp8: tile={tile} must be (BLOCK_I a power of 2, "
                         f"NUM_CHUNKS with NUM_CHUNKS * BLOCK_I >= I = {I}, or 0 for the two-pass "
                         f"loop, num_warps); pass tile=None for the default")
    q, scale = empty_fp8_rows(R, I, x.device)
    if R == 0:
        return q, scale
    with device_guard(x):
        fast_launch(silu_mul_quant_kernel, (R,), x, q.view(torch.uint8), scale, I,
                    MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_I=block_i, NUM_CHUNKS=num_chunks,
                    HW=use_hw_fp8(x), num_warps=warps)
    return q, scale
