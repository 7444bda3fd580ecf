"""Launcher: bf16 group scales -> (fp8 group scales, fp32 channel scales), vLLM's contract."""
from __future__ import annotations

import torch

from .. import formats
from ..kernels.scale_convert import bf16_scales_to_fp8_kernel
from ._common import cdiv, device_guard, next_pow2, use_hw_fp8

MAX_BLOCK_G = 128
TILE_ELEMS = 4096


def convert_bf16_scales_to_fp8(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [..., G] (rank >= 2, contiguous) -> (fp8 [..., G], fp32 [..., 1]) on the current stream."""
    if scales.dtype != torch.bfloat16 or scales.dim() < 2 or not scales.is_contiguous():
        raise ValueError(f"convert_bf16_scales_to_fp8: scales must be contiguous bf16 of rank >= 2, "
                         f"got {scales.dtype} {tuple(scales.shape)} strides {scales.stride()}")
    G = scales.shape[-1]
    lead = tuple(scales.shape[:-1])
    fp8 = torch.empty(tuple(scales.shape), dtype=formats.FP8_DTYPE, device=scales.device)
    chan = torch.empty(lead + (1,), dtype=torch.float32, device=scales.device)
    n_rows = scales.numel() // G if G else 0
    if n_rows == 0:
        return fp8, chan
    block_g = min(next_pow2(G), MAX_BLOCK_G)
    block_r = max(TILE_ELEMS // block_g, 1)
    with device_guard(scales):
        bf16_scales_to_fp8_kernel[(cdiv(n_rows, block_r),)](
            scales, fp8.view(torch.uint8), chan, n_rows, G, MIN_SCALE=formats.FP8_MIN_SCALE,
            BLOCK_R=block_r, BLOCK_G=block_g, HW=use_hw_fp8(scales), num_warps=4)
    return fp8, chan
