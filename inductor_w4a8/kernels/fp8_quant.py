"""Per-token fp8 quantization: bf16 [T, K] -> fp8 [T, K], fp32 [T, 1].

scale = max(amax_row / 448, 1 / (448 * 512)); q = e4m3(clamp(x / scale, -448, 448)), with IEEE
division (div_rn), bit for bit as `formats.quantize_fp8_per_token`. One program per row: with
ONE_TILE (K <= BLOCK_K) the row is read once and kept in registers; otherwise two passes over K
in BLOCK_K chunks (amax, then quantize). Row offsets in int64.
"""
import triton
import triton.language as tl

from .fp8 import bf16_row_fp8_scale, bf16_row_to_fp8_one_tile, quantize_e4m3_bits
from .pdl import wait_for_prior_kernels


@triton.jit
def quantize_fp8_per_token_kernel(x_ptr, q_ptr, scale_ptr, K, MIN_SCALE: tl.constexpr,
                                  BLOCK_K: tl.constexpr, HW: tl.constexpr,
                                  ONE_TILE: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_prior_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    base = row * K
    if ONE_TILE:
        cols, mask, q, scale = bf16_row_to_fp8_one_tile(x_ptr, base, K, MIN_SCALE, BLOCK_K, HW)
        tl.store(scale_ptr + row, scale)
        tl.store(q_ptr + base + cols, q, mask=mask)
        return
    scale = bf16_row_fp8_scale(x_ptr, base, K, MIN_SCALE, BLOCK_K)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = cols < K
        v = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        q = quantize_e4m3_bits(v, scale, HW)
        tl.store(q_ptr + base + cols, q, mask=mask)
