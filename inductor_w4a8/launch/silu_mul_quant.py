"""Launcher of `w4a8::silu_mul_quantize_fp8` (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch

from .. import formats
from ..kernels.silu_mul_quant import silu_mul_quant_kernel
from ._common import device_guard, fast_launch, next_pow2, use_hw_fp8
from .fp8_quant import empty_fp8_rows

# Rows of up to MAX_ONE_TILE outputs stay in registers (one read of x); longer rows loop.
MAX_ONE_TILE = 4096
LOOP_BLOCK_I = 1024


def silu_mul_quantize_fp8(x: torch.Tensor, *, block_i: int | None = None):
    """bf16 [R, 2I] -> (fp8 [R, I], fp32 [R, 1]) of silu(x[:, :I]) * x[:, I:], one program a row.

    `block_i` (a power of 2) overrides the tile, for tests of the looping path.
    Inputs are checked by the op (ops.py) before this is called.
    """
    R, two_i = x.shape
    I = two_i // 2
    q, scale = empty_fp8_rows(R, I, x.device)
    if R == 0:
        return q, scale
    if block_i is None:
        block_i = next_pow2(I) if I <= MAX_ONE_TILE else LOOP_BLOCK_I
    one_tile = I <= block_i
    with device_guard(x):
        fast_launch(silu_mul_quant_kernel, (R,), x, q.view(torch.uint8), scale, I,
                                    MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_I=block_i,
                                    ONE_TILE=one_tile, HW=use_hw_fp8(x),
                                    num_warps=4 if block_i <= 1024 else 8)
    return q, scale
