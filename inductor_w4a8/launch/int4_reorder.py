"""Launcher of `w4a8::encode_and_reorder_int4b_grouped` (CUDA, or CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch
import triton

from .. import formats
from ..kernels.int4_reorder import encode_int4_gemm_layout_kernel

_BLOCK = 4096


def encode_and_reorder(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int32 [E, N, K // 8] -> (GEMM layout int32 [E, N, K // 8], int64 [E, 3] strides).

    Runs on the caller's current stream; reads `packed`, writes a fresh tensor.
    """
    E, N, words = packed.shape
    K = words * formats.NIBBLES_PER_WORD
    formats._check_chunk(K)
    out = torch.empty(formats.gemm_layout_shape(E, N, K), dtype=formats.gemm_layout_dtype(),
                      device=packed.device)
    numel = packed.numel()
    if numel:
        grid = (triton.cdiv(numel, _BLOCK),)
        encode_int4_gemm_layout_kernel[grid](packed, out, numel, BLOCK=_BLOCK)
    return out, formats.gemm_layout_strides(E, N, K, device=packed.device)
